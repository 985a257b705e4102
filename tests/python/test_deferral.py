"""Expert deferral (INTERFACE.md): with max_deferred_experts_per_token = d, each
token's d lowest-weight CPU experts run as a second task whose output lands in
the next layer's output. d = 0 is bit-identical to no deferral; over two
layers the deferred total equals the undeferred one."""

from __future__ import annotations

import numpy as np
import pytest

import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper

E, K, H, I = 10, 4, 128, 256


@pytest.fixture(scope="module")
def weights():
    return [make_weights(E, H, I, seed=s) for s in (5, 6)]


def _layer(weights, idx, d, method="AMXINT8", **kw):
    wr = make_wrapper(E, K, H, I, method, max_deferred_experts_per_token=d, **kw)
    wr.layer_idx = idx
    wr.load_weights_from_tensors(*weights[idx])
    return wr


def _split(ids, w, d, mask=None):
    """ids of the main pairs and of the deferred pairs (-1 elsewhere): each token's d lowest-weight CPU
    pairs are deferred, ties going to the later k position."""
    main, deferred = ids.copy(), np.full_like(ids, -1)
    for t in range(ids.shape[0]):
        cpu = [j for j in range(ids.shape[1])
               if 0 <= ids[t, j] < E and not (mask is not None and mask[ids[t, j]])]
        cpu.sort(key=lambda j: (w[t, j], -j))
        for j in cpu[:d]:
            deferred[t, j], main[t, j] = ids[t, j], -1
    return main, deferred


@pytest.mark.parametrize("method", ["BF16", "AMXINT8", "AMXINT4"])
def test_d0_is_bit_identical(backend, weights, method):
    x, ids, w = make_inputs(13, H, E, K, seed=2, invalid_ids=True)
    a = np.array(_layer(weights, 0, None, method).forward(x, ids, w))
    b = np.array(_layer(weights, 0, 0, method).forward(x, ids, w))
    assert np.array_equal(a, b)
    assert kt_kernel.last_used_backend() == backend


@pytest.mark.parametrize("d", [1, 2, K])
def test_two_layers_deferred_equals_undeferred(backend, weights, d):
    x, ids, w = make_inputs(17, H, E, K, seed=3, invalid_ids=True)
    w[0, :] = 0.5  # ties
    mask = np.zeros(E, bool)
    mask[[2, 7]] = True  # GPU experts are not among the deferred ones
    ref0 = np.array(_layer(weights, 0, 0, gpu_experts_mask=mask).forward(x, ids, w))
    ref1 = np.array(_layer(weights, 1, 0, gpu_experts_mask=mask).forward(x, ids, w))
    l0, l1 = _layer(weights, 0, d, gpu_experts_mask=mask), _layer(weights, 1, 0, gpu_experts_mask=mask)
    l0.submit_forward(x, ids, w)
    y0 = np.array(l0.sync_forward(x))
    l1.submit_forward(x, ids, w)
    y1 = np.array(l1.sync_forward(x))
    # Sum over the two layers: equal up to float summation order.
    np.testing.assert_allclose(y0 + y1, ref0 + ref1, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y0, ref0)  # something was deferred
    # Exactly: layer 0 computed its main pairs; layer 1 added layer 0's deferred pairs in fp32.
    main, deferred = _split(ids, w, d, mask)
    plain0 = _layer(weights, 0, 0, gpu_experts_mask=mask)
    assert np.array_equal(y0, np.array(plain0.forward(x, main, w)))
    assert np.array_equal(y1, ref1 + np.array(plain0.forward(x, deferred, w)))
    assert kt_kernel.last_used_backend() == backend


