"""Hostile weight files: bit flips in converted files (caught by the CRC32
stored with each tensor, at load and when `kt-kernel convert` resumes), FIFOs
and other non-regular files where a weight file should be (refused, never
waited on), `kt-kernel convert` given bad paths (one line, nonzero status),
and Hugging Face checkpoints with broken safetensors headers or wrong expert
tensors (ValueError naming the file and the tensor).

Checkpoints are written byte by byte here (no safetensors package), tiny
(E=3, H=64, I=128), so the module runs in seconds. Cases that could hang run
in a subprocess with a timeout.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import kt_kernel
from kt_kernel.weights import convert as conv
from kt_kernel.weights.hf_checkpoint import HFCheckpoint
from kt_kernel.weights.safetensors_io import SafetensorsFile

from conftest import make_inputs, make_wrapper

E, K, H, I = 3, 2, 64, 128
PYTHONPATH = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(kt_kernel.__file__)),
                                         os.environ.get("PYTHONPATH")) if p)


# ------------------------------------------------------------ writers
def write_safetensors(path, tensors, edit_header=None):
    """tensors: name -> (dtype, shape, raw bytes), laid out in order. edit_header(h) may change the header."""
    h, off, data = {}, 0, []
    for name, (dt, shape, raw) in tensors.items():
        h[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        data.append(raw)
    if edit_header:
        edit_header(h)
    hb = json.dumps(h).encode()
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb + b"".join(data))


def expert_tensors(num_layers=1, seed=0):
    """bf16 per-expert tensors in DeepSeek naming: name -> [dtype, shape, bytes]."""
    rng = np.random.default_rng(seed)
    t = {}
    for L in range(num_layers):
        for e in range(E):
            for which, (N, Kd) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                v = (rng.standard_normal((N, Kd)) / np.sqrt(Kd)).astype(np.float32)
                t[f"model.layers.{L}.mlp.experts.{e}.{which}_proj.weight"] = \
                    ["BF16", (N, Kd), (v.view(np.uint32) >> 16).astype(np.uint16).tobytes()]
    return t


def write_config(root):
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"model_type": "deepseek_v3", "n_routed_experts": E, "hidden_size": H,
                   "moe_intermediate_size": I, "num_experts_per_tok": K}, f)


def write_ckpt(root, num_layers=1, edit=None, edit_header=None):
    os.makedirs(root, exist_ok=True)
    write_config(root)
    t = expert_tensors(num_layers)
    if edit:
        edit(t)
    write_safetensors(os.path.join(root, "model.safetensors"), t, edit_header)
    return root


def load(path, method="AMXINT8", layer=0, mask=None):
    w = make_wrapper(E, K, H, I, method=method, threads=1, weight_path=str(path), gpu_experts_mask=mask)
    w.layer_idx = layer
    w.load_weights()
    return w


def run_py(code, timeout=60):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One converted two-layer directory (AMXINT8), copied per test that damages it."""
    root = tmp_path_factory.mktemp("conv")
    src = write_ckpt(str(root / "hf"), num_layers=2)
    out = str(root / "out")
    conv.convert(src, out, "AMXINT8", threads=1, progress=None)
    return src, out


def copy_converted(converted, tmp_path):
    dst = str(tmp_path / "out")
    shutil.copytree(converted[1], dst)
    return dst


def data_region(path):
    raw = open(path, "rb").read()
    return 8 + int.from_bytes(raw[:8], "little"), len(raw)


def flip_bit(path, rng):
    start, end = data_region(path)
    pos = int(rng.integers(start, end))
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << int(rng.integers(0, 8)))]))
    return pos


# ------------------------------------------------- CRC32 at load and resume
def test_unmodified_converted_file_loads_and_runs(converted, fresh_pool):
    w = load(converted[1])
    x, ids, tw = make_inputs(4, H, E, K)
    assert np.isfinite(np.asarray(w.forward(x, ids, tw))).all()


@pytest.mark.parametrize("seed", range(20))
def test_bit_flip_in_data_region_fails_load(converted, tmp_path, fresh_pool, seed):
    out = copy_converted(converted, tmp_path)
    path = conv.layer_file(out, 0)
    flip_bit(path, np.random.default_rng(seed))
    with pytest.raises(ValueError, match=r"layer_000\.safetensors.*blk\.0\.ffn_(gate|up|down)_exps\.\d\.(weight|scale)"
                                         r".*CRC32"):
        load(out)
    load(out, layer=1)  # the other layer's file is intact


def test_crc_opt_out_is_explicit(converted, tmp_path, fresh_pool, monkeypatch):
    out = copy_converted(converted, tmp_path)
    flip_bit(conv.layer_file(out, 0), np.random.default_rng(0))
    monkeypatch.setenv("KT_KERNEL_SKIP_CRC", "1")
    with pytest.warns(UserWarning, match="KT_KERNEL_SKIP_CRC.*layer_000.safetensors"):
        load(out)  # the caller asked not to check, and is told it was not
    monkeypatch.setenv("KT_KERNEL_SKIP_CRC", "0")
    with pytest.raises(ValueError, match="CRC32"):
        load(out)


