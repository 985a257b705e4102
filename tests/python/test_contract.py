"""The CPU side of the INTERFACE.md contract: routing rules, the GPU mask,
torch and NumPy inputs, output dtype, persistent buffers, thread-count and
NUMA-split invariance, internal chunking."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import torch

import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper
from reference import moe_reference, rel_fro_err, rel_max_err

E, K, H, I = 9, 3, 128, 128


@pytest.fixture(scope="module")
def weights():
    return make_weights(E, H, I, seed=7)


def _wrapper(weights, method="AMXINT8", **kw):
    wr = make_wrapper(E, K, H, I, method, **kw)
    wr.load_weights_from_tensors(*weights)
    return wr


def test_constructor_signature_has_contract_names():
    params = inspect.signature(kt_kernel.KTMoEWrapper.__new__).parameters
    required = ["layer_idx", "num_experts", "num_experts_per_tok", "hidden_size", "moe_intermediate_size",
                "gpu_experts_mask", "num_gpu_experts", "cpuinfer_threads", "threadpool_count", "numa_nodes",
                "weight_path", "chunked_prefill_size", "cpu_save", "max_deferred_experts_per_token", "method",
                "mode", "lora_rank", "lora_alpha", "lora_dropout", "max_cache_depth", "group_size", "zero_point",
                "full_weight_grad", "swiglu_limit", "swiglu_alpha"]
    missing = [p for p in required if p not in params]
    assert not missing, missing
    assert not any(p.kind == p.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize("method", ["BF16", "AMXINT8", "AMXINT4"])
def test_skips_masked_negative_and_out_of_range(backend, weights, method):
    x, ids, w = make_inputs(12, H, E, K, invalid_ids=True)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[[1, 4]] = True
    wr = _wrapper(weights, method, gpu_experts_mask=mask)
    y = wr.forward(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w))
    assert kt_kernel.last_used_backend() == backend
    ref = moe_reference(x, ids, w, *weights, skip_mask=mask.numpy())
    budget = {"BF16": 0.02, "AMXINT8": 0.06, "AMXINT4": 0.3}[method]
    assert rel_fro_err(y.numpy(), ref) < budget


def test_rows_without_cpu_expert_are_zero(backend, weights):
    x, ids, w = make_inputs(6, H, E, K)
    ids[2] = -1
    ids[4] = [E, E + 1, -5]
    wr = _wrapper(weights)
    KTW = kt_kernel.KTMoEWrapper
    KTW.set_capture_batch_sizes([6])
    try:
        out = wr.forward(x, ids, w)
        out[:] = np.nan  # poison the persistent buffer: the next call must overwrite every element
        out2 = wr.forward(x, ids, w)
        assert out2 is out
        assert np.isfinite(out2).all()
        assert not out2[2].any() and not out2[4].any()
        assert out2[0].any()
    finally:
        KTW.clear_buffer_cache()
        KTW.set_capture_batch_sizes([])


def _count_full_path_calls(monkeypatch):
    """A list that gains an entry each time forward() takes the full path (submit + sync in one call)."""
    calls = []
    full = kt_kernel._async.forward

    def counted(*a, **kw):
        calls.append(1)
        return full(*a, **kw)

    monkeypatch.setattr(kt_kernel._async, "forward", counted)
    return calls


def test_forward_short_path_gives_the_bits_of_submit_sync(backend, weights, monkeypatch):
    """forward() of CPU torch tensors or NumPy arrays runs the short path (no submit), with the output
    bits of submit_forward + sync_forward, for every layout it takes: fp32 and bf16 states, int64 and
    int32 ids, fp32 and bf16 weights, rows strided inside a wider buffer, a single token."""
    wr = _wrapper(weights)
    xn, idsn, wn = make_inputs(6, H, E, K)
    x32, ids64, w32 = torch.from_numpy(xn), torch.from_numpy(idsn), torch.from_numpy(wn)
    wide = torch.zeros(6, H + 32, dtype=torch.bfloat16)
    wide[:, :H] = x32.to(torch.bfloat16)
    wide_np = np.zeros((6, H + 16), np.float32)
    wide_np[:, :H] = xn
    cases = [(x32, ids64, w32), (x32.to(torch.bfloat16), ids64.to(torch.int32), w32.to(torch.bfloat16)),
             (wide[:, :H], ids64, w32), (x32[:1], ids64[:1], w32[:1]),
             (xn, idsn, wn), (xn.astype(np.float16), idsn.astype(np.int32), wn), (wide_np[:, :H], idsn, wn),
             (xn[:1], idsn[:1], wn[:1])]
    def as_f32(a):  # exact for every output dtype here (fp32, bf16, fp16)
        return a.float().numpy() if isinstance(a, torch.Tensor) else a.astype(np.float32)

    for x, ids, w in cases:
        wr.submit_forward(x, ids, w)
        expected = as_f32(wr.sync_forward(x))
        calls = _count_full_path_calls(monkeypatch)
        y = wr.forward(x, ids, w)
        monkeypatch.undo()
        assert not calls, "forward took the full path"
        assert type(y) is type(x) and y.dtype == x.dtype and tuple(y.shape) == (x.shape[0], H)
        assert np.array_equal(as_f32(y), expected) and np.abs(expected).sum() > 0


def test_forward_short_path_declines_what_it_does_not_take(backend, weights, monkeypatch):
    """Capture batch sizes, mixed kinds and rows that are not contiguous go the full path, which gives
    its results and raises its errors (the short path never decides an input is bad)."""
    wr = _wrapper(weights)
    xn, idsn, wn = make_inputs(5, H, E, K)
    calls = _count_full_path_calls(monkeypatch)
    KTW = kt_kernel.KTMoEWrapper
    KTW.set_capture_batch_sizes([5])
    try:
        y_cap = wr.forward(torch.from_numpy(xn), torch.from_numpy(idsn), torch.from_numpy(wn))
        assert len(calls) == 1
        y_np = wr.forward(xn, idsn, wn)
        assert len(calls) == 2 and np.array_equal(y_cap.numpy(), y_np)
    finally:
        KTW.clear_buffer_cache()
        KTW.set_capture_batch_sizes([])
    x_cols = torch.from_numpy(np.ascontiguousarray(xn.T)).t()  # [5, H] with unit stride down the columns
    with pytest.raises(ValueError, match="hidden_states: the last dimension must be contiguous"):
        wr.forward(x_cols, torch.from_numpy(idsn), torch.from_numpy(wn))
    with pytest.raises(ValueError, match="hidden_states: the last dimension must be contiguous"):
        wr.forward(np.asfortranarray(xn), idsn, wn)
    with pytest.raises(ValueError, match="topk_ids: dimension 1 is 2"):
        wr.forward(torch.from_numpy(xn), torch.from_numpy(idsn[:, :2]), torch.from_numpy(wn))
    with pytest.raises(TypeError, match="topk_weights: dtype int64"):
        wr.forward(torch.from_numpy(xn), torch.from_numpy(idsn), torch.from_numpy(idsn))
    with pytest.raises(TypeError, match="hidden_states: dtype float64"):
        wr.forward(xn.astype(np.float64), idsn, wn)
    with pytest.raises(TypeError, match="all be torch tensors or all NumPy"):
        wr.forward(torch.from_numpy(xn), idsn, wn)
    with pytest.raises(ValueError, match="hidden_states: rows overlap"):
        wr.forward(np.lib.stride_tricks.as_strided(xn, (5, H), (4 * (H // 2), 4)), idsn, wn)
    assert len(calls) == 9


def test_mask_updated_in_place_is_honoured(backend, weights):
    x, ids, w = make_inputs(8, H, E, K)
    wr = _wrapper(weights)
    mask_obj = wr.gpu_experts_mask
    y_all = np.array(wr.forward(x, ids, w))
    wr.gpu_experts_mask.copy_(torch.ones(E, dtype=torch.bool)) if isinstance(mask_obj, torch.Tensor) else None
    assert wr.gpu_experts_mask is mask_obj
    y_none = np.array(wr.forward(x, ids, w))
    assert not y_none.any()
    mask_obj[:] = False
    mask_obj[ids[0, 0]] = True
    y_part = wr.forward(x, ids, w)
    ref_all = moe_reference(x, ids, w, *weights)
    ref_part = moe_reference(x, ids, w, *weights, skip_mask=np.asarray(mask_obj))
    assert rel_fro_err(y_all, ref_all) < 0.06
    assert rel_fro_err(y_part, ref_part) < 0.06


def test_mask_replaced_or_reshaped_is_checked_again(backend, weights):
    """The mask's address is validated once per object and layout (not every call): a new object,
    or the same one resized, is checked again before the next call reads it."""
    x, ids, w = make_inputs(8, H, E, K)
    wr = _wrapper(weights)
    wr.forward(x, ids, w)
    wr.gpu_experts_mask = torch.ones(E, dtype=torch.bool)  # a new object: honoured
    assert not np.asarray(wr.forward(x, ids, w)).any()
    wr.gpu_experts_mask = np.zeros(E, bool)  # NumPy works as well
    assert rel_fro_err(wr.forward(x, ids, w), moe_reference(x, ids, w, *weights)) < 0.06
    wr.gpu_experts_mask = torch.zeros(E + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="gpu_experts_mask"):
        wr.forward(x, ids, w)
    good = torch.zeros(E, dtype=torch.bool)
    wr.gpu_experts_mask = good
    wr.forward(x, ids, w)
    good.resize_(2)  # the same object, now too short for the ids that the layer reads
    with pytest.raises(ValueError, match="gpu_experts_mask"):
        wr.forward(x, ids, w)
    wr.gpu_experts_mask = torch.zeros(E, dtype=torch.int32)
    with pytest.raises(TypeError, match="gpu_experts_mask"):
        wr.forward(x, ids, w)


def test_legacy_num_gpu_experts_prefix(backend, weights):
    x, ids, w = make_inputs(8, H, E, K)
    wr = _wrapper(weights, num_gpu_experts=3)
    assert np.asarray(wr.gpu_experts_mask).tolist() == [True] * 3 + [False] * (E - 3)
    y = wr.forward(x, ids, w)
    ref = moe_reference(x, ids, w, *weights, skip_mask=np.arange(E) < 3)
    assert rel_fro_err(y, ref) < 0.06
    # A mask wins over the count.
    mask = torch.zeros(E, dtype=torch.bool)
    wr2 = _wrapper(weights, gpu_experts_mask=mask, num_gpu_experts=3)
    assert wr2.gpu_experts_mask is mask


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids_dt", [torch.int32, torch.int64])
def test_torch_dtypes(backend, weights, xdt, ids_dt):
    x, ids, w = make_inputs(5, H, E, K)
    xt = torch.from_numpy(x).to(xdt)
    wr = _wrapper(weights, "BF16")
    y = wr.forward(xt, torch.from_numpy(ids).to(ids_dt), torch.from_numpy(w))
    assert isinstance(y, torch.Tensor) and y.dtype == xdt and y.shape == (5, H)
    ref = moe_reference(xt.float().numpy(), ids, w, *weights)
    assert rel_fro_err(y.float().numpy(), ref) < 0.02


def test_numpy_and_torch_agree_and_strided_rows(backend, weights):
    x, ids, w = make_inputs(7, H, E, K)
    wr = _wrapper(weights)
    y_np = wr.forward(x, ids, w)
    assert isinstance(y_np, np.ndarray) and y_np.dtype == np.float32
    big = np.zeros((7, H + 32), np.float32)
    big[:, 16:16 + H] = x
    y_view = wr.forward(big[:, 16:16 + H], ids, w)  # rows strided by H + 32
    y_t = wr.forward(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(y_np, y_view)
    np.testing.assert_array_equal(y_np, y_t)


@pytest.mark.parametrize("method,kw", [("AMXINT8", {}), ("AMXINT4", {"group_size": 32}), ("BF16", {})])
def test_thread_counts_and_numa_split_agree(backend, weights, fresh_pool, method, kw):
    """1, 2 and 3 threads give identical results; a 2-sub-pool split (simulated on one
    node) gives the same result up to float32 summation order."""
    x, ids, w = make_inputs(11, H, E, K)
    results = []
    for threads in (1, 2, 3):
        kt_kernel._pool.reset_pool_for_tests()
        results.append(np.array(_wrapper(weights, method, threads=threads, **kw).forward(x, ids, w)))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    kt_kernel._pool.reset_pool_for_tests()
    # I = 128 fits one 128-column slice, so use a wider layer for a real split.
    E2, I2 = 5, 384
    g, u, d = make_weights(E2, H, I2, seed=3)
    x2, ids2, w2 = make_inputs(9, H, E2, 2)
    ys = []
    for pools in (1, 2):
        kt_kernel._pool.reset_pool_for_tests()
        wr = make_wrapper(E2, 2, H, I2, method, threads=2, pools=pools, **kw)
        wr.load_weights_from_tensors(g, u, d)
        if pools == 2:
            assert wr._layer.slice_range(0) == (0, 128) and wr._layer.slice_range(1) == (128, 384)
        ys.append(np.array(wr.forward(x2, ids2, w2)))
    assert rel_max_err(ys[1], ys[0]) < 1e-6


def test_large_batch_is_chunked_internally(backend, weights):
    """More tokens than one internal pass (at most 4096) and than chunked_prefill_size: same as row by row."""
    T = 4500
    x, ids, w = make_inputs(T, H, E, K, seed=5)
    wr = _wrapper(weights, chunked_prefill_size=512)
    y = wr.forward(x, ids, w)
    parts = np.concatenate([wr.forward(x[i:i + 1000], ids[i:i + 1000], w[i:i + 1000]) for i in range(0, T, 1000)])
    np.testing.assert_array_equal(y, parts)


def test_zero_tokens_and_all_tokens_on_one_expert(backend, weights):
    wr = _wrapper(weights)
    y0 = wr.forward(np.zeros((0, H), np.float32), np.zeros((0, K), np.int64), np.zeros((0, K), np.float32))
    assert y0.shape == (0, H)
    x, _, w = make_inputs(33, H, E, K)
    ids = np.full((33, K), 4, np.int64)
    y = wr.forward(x, ids, w)
    assert rel_fro_err(y, moe_reference(x, ids, w, *weights)) < 0.06


def test_physical_to_logical_map(backend):
    g, u, d = make_weights(4, H, I, seed=11)
    phys = np.array([3, 0, 0, 2, 1, 3], np.int64)  # 6 slots over 4 logical experts (redundant copies)
    wr = make_wrapper(6, 2, H, I, "BF16")
    wr.load_weights_from_tensors(g, u, d, torch.from_numpy(phys))
    x, ids, w = make_inputs(10, H, 6, 2)
    y = wr.forward(x, ids, w)
    ref = moe_reference(x, phys[ids], w, g, u, d)
    assert rel_fro_err(y, ref) < 0.02


def test_submit_sync_pairing(backend, weights):
    x, ids, w = make_inputs(4, H, E, K)
    wr = _wrapper(weights)
    ids_t = torch.from_numpy(ids.copy())
    wr.submit_forward(x, ids_t.numpy(), w, 0)
    ids_t.fill_(0)  # the caller overwrites ids right after submit: must not matter
    y = wr.sync_forward(x, 0)
    np.testing.assert_array_equal(y, wr.forward(x, ids, w))
    with pytest.raises(RuntimeError, match="without submit_forward"):
        wr.sync_forward(x, 0)
    wr.submit_forward(x, ids, w)
    with pytest.raises(RuntimeError, match="twice"):
        wr.submit_forward(x, ids, w)
    wr.sync_forward(x)


def test_generate_gpu_experts_masks():
    freq = torch.tensor([[5.0, 1.0, 3.0], [4.0, 9.0, 0.0]])
    m = kt_kernel.generate_gpu_experts_masks(freq, 3)
    assert m.dtype == torch.bool and m.tolist() == [[True, False, False], [True, True, False]]
    assert not kt_kernel.generate_gpu_experts_masks(freq, -2).any()
    assert kt_kernel.generate_gpu_experts_masks(freq, 100).all()
    m_np = kt_kernel.generate_gpu_experts_masks(freq.numpy(), 2)
    assert isinstance(m_np, np.ndarray) and m_np.sum() == 2 and m_np[1, 1] and m_np[0, 0]
    ties = kt_kernel.generate_gpu_experts_masks(np.ones((2, 2)), 1)
    assert ties.tolist() == [[True, False], [False, False]]


def test_phase_times_account_for_passes_and_reset(backend, weights):
    """phase_times counts every internal pass (a call over more tokens than one pass runs several)
    and the time of each step; reset starts from zero."""
    wr = _wrapper(weights)
    x, ids, w = make_inputs(5, H, E, K)
    kt_kernel.phase_times(reset=True)
    t0 = time.perf_counter()
    wr.forward(x, ids, w)
    wall = time.perf_counter() - t0
    pt = kt_kernel.phase_times(reset=True)
    assert pt["passes"] == 1
    steps = [pt[s] for s in ("routing", "encode_x", "gate_up", "encode_h", "down", "combine")]
    assert all(v >= 0 for v in steps) and pt["gate_up"] > 0 and pt["down"] > 0
    assert sum(steps) <= wall  # the steps are parts of the call
    assert kt_kernel.phase_times()["passes"] == 0
    big = make_inputs(9000, H, E, K)  # over the largest pass (4096 tokens): 3 even passes
    wr.forward(*big)
    assert kt_kernel.phase_times()["passes"] == 3
