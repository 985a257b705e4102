"""Bad input raises a clear Python exception naming the problem; it never
crashes the process or writes past a buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper

E, K, H, I = 6, 2, 64, 64


@pytest.fixture(scope="module")
def loaded():
    wr = make_wrapper(E, K, H, I, "AMXINT8")
    wr.load_weights_from_tensors(*make_weights(E, H, I))
    return wr


@pytest.mark.parametrize("kw,exc,match", [
    ({"num_experts": 0}, ValueError, "num_experts"),
    ({"num_experts_per_tok": 0}, ValueError, "num_experts_per_tok"),
    ({"hidden_size": -1}, ValueError, "hidden_size"),
    ({"hidden_size": 64.0}, TypeError, "hidden_size"),
    ({"method": "NOPE"}, ValueError, "unknown method 'NOPE'"),
    ({"method": "MXFP4"}, ValueError, "not supported"),
    ({"method": "AMXINT4", "group_size": 48}, ValueError, "group_size"),
    ({"method": "AMXINT4", "hidden_size": 96}, ValueError, "default group size 128"),
    ({"threadpool_count": 3, "cpuinfer_threads": 2}, ValueError, "threadpool_count"),
    ({"numa_nodes": [0, 1]}, ValueError, "numa_nodes"),
    ({"gpu_experts_mask": np.zeros(E + 1, bool)}, ValueError, "gpu_experts_mask"),
    ({"gpu_experts_mask": np.zeros(E, np.int32)}, TypeError, "gpu_experts_mask"),
    ({"num_gpu_experts": E + 1}, ValueError, "num_gpu_experts"),
    ({"mode": "train"}, ValueError, "mode"),
    ({"mode": "sft"}, NotImplementedError, "sft"),
    ({"swiglu_limit": 1.0}, ValueError, "swiglu_alpha"),
    ({"max_deferred_experts_per_token": -1}, ValueError, "max_deferred"),
])
def test_bad_constructor_arguments(kw, exc, match):
    args = dict(layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
                cpuinfer_threads=2, threadpool_count=1, method="BF16")
    args.update(kw)
    with pytest.raises(exc, match=match):
        kt_kernel.KTMoEWrapper(**args)


def test_bad_weights():
    wr = make_wrapper(E, K, H, I, "BF16")
    g, u, d = make_weights(E, H, I)
    with pytest.raises(ValueError, match="gate_proj: dimension 1"):
        wr.load_weights_from_tensors(g[:, :10], u, d)
    with pytest.raises(ValueError, match="down_proj"):
        wr.load_weights_from_tensors(g, u, d.transpose(0, 2, 1)[:, :, :])  # [E, I, H] is the wrong shape order
    with pytest.raises(ValueError, match="up_proj: must be contiguous"):
        wr.load_weights_from_tensors(g, np.asfortranarray(u), d)
    with pytest.raises(TypeError, match="share a dtype"):
        wr.load_weights_from_tensors(g, u.astype(np.float16), d)
    with pytest.raises(TypeError, match="gate_proj: dtype int32"):
        wr.load_weights_from_tensors(g.astype(np.int32), u, d)
    with pytest.raises(TypeError, match="gate_proj: expected a torch.Tensor or numpy.ndarray"):
        wr.load_weights_from_tensors(g.tolist(), u, d)
    with pytest.raises(ValueError, match=r"physical_to_logical_map\[1\] = 9"):
        wr.load_weights_from_tensors(g, u, d, np.array([0, 9, 1, 2, 3, 4], np.int64))
    with pytest.raises(ValueError, match=r"physical_to_logical_map has 5 entries, fewer than num_experts \(6\)"):
        wr.load_weights_from_tensors(g, u, d, np.arange(E - 1, dtype=np.int64))
    with pytest.raises(ValueError, match=r"physical_to_logical_map: expected 1-D, got shape \[6, 1\]"):
        wr.load_weights_from_tensors(g, u, d, np.zeros((E, 1), np.int64))
    with pytest.raises(ValueError, match="pass physical_to_logical_map"):
        wr.load_weights_from_tensors(g[:4], u[:4], d[:4])
    with pytest.raises(ValueError, match="tensor on device 'meta'"):
        wr.load_weights_from_tensors(torch.empty((E, I, H), device="meta"), u, d)


def test_forward_before_load():
    wr = make_wrapper(E, K, H, I, "BF16")
    x, ids, w = make_inputs(2, H, E, K)
    with pytest.raises(RuntimeError, match="not loaded"):
        wr.forward(x, ids, w)


def test_bad_forward_inputs(loaded):
    x, ids, w = make_inputs(4, H, E, K)
    cases = [
        ((x[:, :10], ids, w), ValueError, "hidden_states: dimension 1 is 10"),
        ((x[0], ids, w), ValueError, "hidden_states: expected 2-D"),
        ((x.astype(np.int32), ids, w), TypeError, "hidden_states: dtype int32"),
        ((x, ids[:3], w), ValueError, "topk_ids: dimension 0 is 3"),
        ((x, ids[:, :1], w), ValueError, "topk_ids: dimension 1"),
        ((x, ids.astype(np.float32), w), TypeError, "topk_ids: dtype float32"),
        ((x, ids, w[:, :1]), ValueError, "topk_weights"),
        ((x, ids, w.astype(np.int64)), TypeError, "topk_weights: dtype int64"),
        ((x[:, ::2].repeat(2, axis=1)[:, ::1][:, :H][::1, :], ids, w), None, None),  # a valid copy: no error
        ((np.asfortranarray(x), ids, w), ValueError, "hidden_states: the last dimension must be contiguous"),
        ((torch.from_numpy(x), ids, w), TypeError, "all be torch tensors or all NumPy"),
        ((torch.empty((4, H), device="meta"), torch.from_numpy(ids), torch.from_numpy(w)), ValueError,
         "hidden_states: tensor on device 'meta'"),
        (("x", ids, w), TypeError, "hidden_states: expected a torch.Tensor"),
        ((torch.from_numpy(x).to_sparse(), torch.from_numpy(ids), torch.from_numpy(w)), ValueError,
         "hidden_states: expected a dense"),
        ((torch.from_numpy(x), torch.from_numpy(ids).to_sparse(), torch.from_numpy(w)), ValueError,
         "topk_ids: expected a dense"),
        ((torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w).to_sparse()), ValueError,
         "topk_weights: expected a dense"),
    ]
    for args, exc, match in cases:
        if exc is None:
            loaded.forward(*args)
            continue
        with pytest.raises(exc, match=match):
            loaded.forward(*args)


def test_out_of_range_ids_are_skipped_not_fatal(loaded):
    x, _, w = make_inputs(3, H, E, K)
    ids = np.array([[-(2 ** 62), 2 ** 62], [E, -1], [2 ** 31 - 1, 0]], np.int64)
    y = loaded.forward(x, ids, w)
    assert not y[0].any() and not y[1].any() and y[2].any()
    y32 = loaded.forward(x, ids.clip(-(2 ** 31), 2 ** 31 - 1).astype(np.int32), w)
    np.testing.assert_array_equal(y, y32)


def test_set_backend_errors():
    with pytest.raises(ValueError, match="unknown kt_kernel backend 'quantum'"):
        kt_kernel.set_backend("quantum")
    for name in kt_kernel._kt_kernel.known_backends():
        if name not in kt_kernel.backends():
            with pytest.raises(ValueError, match=f"'{name}' is not available on this machine"):
                kt_kernel.set_backend(name)
    assert kt_kernel.current_backend() in kt_kernel.backends()


@pytest.mark.parametrize("value", ["2ms", "-5", "1e3", ""])
def test_bad_spin_setting_is_refused_when_the_pool_is_made(monkeypatch, value):
    """KT_KERNEL_SPIN_US (how long idle workers spin, microseconds) is read when the shared pool is
    made: a value that is not a whole number raises, naming the variable; empty means the default."""
    monkeypatch.setenv("KT_KERNEL_SPIN_US", value)
    kt_kernel._pool.reset_pool_for_tests()
    try:
        if value == "":
            make_wrapper(E, K, H, I, "AMXINT8")
        else:
            with pytest.raises(ValueError, match="KT_KERNEL_SPIN_US"):
                make_wrapper(E, K, H, I, "AMXINT8")
    finally:
        monkeypatch.delenv("KT_KERNEL_SPIN_US")
        kt_kernel._pool.reset_pool_for_tests()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_unaligned_dense_weights_load_like_aligned_ones(dtype):
    """Tensors in a safetensors or GGUF file sit at whatever byte offset the file gives them: a source
    misaligned for its dtype loads exactly like an aligned copy (the packer reads it with unaligned
    loads; a typed access is undefined behaviour, which the UBSan run of this suite would flag)."""
    E, K, H, I = 4, 2, 64, 64
    dense = [a.astype(dtype) for a in make_weights(E, H, I, seed=9)]

    def misaligned(a):
        buf = np.zeros(a.nbytes + 1, np.uint8)
        v = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        v[...] = a
        assert v.ctypes.data % a.itemsize
        return v

    aligned, shifted = make_wrapper(E, K, H, I, "AMXINT8"), make_wrapper(E, K, H, I, "AMXINT8")
    aligned.load_weights_from_tensors(*dense)
    shifted.load_weights_from_tensors(*[misaligned(a) for a in dense])
    x = make_inputs(3, H, E, K)
    assert np.array_equal(np.array(aligned.forward(*x)), np.array(shifted.forward(*x)))


def test_physical_to_logical_map_longer_than_num_experts_uses_its_first_entries():
    """An EPLB table with redundant slots (SGLang passes its whole row): the first num_experts entries
    are the slots' experts, as kt-kernel reads it (SGLANG_CONTRACT.md section 3, item 8)."""
    E, K, H, I = 4, 2, 64, 64
    g, u, d = make_weights(6, H, I, seed=3)
    full = np.array([5, 0, 3, 1, 2, 4, 0], np.int64)
    a, b = make_wrapper(E, K, H, I, "AMXINT8"), make_wrapper(E, K, H, I, "AMXINT8")
    a.load_weights_from_tensors(g, u, d, full)
    b.load_weights_from_tensors(g, u, d, full[:E].copy())
    x = make_inputs(5, H, E, K)
    assert np.array_equal(np.array(a.forward(*x)), np.array(b.forward(*x)))
