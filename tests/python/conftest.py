"""Shared fixtures: every test that computes runs once per available backend,
and asserts that this backend is the one that ran."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import kt_kernel  # noqa: E402
from kt_kernel import _pool  # noqa: E402

BACKENDS = kt_kernel.backends()


def pytest_report_header(config):
    return [f"kt_kernel backends covered: {', '.join(BACKENDS)}",
            f"not available here: {', '.join(b for b in kt_kernel._kt_kernel.known_backends() if b not in BACKENDS)}"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    kt_kernel.set_backend(request.param)
    yield request.param
    kt_kernel.set_backend("")


@pytest.fixture
def fresh_pool():
    """Drop the process-wide pool so the next wrapper creates one with its own thread count."""
    _pool.reset_pool_for_tests()
    yield
    _pool.reset_pool_for_tests()


def make_weights(E, H, I, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(dtype)
    u = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(dtype)
    d = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(dtype)
    return g, u, d


def make_inputs(T, H, E, k, seed=1, invalid_ids=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64) if T else np.zeros((0, k), np.int64)
    if invalid_ids and T:
        ids[rng.random((T, k)) < 0.2] = -1
        ids[rng.random((T, k)) < 0.1] = E + 3
    w = rng.random((T, k)).astype(np.float32)
    return x, ids, w


def make_wrapper(E, k, H, I, method="BF16", threads=2, pools=1, **kw):
    return kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                                  moe_intermediate_size=I, cpuinfer_threads=threads, threadpool_count=pools,
                                  numa_nodes=[0] * pools, method=method, **kw)
