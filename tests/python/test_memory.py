"""One packed copy of the weights: a loaded layer holds exactly the packed
bytes of its experts (the same bytes serve every backend, AMX tiles and
AVX-512 alike), and loading does not keep a second copy in RAM."""

from __future__ import annotations

import numpy as np
import pytest

import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper

native = kt_kernel._kt_kernel


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("method,scheme,group", [("BF16", 0, 0), ("AMXINT8", 1, 0), ("AMXINT4", 2, 128)])
def test_packed_bytes_is_one_copy(method, scheme, group):
    E, H, I = 6, 256, 384
    wr = make_wrapper(E, 2, H, I, method, group_size=group if scheme == 2 else None)
    wr.load_weights_from_tensors(*make_weights(E, H, I))
    gate = native.packed_geometry(scheme, I, H, group)["total_bytes"]
    down = native.packed_geometry(scheme, H, I, group)["total_bytes"]
    assert wr.packed_bytes == E * (2 * gate + down)
    # Every backend computes from those same bytes: switching backends allocates nothing.
    x, ids, w = make_inputs(40, H, E, 2)
    outs = []
    for b in kt_kernel.backends():
        kt_kernel.set_backend(b)
        outs.append(np.array(wr.forward(x, ids, w)))
        assert kt_kernel.last_used_backend() == b
        assert wr.packed_bytes == E * (2 * gate + down)
    kt_kernel.set_backend("")


def test_resident_memory_grows_by_one_packed_copy():
    """Load a ~100 MB INT8 layer from fp16 weights and free the source: the
    process keeps about packed_bytes more, not a second copy."""
    E, H, I = 16, 2048, 1024
    rng = np.random.default_rng(0)
    shapes = [(E, I, H), (E, I, H), (E, H, I)]
    src = [rng.standard_normal(s, dtype=np.float32).astype(np.float16) for s in shapes]
    wr = make_wrapper(E, 2, H, I, "AMXINT8")
    before = _rss_bytes()
    wr.load_weights_from_tensors(*src)
    del src
    x, ids, w = make_inputs(64, H, E, 2)
    for b in kt_kernel.backends():  # touch every backend's path over the same weights
        kt_kernel.set_backend(b)
        wr.forward(x, ids, w)
    kt_kernel.set_backend("")
    grown = _rss_bytes() - before + 3 * E * H * I * 2  # the freed fp16 source was counted in `before`
    assert wr.packed_bytes > 96 * 2**20
    assert grown < 1.25 * wr.packed_bytes + 64 * 2**20, (grown, wr.packed_bytes)