def test_chain_of_layers_and_bf16_output(weights):
    """Three layers, the first two deferring: each layer's output carries the previous one's deferred part."""
    torch = pytest.importorskip("torch")
    x, ids, w = make_inputs(9, H, E, K, seed=4)
    xt, idt, wt = torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(ids), torch.from_numpy(w)
    layers = [_layer(weights, i % 2, d) for i, d in enumerate((2, 1, 0))]
    plain = [_layer(weights, i % 2, 0) for i in range(3)]
    for i, wr in enumerate(layers):
        wr.layer_idx = i  # a consumer is a later layer
    total = sum(p.forward(xt, idt, wt).float() for p in plain)
    got = sum(l.forward(xt, idt, wt).float() for l in layers)
    assert got.dtype == torch.float32
    rel = float((got - total).norm() / total.norm())
    assert rel < 2e-2, rel  # each output is rounded to bf16 once, at a different split


def test_stream_mode_deferral_matches_cpu_mode(weights):
    import fake_cuda

    fake = fake_cuda.get()
    if kt_kernel._kt_kernel.cuda_runtime_path() != fake.path:
        pytest.skip("a real CUDA runtime is loaded in this process")
    S = 0x6101
    x, ids, w = make_inputs(6, H, E, K, seed=8)
    cpu = [_layer(weights, i, d) for i, d in ((0, 1), (1, 0))]
    ys_cpu = [np.array(l.forward(x, ids, w)) for l in cpu]
    st = [_layer(weights, i, d) for i, d in ((0, 1), (1, 0))]
    ys = [l.forward(x, ids, w, S) for l in st]
    fake.wait_idle(S)
    for a, b in zip(ys, ys_cpu):
        assert np.array_equal(a, b)


def test_deferral_larger_than_top_k_is_rejected(weights):
    with pytest.raises(ValueError, match="max_deferred_experts_per_token"):
        make_wrapper(E, K, H, I, "BF16", max_deferred_experts_per_token=K + 1)


@pytest.mark.parametrize("stream", [0, 0x6202])
def test_deferral_with_layers_of_one_parity(weights, stream):
    """MoE layers 3, 5, 7 (every other layer, as with decoder_sparse_step = 2) share one staging set: the
    deferred task of layer 3 must finish reading it before layer 5's inputs overwrite it."""
    if stream:
        import fake_cuda

        fake = fake_cuda.get()
        if kt_kernel._kt_kernel.cuda_runtime_path() != fake.path:
            pytest.skip("a real CUDA runtime is loaded in this process")
    xs = [make_inputs(11, H, E, K, seed=20 + i) for i in range(3)]
    deferred = [_layer(weights, i % 2, d) for i, d in enumerate((2, 1, 0))]
    plain = [_layer(weights, i % 2, 0) for i in range(3)]
    for wr, idx in zip(deferred + plain, (3, 5, 7) * 2):
        wr.layer_idx = idx
    got = [wr.forward(*inp, stream) for wr, inp in zip(deferred, xs)]
    if stream:
        fake.wait_idle(stream)
    ref = [np.array(wr.forward(*inp)) for wr, inp in zip(plain, xs)]
    np.testing.assert_allclose(sum(got), sum(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [0, 2])
def test_forward_while_another_layer_is_pending(backend, weights, d):
    """forward() runs a layer on the calling thread only when no other layer task is queued; with
    layer 0 submitted but not synced, layer 1's forward goes behind it and both results are exact."""
    x, ids, w = make_inputs(11, H, E, K, seed=7)
    x2, ids2, w2 = make_inputs(11, H, E, K, seed=8)
    ref0 = np.array(_layer(weights, 0, 0).forward(x, ids, w))
    ref1 = np.array(_layer(weights, 1, 0).forward(x2, ids2, w2))
    l0, l1 = _layer(weights, 0, d), _layer(weights, 1, 0)
    l0.submit_forward(x, ids, w)
    y1 = np.array(l1.forward(x2, ids2, w2))
    y0 = np.array(l0.sync_forward(x))
    if d == 0:
        assert np.array_equal(y0, ref0)
        assert np.array_equal(y1, ref1)
    else:  # layer 1 carries layer 0's deferred pairs
        main, deferred = _split(ids, w, d)
        plain0 = _layer(weights, 0, 0)
        assert np.array_equal(y0, np.array(plain0.forward(x, main, w)))
        assert np.array_equal(y1, ref1 + np.array(plain0.forward(x, deferred, w)))
    assert kt_kernel.last_used_backend() == backend