def test_missing_or_corrupt_crc_list_fails_load(converted, tmp_path, fresh_pool):
    out = copy_converted(converted, tmp_path)
    path = conv.layer_file(out, 0)
    raw = bytearray(open(path, "rb").read())
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    h["__metadata__"]["crc32"] = "{}"
    body = json.dumps(h, separators=(",", ":")).encode()
    raw[8:8 + n] = body + b" " * (n - len(body))
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"layer_000\.safetensors.*no CRC32"):
        load(out)


def test_resume_reconverts_a_corrupt_complete_layer(converted, tmp_path, fresh_pool):
    src, good = converted
    out = copy_converted(converted, tmp_path)
    flip_bit(conv.layer_file(out, 0), np.random.default_rng(7))
    with open(conv.layer_file(out, 1), "r+b") as f:
        f.truncate(os.path.getsize(conv.layer_file(out, 1)) - 100)
    log = io.StringIO()
    s = conv.convert(src, out, "AMXINT8", threads=1, progress=log)
    assert s["skipped"] == []
    text = log.getvalue()
    assert "layer 0" in text and "layer_000.safetensors" in text and "CRC32" in text and "converting again" in text
    assert "layer_001.safetensors" in text
    for L in (0, 1):  # byte for byte what a clean run wrote
        assert open(conv.layer_file(out, L), "rb").read() == open(conv.layer_file(good, L), "rb").read()
    log = io.StringIO()
    s = conv.convert(src, out, "AMXINT8", threads=1, progress=log)
    assert s["skipped"] == [0, 1], log.getvalue()
    load(out)


def test_failed_conversion_leaves_nothing_a_resume_would_trust(tmp_path, fresh_pool, monkeypatch):
    src = write_ckpt(str(tmp_path / "hf"))
    out = str(tmp_path / "out")
    real = HFCheckpoint.matrix

    def failing(self, L, e, which):
        if e == E - 1:
            raise OSError(5, "Input/output error")
        return real(self, L, e, which)

    monkeypatch.setattr(HFCheckpoint, "matrix", failing)
    with pytest.raises(OSError):
        conv.convert(src, out, "AMXINT8", threads=1, progress=None)
    assert sorted(os.listdir(out)) == ["kt_kernel_model.json"]
    monkeypatch.setattr(HFCheckpoint, "matrix", real)
    assert conv.convert(src, out, "AMXINT8", threads=1, progress=None)["skipped"] == []
    load(out)


def test_failed_verification_keeps_the_file_out_of_place(tmp_path, fresh_pool, monkeypatch):
    """A write that reads back wrong (bad disk) never reaches the final name."""
    src = write_ckpt(str(tmp_path / "hf"))
    out = str(tmp_path / "out")
    real = conv.tensor_crc32
    calls = []

    def lying(a):
        calls.append(1)
        return "deadbeef" if len(calls) == 1 else real(a)  # the first CRC recorded does not match the disk

    monkeypatch.setattr(conv, "tensor_crc32", lying)
    with pytest.raises(ValueError, match=r"layer_000\.safetensors.*CRC32"):
        conv.convert(src, out, "AMXINT8", threads=1, progress=None)
    assert sorted(os.listdir(out)) == ["kt_kernel_model.json"]


