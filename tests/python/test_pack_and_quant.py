"""The packed-weight contract (pack / unpack round trip, layout version) and the
activation encoders of every backend against their NumPy replica, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import kt_kernel
from reference import BF16, INT4_ASYM, INT4_SYM, INT8, bf16_round, quantize_rows_like_kernel

native = kt_kernel._kt_kernel

# Max |unpack(pack(w)) - w| relative to each quantisation step.
CASES = [
    pytest.param(BF16, 0, id="bf16"),
    pytest.param(INT8, 0, id="int8"),
    pytest.param(INT4_SYM, 0, id="int4-perchannel"),
    pytest.param(INT4_SYM, 32, id="int4-g32"),
    pytest.param(INT4_SYM, 128, id="int4-g128"),
    pytest.param(INT4_ASYM, 32, id="int4-asym-g32"),
]


@pytest.mark.parametrize("scheme,group", CASES)
@pytest.mark.parametrize("rows,cols", [(1, 128), (15, 128), (16, 256), (17, 384), (33, 128)])
def test_pack_unpack_round_trip(scheme, group, rows, cols):
    rng = np.random.default_rng(rows * 7 + cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    packed = native.pack_matrix(scheme, group, w)
    geo = native.packed_geometry(scheme, rows, cols, group)
    assert packed.size == geo["total_bytes"] and geo["total_bytes"] % 64 == 0
    back = native.unpack_matrix(scheme, group, rows, cols, packed)
    if scheme == BF16:
        np.testing.assert_array_equal(back, bf16_round(w))
        return
    g = cols if group == 0 else group
    blocks = w.reshape(rows, cols // g, g)
    if scheme == INT8:
        step = np.abs(w).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5) + 1e-12)
    elif scheme == INT4_SYM:
        step = np.repeat(np.abs(blocks).max(axis=2) / 8, g, axis=1)
        # Nearest level, except the clamped top level (+7 of -8..7) which can be a full step away.
        assert np.all(np.abs(back - w) <= step * (1 + 1e-5))
        assert np.mean(np.abs(back - w) <= step / 2 * (1 + 1e-5)) > 0.9
    else:
        step = np.repeat((blocks.max(axis=2) - blocks.min(axis=2)) / 15, g, axis=1)
        assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-4) + 1e-7)
    if scheme == INT4_ASYM:
        return  # (max - min) / 15 is rounded, so re-quantising may move a value by one level
    # Packing the exact values again reproduces the same quantised values.
    again = native.unpack_matrix(scheme, group, rows, cols,
                                 native.pack_matrix(scheme, group, back.astype(np.float32)))
    np.testing.assert_allclose(again, back, rtol=1e-6, atol=1e-7)


def test_int4_symmetric_levels_are_q4_0():
    """Every group's largest-magnitude element is represented exactly (the -8 level)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    back = native.unpack_matrix(INT4_SYM, 32, 16, 64, native.pack_matrix(INT4_SYM, 32, w))
    for r in range(16):
        for g in range(2):
            blk = w[r, 32 * g:32 * g + 32]
            i = np.argmax(np.abs(blk))
            assert back[r, 32 * g + i] == pytest.approx(blk[i], rel=1e-6)


@pytest.mark.parametrize("bad", [(INT4_SYM, 48, 16, 96), (INT4_SYM, 64, 16, 96), (BF16, 32, 16, 64), (INT8, 0, 0, 64)])
def test_invalid_geometry(bad):
    scheme, group, rows, cols = bad
    with pytest.raises(ValueError):
        native.packed_geometry(scheme, rows, cols, group)


def test_unpack_rejects_wrong_size():
    packed = native.pack_matrix(INT8, 0, np.ones((16, 64), np.float32))
    with pytest.raises(ValueError, match="expected"):
        native.unpack_matrix(INT8, 0, 16, 64, packed[:-64])


@pytest.mark.parametrize("scheme", [BF16, INT8, INT4_SYM])
@pytest.mark.parametrize("k", [1, 17, 64, 100, 384])
def test_activation_encoding_matches_numpy_replica(backend, scheme, k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((9, k)) * rng.uniform(0.01, 100, size=(9, 1))).astype(np.float32)
    x[3] = 0.0  # all-zero row: scale 0, q 0
    x[4, 0] = 1e-30  # denormal-scale row
    kp = (k + 63) // 64 * 64
    data, scale, sums = native.prepare_acts(backend, scheme, x)
    if scheme == BF16:
        got = data.view(np.uint16)[:, :k]
        want = bf16_round(x).view(np.uint32) >> 16
        np.testing.assert_array_equal(got, want.astype(np.uint16))
        assert not data.view(np.uint16)[:, k:kp].any()
        return
    q, s = quantize_rows_like_kernel(x)
    np.testing.assert_array_equal(scale, s)
    if scheme == INT8:
        np.testing.assert_array_equal(data[:, :k].astype(np.int32) - 128, q)
        assert (data[:, k:kp] == 128).all()
    else:
        np.testing.assert_array_equal(data[:, :k].view(np.int8), q)
        assert not data[:, k:kp].any()
        qp = np.zeros((9, kp), np.int32)
        qp[:, :k] = q
        np.testing.assert_array_equal(sums, qp.reshape(9, kp // 32, 32).sum(axis=2))
