"""Real weight files: convert (HF bf16/fp16/fp32/FP8/compressed-tensors int4,
GGUF) -> canonical files -> load_weights, compared with a float64 reference
on the source's dequantised weights; native loads without conversion; the
same files on 1 and 2 NUMA slices; corrupt and mismatched files.

Sizes stay tiny (H, I <= 256, E <= 6, 2 layers) so the module runs in seconds.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")  # test-only writers (scripts/setup.sh installs them)
pytest.importorskip("gguf")

import kt_kernel  # noqa: E402
from kt_kernel import _kt_kernel  # noqa: E402
from kt_kernel.weights import convert as conv
from kt_kernel.weights.common import FP8_E4M3
from kt_kernel.weights.safetensors_io import SafetensorsFile

from conftest import make_inputs, make_wrapper
from reference import moe_reference, rel_fro_err
import weight_writers as ww

# Relative Frobenius error of the layer output vs float64 on the source weights.
BUDGET = {"BF16": 0.02, "FP8": 0.02, "AMXINT8": 0.06, "AMXINT4": 0.30, "RAWINT4": 0.05}
LOSSLESS_INT4_BUDGET = 0.05  # INT4 weights exact: only the int8 activation encoding remains


def run_layer(path, method, layer, E, H, I, k=2, pools=1, T=8, mask=None, pmap=None, **kw):
    w = make_wrapper(E, k, H, I, method=method, pools=pools, weight_path=str(path), gpu_experts_mask=mask, **kw)
    w.layer_idx = layer
    w.load_weights(pmap)
    x, ids, tw = make_inputs(T, H, E, k, seed=layer + 3)
    return w, x, ids, tw, w.forward(x, ids, tw)


def check_forward(path, method, G, U, D, E, H, I, budget, layers=(0, 1), **kw):
    for L in layers:
        _, x, ids, tw, y = run_layer(path, method, L, E, H, I, **kw)
        ref = moe_reference(x, ids, tw, G[L], U[L], D[L])
        err = rel_fro_err(y, ref)
        assert err <= budget, f"{method} layer {L}: error {err:.4f} > {budget}"


def unpack_all(w, E):
    return [np.stack([w._layer.unpack_expert(e, i) for e in range(E)]) for i in range(3)]


# ----------------------------------------------------------------- native parts
@pytest.mark.parametrize("scheme,group", [(0, 0), (1, 0), (2, 32), (2, 64), (2, 0), (3, 32), (3, 0), (4, 32), (4, 128),
                                          (5, 32), (5, 128)])
def test_canonical_quantisation_packs_like_pack_matrix(scheme, group):
    rng = np.random.default_rng(scheme * 10 + group)
    for N, K in ((17, 96 if group not in (64, 128) else 128), (33, 256)):
        w = rng.standard_normal((N, K)).astype(np.float32)
        q, s, mn = _kt_kernel.quantize_matrix(scheme, group, w, False)
        assert np.array_equal(_kt_kernel.pack_matrix(scheme, group, w), _kt_kernel.pack_quantized(scheme, group, N, K, q, s, mn))
        if K == 256:  # a K slice packs exactly like the same columns of the whole matrix
            full = _kt_kernel.unpack_matrix(scheme, group, N, K, _kt_kernel.pack_matrix(scheme, group, w))
            part = _kt_kernel.unpack_matrix(scheme, group, N, 128, _kt_kernel.pack_quantized(scheme, group, N, 128, q, s, mn, 128))
            assert np.array_equal(full[:, 128:], part)


def test_mse_scale_search_beats_amax_rounding():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 256)) * rng.random((64, 1))).astype(np.float32)
    for scheme in (2, 3):
        errs = []
        for search in (False, True):
            q, s, mn = _kt_kernel.quantize_matrix(scheme, 32, w, search)
            vals = kt_kernel.weights.common.dequant_canonical(scheme, 32, q, s, mn, 256)
            errs.append(np.sum((vals - w) ** 2))
        assert errs[1] < 0.95 * errs[0], f"scheme {scheme}: search {errs[1]:.4f} vs amax {errs[0]:.4f}"


def test_fp8_table_matches_torch():
    t = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    nan = np.isnan(t)
    assert np.array_equal(nan, np.isnan(FP8_E4M3)) and nan.sum() == 2
    assert np.array_equal(t[~nan], FP8_E4M3[~nan])


# ------------------------------------------------------------- HF dense inputs
HF_CASES = [
    ("deepseek", torch.bfloat16, "model.", "BF16"),
    ("deepseek", torch.bfloat16, "model.", "AMXINT8"),
    ("deepseek", torch.bfloat16, "language_model.model.", "AMXINT4"),
    ("mixtral", torch.float16, "model.", "AMXINT4"),
    ("qwen3_vl_moe", torch.float32, "model.language_model.", "AMXINT8"),
    ("gpt_oss", torch.bfloat16, "model.", "BF16"),
    ("qwen3_moe", torch.float32, "model.", "BF16"),
]


@pytest.mark.parametrize("style,dtype,prefix,method", HF_CASES)
def test_hf_convert_and_load(tmp_path, fresh_pool, style, dtype, prefix, method):
    E, H, I = 4, 128, 256
    src, G, U, D = ww.write_hf(str(tmp_path / "hf"), style, dtype, E=E, H=H, I=I, prefix=prefix)
    out = tmp_path / "out"
    s = conv.convert(src, str(out), method, threads=2, progress=None)
    assert sorted(s["layers"]) == [0, 1]
    meta = SafetensorsFile(str(out / "layer_001.safetensors")).metadata
    assert meta["method"] == method and meta["layout_version"] == str(kt_kernel.PACKED_LAYOUT_VERSION)
    assert meta["num_experts"] == str(E) and "error" in meta
    if method == "BF16" and dtype == torch.bfloat16:
        assert meta["lossless"] == "1"
    check_forward(out, method, G, U, D, E, H, I, BUDGET[method])


def test_native_bf16_with_gpu_mask_and_expert_map(tmp_path, fresh_pool):
    E, H, I, k = 6, 128, 256, 2
    src, G, U, D = ww.write_hf(str(tmp_path / "hf"), "deepseek", torch.bfloat16, E=E, H=H, I=I)
    mask = np.zeros(E, dtype=bool)
    mask[[1, 4]] = True
    pmap = np.array([5, 0, 3, 2, 1, 4], dtype=np.int64)
    w = make_wrapper(E, k, H, I, method="BF16", weight_path=src, gpu_experts_mask=mask)
    w.layer_idx = 1
    w.load_weights(pmap)
    assert [w._layer.slot_loaded(s) for s in range(E)] == [True, False, True, True, False, True]
    for s in (0, 2, 5):
        assert np.array_equal(w._layer.unpack_expert(s, 0), G[1][pmap[s]])
        assert np.array_equal(w._layer.unpack_expert(s, 2), D[1][pmap[s]])
    x, ids, tw = make_inputs(6, H, E, k, seed=5)
    y = w.forward(x, ids, tw)  # masked experts are skipped
    ref = moe_reference(x, ids, tw, G[1][pmap], U[1][pmap], D[1][pmap], skip_mask=mask)
    assert rel_fro_err(y, ref) < BUDGET["BF16"]
    mask[1] = False  # the server moves expert 1 back to the CPU without reloading
    ids[0, 0] = 1
    with pytest.raises(RuntimeError, match="not loaded"):
        w.forward(x, ids, tw)


def test_same_files_on_one_and_two_numa_slices(tmp_path, fresh_pool):
    E, H, I = 4, 128, 256
    src, G, U, D = ww.write_hf(str(tmp_path / "hf"), "deepseek", torch.bfloat16, E=E, H=H, I=I)
    for method in ("AMXINT4", "AMXINT8"):
        out = tmp_path / method
        conv.convert(src, str(out), method, threads=2, progress=None)
        from kt_kernel import _pool

        results = []
        for pools in (1, 2):
            _pool.reset_pool_for_tests()
            w, x, ids, tw, y = run_layer(out, method, 1, E, H, I, pools=pools)
            if pools == 2:
                assert w._layer.slice_range(0) == (0, 128) and w._layer.slice_range(1) == (128, 256)
            results.append((unpack_all(w, E), y))
        for a, b in zip(results[0][0], results[1][0]):
            assert np.array_equal(a, b)  # the same quantised weights, packed per slice
        np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5, atol=1e-5 * np.abs(results[0][1]).max())


# ----------------------------------------------------------- quantised inputs
def test_fp8_block_scaled(tmp_path, fresh_pool):
    E, H, I = 4, 256, 256
    src, G, U, D = ww.write_hf_fp8(str(tmp_path / "fp8"), E=E, H=H, I=I)
    check_forward(src, "FP8", G, U, D, E, H, I, BUDGET["FP8"], layers=(1,))  # native: no conversion
    # Native FP8 is lossless (e4m3 codes + scales, 1 byte per weight: no bf16 copy) and the
    # forward matches the quantisation-aware reference (bf16 activations) to 1e-5.
    w, x, ids, tw, y = run_layer(src, "FP8", 1, E, H, I)
    assert w.scheme == 5 and w.group_size == 128
    g, u, d = unpack_all(w, E)
    assert np.array_equal(g, G[1]) and np.array_equal(u, U[1]) and np.array_equal(d, D[1])
    from reference import quant_aware_intermediate, quant_aware_output, rel_max_err

    w._layer.set_capture(True)
    y = np.array(w.forward(x, ids, tw))
    h = w._layer.captured_intermediate()
    weights = (g, u, d)
    h_ref = quant_aware_intermediate(x, ids, w._layer, w.scheme, E, weights)
    valid = ~np.isnan(h_ref)
    assert rel_max_err(h[valid], h_ref[valid]) <= 1e-5
    assert rel_max_err(y, quant_aware_output(h, ids, tw, w.scheme, E, weights)) <= 1e-5
    assert w.packed_bytes < 3 * E * H * I * 1.1  # 1 byte per weight (+ scales), not 2
    out = tmp_path / "out"
    conv.convert(src, str(out), "AMXINT8", threads=2, progress=None)
    check_forward(out, "AMXINT8", G, U, D, E, H, I, BUDGET["AMXINT8"])


def test_compressed_tensors_int4_is_lossless(tmp_path, fresh_pool):
    E, H, I = 4, 128, 256
    src, G, U, D = ww.write_hf_ct_int4(str(tmp_path / "ct"), E=E, H=H, I=I)
    w, *_ = run_layer(src, "RAWINT4", 1, E, H, I)  # native
    g, u, d = unpack_all(w, E)
    assert np.array_equal(g, G[1]) and np.array_equal(u, U[1]) and np.array_equal(d, D[1])
    check_forward(src, "RAWINT4", G, U, D, E, H, I, BUDGET["RAWINT4"], layers=(1,))
    out = tmp_path / "out"
    conv.convert(src, str(out), "AMXINT4", threads=2, progress=None)  # group 32 taken from the source
    meta = SafetensorsFile(str(out / "layer_000.safetensors")).metadata
    assert meta["lossless"] == "1" and meta["group_size"] == "32"
    w, *_ = run_layer(out, "AMXINT4", 0, E, H, I)  # the wrapper adopts the file's group size
    assert w.group_size == 32
    assert np.array_equal(unpack_all(w, E)[0], G[0])
    check_forward(out, "AMXINT4", G, U, D, E, H, I, LOSSLESS_INT4_BUDGET)


GGUF_CASES = [("Q4_0", "AMXINT4", {}, True), ("Q4_1", "AMXINT4", {"zero_point": True}, True),
              ("Q8_0", "AMXINT8", {}, True), ("Q4_K", "AMXINT4", {}, False), ("Q5_K", "AMXINT8", {}, False),
              ("Q6_K", "AMXINT8", {}, False), ("BF16", "BF16", {}, True)]


@pytest.mark.parametrize("qtype,method,kw,lossless", GGUF_CASES)
def test_gguf_convert_and_load(tmp_path, fresh_pool, qtype, method, kw, lossless):
    E, H, I = 4, 256, 256
    path, G, U, D = ww.write_gguf(str(tmp_path / "m.gguf"), qtype, E=E, H=H, I=I)
    out = tmp_path / "out"
    conv.convert(path, str(out), method, threads=2, zero_point=kw.get("zero_point", False), progress=None)
    meta = SafetensorsFile(str(out / "layer_000.safetensors")).metadata
    assert meta["lossless"] == ("1" if lossless else "0"), meta["error"]
    err = json.loads(meta["error"])
    assert (max(err.values()) == 0) == lossless
    if lossless:
        w, *_ = run_layer(out, method, 0, E, H, I, **kw)
        assert np.array_equal(unpack_all(w, E)[2], D[0])
    check_forward(out, method, G, U, D, E, H, I, LOSSLESS_INT4_BUDGET if lossless and method != "BF16"
                  else BUDGET[method], **kw)


def test_gguf_q8_0_loads_losslessly_as_grouped_int8(tmp_path, fresh_pool):
    """Q8_0 (fp16 d + 32 int8 per block) is grouped INT8 with group 32: an AMXINT8 wrapper reading the GGUF
    file directly, or its conversion, holds exactly the dequantised source, and the converter reports no error."""
    from kt_kernel import _pool
    from kt_kernel.wrapper import SCHEME_INT8, SCHEME_INT8_GROUP

    E, H, I = 4, 128, 256
    path, G, U, D = ww.write_gguf(str(tmp_path / "m.gguf"), "Q8_0", E=E, H=H, I=I)
    w, *_ = run_layer(path, "AMXINT8", 1, E, H, I)  # native, no conversion
    assert (w.scheme, w.group_size) == (SCHEME_INT8_GROUP, 32)
    g, u, d = unpack_all(w, E)
    assert np.array_equal(g, G[1]) and np.array_equal(u, U[1]) and np.array_equal(d, D[1])
    check_forward(path, "AMXINT8", G, U, D, E, H, I, LOSSLESS_INT4_BUDGET, layers=(1,))
    out = tmp_path / "out"
    s = conv.convert(path, str(out), "AMXINT8", threads=2, progress=None)
    assert s["scheme"] == "int8_group" and s["group_size"] == 32
    meta = SafetensorsFile(str(out / "layer_000.safetensors")).metadata
    assert meta["lossless"] == "1" and meta["scheme"] == "int8_group" and meta["group_size"] == "32"
    assert max(json.loads(meta["error"]).values()) == 0
    for pools in (1, 2):  # 2 NUMA slices: down's K is sliced on group boundaries
        _pool.reset_pool_for_tests()
        w, *_ = run_layer(out, "AMXINT8", 0, E, H, I, pools=pools)
        assert (w.scheme, w.group_size) == (SCHEME_INT8_GROUP, 32)
        if pools == 2:
            assert w._layer.slice_range(1) == (128, 256)
        g, u, d = unpack_all(w, E)
        assert np.array_equal(g, G[0]) and np.array_equal(u, U[0]) and np.array_equal(d, D[0])
    # The same wrapper goes back to per-channel INT8 for a source that is not Q8_0.
    w.weight_path, *_ = ww.write_gguf(str(tmp_path / "bf16.gguf"), "BF16", E=E, H=H, I=I)
    w.load_weights()
    assert (w.scheme, w.group_size) == (SCHEME_INT8, 0)


def test_gguf_q4_0_native_rawint4(tmp_path, fresh_pool):
    E, H, I = 4, 256, 256
    path, G, U, D = ww.write_gguf(str(tmp_path / "m.gguf"), "Q4_0", E=E, H=H, I=I)
    w, *_ = run_layer(path, "RAWINT4", 1, E, H, I)
    assert np.array_equal(unpack_all(w, E)[0], G[1])


def test_int4_search_reported_error_and_output_beat_amax(tmp_path, fresh_pool):
    E, H, I = 4, 128, 256
    src, G, U, D = ww.write_hf(str(tmp_path / "hf"), "deepseek", torch.float32, E=E, H=H, I=I)
    errs = {}
    for search in (False, True):
        out = tmp_path / f"s{int(search)}"
        s = conv.convert(src, str(out), "AMXINT4", group_size=32, threads=2, search=search, progress=None)
        errs[search] = s["layers"][0]
    for which in ("gate", "up", "down"):
        assert errs[True][which] < 0.97 * errs[False][which], errs


# ---------------------------------------------------- CLI, resume, bad files
def test_cli_layers_and_resume(tmp_path, fresh_pool, capsys):
    E, H, I = 4, 128, 256
    src, G, U, D = ww.write_hf(str(tmp_path / "hf"), "deepseek", torch.bfloat16, num_layers=3, E=E, H=H, I=I)
    out = str(tmp_path / "out")
    from kt_kernel.__main__ import main

    assert main(["convert", src, out, "--method", "AMXINT8", "--layers", "0-1", "--threads", "2"]) == 0
    assert sorted(os.listdir(out)) == ["kt_kernel_model.json", "layer_000.safetensors", "layer_001.safetensors"]
    open(os.path.join(out, "layer_002.safetensors.partial"), "wb").write(b"junk")  # an interrupted run
    s = conv.convert(src, out, "AMXINT8", threads=2, progress=None)
    assert s["skipped"] == [0, 1] and sorted(s["layers"]) == [0, 1, 2]
    assert not os.path.exists(os.path.join(out, "layer_002.safetensors.partial"))
    assert main(["convert", str(tmp_path / "nothing"), out, "--method", "AMXINT8"]) == 2
    assert "no such file" in capsys.readouterr().err


def _converted(tmp_path, method="AMXINT8"):
    E, H, I = 4, 128, 256
    src, *_ = ww.write_hf(str(tmp_path / "hf"), "deepseek", torch.bfloat16, E=E, H=H, I=I)
    out = tmp_path / "out"
    conv.convert(src, str(out), method, threads=2, progress=None)
    return out, E, H, I


def test_mismatched_files_give_clear_errors(tmp_path, fresh_pool):
    out, E, H, I = _converted(tmp_path)
    with pytest.raises(ValueError, match="int8_per_channel"):
        run_layer(out, "AMXINT4", 0, E, H, I)
    with pytest.raises(ValueError, match="hidden_size"):
        run_layer(out, "AMXINT8", 0, E, 2 * H, I)
    with pytest.raises(ValueError, match="layer 5 was not converted"):
        run_layer(out, "AMXINT8", 5, E, H, I)
    with pytest.raises(ValueError, match="physical_to_logical_map"):
        run_layer(out, "AMXINT8", 0, E + 2, H, I)
    w = make_wrapper(E, 2, H, I, method="AMXINT8")
    with pytest.raises(ValueError, match="weight_path"):
        w.load_weights()


@pytest.mark.parametrize("damage", ["truncate", "header_len", "header_json", "offsets", "layout_version"])
def test_corrupt_converted_files_give_clear_errors(tmp_path, fresh_pool, damage):
    out, E, H, I = _converted(tmp_path)
    p = out / "layer_000.safetensors"
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    if damage == "truncate":
        raw = raw[: len(raw) - 1000]
    elif damage == "header_len":
        raw[:8] = (len(raw) * 2).to_bytes(8, "little")
    elif damage == "header_json":
        raw[8 + n // 2] = ord("{")
    else:
        h = json.loads(raw[8:8 + n])
        if damage == "offsets":
            k = next(k for k in h if k.endswith(".weight"))
            h[k]["data_offsets"][1] += 4096
        else:
            h["__metadata__"]["layout_version"] = "999"
        body = json.dumps(h).encode()
        body += b" " * (n - len(body)) if len(body) <= n else b""
        raw = raw[:8] + body[:n] + raw[8 + n:] if len(body) == n else len(body).to_bytes(8, "little") + body + raw[8 + n:]
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="layer_000.safetensors"):
        run_layer(out, "AMXINT8", 0, E, H, I)


def test_corrupt_checkpoints_give_clear_errors(tmp_path, fresh_pool):
    E, H, I = 4, 128, 256
    src, *_ = ww.write_hf(str(tmp_path / "hf"), "deepseek", torch.bfloat16, E=E, H=H, I=I, shards=1)
    st = os.path.join(src, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    with pytest.raises(ValueError, match="model.safetensors"):
        conv.convert(src, str(tmp_path / "o1"), "BF16", progress=None)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="not a MoE config"):
        conv.convert(str(cfg), str(tmp_path / "o2"), "BF16", progress=None)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(ValueError, match="bad.gguf"):
        conv.convert(str(bad), str(tmp_path / "o3"), "BF16", progress=None)