# ------------------------------------------------------ non-regular files
FIFO_CASES = {
    "converted layer": ("""
os.makedirs(d); open(os.path.join(d, 'kt_kernel_model.json'), 'w').write('{}')
os.mkfifo(os.path.join(d, 'layer_000.safetensors'))
w = kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=3, num_experts_per_tok=2, hidden_size=64,
    moe_intermediate_size=128, cpuinfer_threads=1, threadpool_count=1, method='AMXINT8', weight_path=d)
w.load_weights()""", "layer_000.safetensors"),
    "hf shard": ("""
os.makedirs(d); write_config(d); os.mkfifo(os.path.join(d, 'model.safetensors'))
conv.convert(d, d + '_out', 'AMXINT8', progress=None)""", "model.safetensors"),
    "hf config": ("""
os.makedirs(d); os.mkfifo(os.path.join(d, 'config.json'))
conv.convert(d, d + '_out', 'AMXINT8', progress=None)""", "config.json"),
    "hf index": ("""
os.makedirs(d); write_config(d); os.mkfifo(os.path.join(d, 'model.safetensors.index.json'))
conv.convert(d, d + '_out', 'AMXINT8', progress=None)""", "model.safetensors.index.json"),
    "hf indexed shard": ("""
os.makedirs(d); write_config(d); os.mkfifo(os.path.join(d, 's1.safetensors'))
json.dump({'weight_map': {'model.layers.0.mlp.experts.0.gate_proj.weight': 's1.safetensors'}},
          open(os.path.join(d, 'model.safetensors.index.json'), 'w'))
conv.convert(d, d + '_out', 'AMXINT8', progress=None)""", "s1.safetensors"),
    "gguf": ("""
os.mkfifo(d + '.gguf')
conv.convert(d + '.gguf', d + '_out', 'AMXINT8', progress=None)""", ".gguf"),
    "gguf native": ("""
os.mkfifo(d + '.gguf')
w = kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=3, num_experts_per_tok=2, hidden_size=64,
    moe_intermediate_size=128, cpuinfer_threads=1, threadpool_count=1, method='BF16', weight_path=d + '.gguf')
w.load_weights()""", ".gguf"),
}


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_fifo_instead_of_a_weight_file_is_refused(tmp_path, case):
    body, name = FIFO_CASES[case]
    code = f"""
import json, os, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import kt_kernel
from kt_kernel.weights import convert as conv
from test_weights_hostile import write_config
d = {str(tmp_path / 'w')!r}
try:
{chr(10).join('    ' + line for line in body.strip().splitlines())}
    print('NO ERROR')
except ValueError as e:
    print('ValueError:', e)
"""
    r = run_py(code)  # a hang is a TimeoutExpired: the test fails, the run goes on
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ValueError:") and name in r.stdout and "not a regular file" in r.stdout, r.stdout


def test_fifos_in_the_output_directory_are_replaced(tmp_path):
    """FIFOs where the converter writes (a layer file, its .partial, the manifest's temporary) neither block
    the conversion nor survive it."""
    src = write_ckpt(str(tmp_path / "hf"))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("layer_000.safetensors", "layer_000.safetensors.partial", "kt_kernel_model.json.tmp"):
        os.mkfifo(out / name)
    r = run_py(f"""
import io
from kt_kernel.weights import convert as conv
log = io.StringIO()
conv.convert({src!r}, {str(out)!r}, 'AMXINT8', threads=1, progress=log)
print(log.getvalue())""")
    assert r.returncode == 0, r.stderr
    assert "not a regular file" in r.stdout and "converting again" in r.stdout, r.stdout
    assert sorted(os.listdir(out)) == ["kt_kernel_model.json", "layer_000.safetensors"]
    assert os.path.isfile(out / "layer_000.safetensors")


