"""Activation counting in the layer task, and the placement helpers."""

from __future__ import annotations

import numpy as np
import pytest

import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper
from kt_kernel.placement import balance_gpu_experts, collect_activation_counts

E, K, H, I = 12, 3, 64, 128


def test_activation_counts_match_ids_and_include_gpu_experts():
    mask = np.zeros(E, bool)
    mask[[0, 5]] = True
    layers = []
    for li in range(2):
        wr = make_wrapper(E, K, H, I, "BF16", gpu_experts_mask=mask)
        wr.load_weights_from_tensors(*make_weights(E, H, I, seed=li))
        layers.append(wr)
    assert not layers[0].activation_counts().any()  # off by default
    for wr in layers:
        wr.enable_activation_counting()
    expect = np.zeros((2, E), np.int64)
    for step in range(5):
        for li, wr in enumerate(layers):
            x, ids, w = make_inputs(7, H, E, K, seed=10 * step + li, invalid_ids=True)
            wr.forward(x, ids, w)
            valid = ids[(ids >= 0) & (ids < E)]
            expect[li] += np.bincount(valid, minlength=E)
    counts = collect_activation_counts(layers)
    assert counts.dtype == np.int64 and np.array_equal(counts, expect)
    assert counts[:, [0, 5]].sum() > 0  # GPU-resident experts are counted too
    layers[0].reset_activation_counts()
    assert not layers[0].activation_counts().any()


def test_balance_even_split_and_hottest_per_layer():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, size=(4, 16))
    counts[0] += 10_000  # a hot layer would take everything in a global top-n
    glob = kt_kernel.generate_gpu_experts_masks(counts.astype(np.float64), 10)
    assert glob[0].sum() == 10
    m = balance_gpu_experts(counts, 10)
    per = m.sum(axis=1)
    assert m.sum() == 10 and per.max() - per.min() <= 1 and per.max() == 3
    for l in range(4):  # each layer's chosen experts are its hottest
        chosen, rest = counts[l][m[l]], counts[l][~m[l]]
        assert chosen.min() >= rest.max()
    # The remainder goes where it covers the most activations: the hot layer.
    assert per[0] == 3


def test_balance_caps_bounds_and_torch():
    torch = pytest.importorskip("torch")
    counts = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5)
    m = balance_gpu_experts(counts, 100)
    assert isinstance(m, torch.Tensor) and bool(m.all())
    m = balance_gpu_experts(counts.numpy(), 6, max_per_layer=4, min_per_layer=2)
    assert m.sum() == 6 and list(m.sum(axis=1)) == [2, 4]
    assert not balance_gpu_experts(counts.numpy(), 0).any()
    with pytest.raises(ValueError, match="min_per_layer"):
        balance_gpu_experts(counts.numpy(), 2, min_per_layer=2)