# ----------------------------------------------------------------- CLI
def run_cli(*args):
    """`python -m kt_kernel ...`, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    return subprocess.run([sys.executable, "-m", "kt_kernel", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def assert_one_line_error(r, *needles):
    assert r.returncode not in (0, None) and r.returncode > 0, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kt-kernel convert: error:"), r.stderr
    for n in needles:
        assert n in lines[0], r.stderr


def test_cli_output_is_a_file(tmp_path):
    src = write_ckpt(str(tmp_path / "hf"))
    f = tmp_path / "out.txt"
    f.write_text("x")
    assert_one_line_error(run_cli("convert", src, str(f), "--method", "AMXINT8"), str(f), "not a directory")
    assert f.read_text() == "x"
    assert_one_line_error(run_cli("convert", src, str(f / "sub"), "--method", "AMXINT8"), str(f))


def test_cli_bad_inputs(tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing")
    assert_one_line_error(run_cli("convert", missing, out, "--method", "AMXINT8"), missing, "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("convert", str(empty), out, "--method", "AMXINT8"), str(empty), "config.json")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk" * 10)
    assert_one_line_error(run_cli("convert", str(junk), out, "--method", "AMXINT8"), str(junk))
    src = write_ckpt(str(tmp_path / "hf"))
    assert_one_line_error(run_cli("convert", src, out, "--method", "AMXINT8", "--threads", "-1"), "--threads")
    assert_one_line_error(run_cli("convert", src, out, "--method", "AMXINT8", "--layers", "x"), "--layers")


# ------------------------------------------- broken Hugging Face checkpoints
def _set(name, key, value):
    def edit(h):
        h[name][key] = value
    return edit


G0 = "model.layers.0.mlp.experts.0.gate_proj.weight"
U1 = "model.layers.0.mlp.experts.1.up_proj.weight"
D2 = "model.layers.0.mlp.experts.2.down_proj.weight"


def _overlap(h):
    b, e = h[G0]["data_offsets"]
    h[U1]["data_offsets"] = [b + 2, b + 2 + (h[U1]["data_offsets"][1] - h[U1]["data_offsets"][0])]


def _not_ordered(h):
    b, e = h[U1]["data_offsets"]
    h[U1]["data_offsets"] = [e, b]


def _past_end(h):
    b, e = h[D2]["data_offsets"]
    h[D2]["data_offsets"] = [b + 64, e + 64]


def _hole(h):
    del h[U1]  # its bytes stay in the data region, covered by no tensor


HEADER_CASES = {
    "overlap": (_overlap, "overlap"),
    "offsets not ordered": (_not_ordered, U1),
    "offsets past end": (_past_end, D2),
    "hole in data": (_hole, "not covered"),
    "wrong shape": (_set(U1, "shape", [I // 2, H]), U1),
}


TENSOR_CASES = {
    "wrong expert shape": (lambda t: t.__setitem__(U1, ["BF16", (H, I), t[U1][2]]), U1),
    "I16 expert": (lambda t: t[U1].__setitem__(0, "I16"), U1),
    "missing expert tensor": (lambda t: t.pop(D2), D2),
    "missing whole expert": (lambda t: [t.pop(k) for k in list(t) if ".experts.1." in k], U1.replace("up", "gate")),
}


def _check_both(root, *needles):
    """Conversion and a native load both raise ValueError naming every needle."""
    for attempt in ("convert", "load"):
        with pytest.raises(ValueError) as ei:
            if attempt == "convert":
                conv.convert(root, root + "_out", "AMXINT8", threads=1, progress=None)
            else:
                load(root, method="BF16")
        for n in needles:
            assert n in str(ei.value), (attempt, str(ei.value))


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_hf_safetensors_header_damage(tmp_path, fresh_pool, case):
    edit, needle = HEADER_CASES[case]
    root = write_ckpt(str(tmp_path / "hf"), edit_header=edit)
    _check_both(root, os.path.join(root, "model.safetensors"), needle)


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_hf_expert_tensor_damage(tmp_path, fresh_pool, case):
    edit, needle = TENSOR_CASES[case]
    root = write_ckpt(str(tmp_path / "hf"), edit=edit)
    _check_both(root, "model.safetensors", needle)


@pytest.mark.parametrize("damage", ["truncated", "header length past end", "header not json", "tiny file",
                                    "trailing bytes"])
def test_hf_safetensors_file_damage(tmp_path, fresh_pool, damage):
    root = write_ckpt(str(tmp_path / "hf"))
    p = os.path.join(root, "model.safetensors")
    raw = bytearray(open(p, "rb").read())
    n = int.from_bytes(raw[:8], "little")
    if damage == "truncated":
        raw = raw[:len(raw) - 300]
    elif damage == "header length past end":
        raw[:8] = (len(raw) + 10).to_bytes(8, "little")
    elif damage == "header not json":
        raw[8 + n // 2] = ord("}")
    elif damage == "trailing bytes":
        raw += b"\0" * 16
    else:
        raw = raw[:5]
    open(p, "wb").write(bytes(raw))
    _check_both(root, p)


def test_index_names_a_tensor_its_shard_lacks(tmp_path, fresh_pool):
    root = write_ckpt(str(tmp_path / "hf"))
    t = expert_tensors()
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: "model.safetensors" for k in t}}, f)
    t.pop(D2)
    write_safetensors(os.path.join(root, "model.safetensors"), t)
    _check_both(root, "model.safetensors", D2)


def test_fused_checkpoint_without_down_proj(tmp_path, fresh_pool):
    root = str(tmp_path / "hf")
    os.makedirs(root)
    write_config(root)
    gu = np.zeros((E, H, 2 * I), np.uint16)
    write_safetensors(os.path.join(root, "model.safetensors"),
                      {"model.layers.0.mlp.experts.gate_up_proj": ("BF16", gu.shape, gu.tobytes())})
    _check_both(root, "model.safetensors", "model.layers.0.mlp.experts.down_proj")


def test_fused_checkpoint_with_i16_experts(tmp_path, fresh_pool):
    root = str(tmp_path / "hf")
    os.makedirs(root)
    write_config(root)
    gu = np.zeros((E, H, 2 * I), np.int16)
    d = np.zeros((E, I, H), np.int16)
    write_safetensors(os.path.join(root, "model.safetensors"),
                      {"model.layers.0.mlp.experts.gate_up_proj": ("I16", gu.shape, gu.tobytes()),
                       "model.layers.0.mlp.experts.down_proj": ("I16", d.shape, d.tobytes())})
    _check_both(root, "model.safetensors", "I16", "model.layers.0.mlp.experts.")


def test_a_valid_synthetic_checkpoint_converts_and_loads(tmp_path, fresh_pool):
    """The writer above makes files the strict reader accepts (so the damage cases test the damage)."""
    root = write_ckpt(str(tmp_path / "hf"))
    assert len(SafetensorsFile(os.path.join(root, "model.safetensors")).keys()) == 3 * E
    conv.convert(root, root + "_out", "AMXINT8", threads=1, progress=None)
    load(root + "_out")
    load(root, method="BF16")
