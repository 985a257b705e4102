"""NaN and Inf propagate through every format (issue 23): the policy of
docs/DESIGN_NOTES.md ("Non-finite values"), checked through the public API.

  * A non-finite value in a token's row of hidden_states makes that token's
    whole output non-finite: NaN for the integer formats, whose activation
    encoding gives the row a NaN scale, and for a NaN in any format; an Inf
    in BF16/FP8 (bf16 activations) follows IEEE arithmetic. Every other token
    of the call is bit-identical to a run where that row is finite.
  * A non-finite weight makes the outputs that depend on it non-finite (the
    quantisers give its row or group a NaN scale): gate/up -> every output of
    the tokens routed to that expert; down row n -> column n of those tokens.
    Everything else is bit-identical to a load of the clean weights.
  * The clamped "swigluoai" activation propagates NaN (torch.clamp does)
    instead of replacing it by the clamp's bound.

Each case runs in its own interpreter with a timeout, so a crash fails the
test instead of the run; each covers every available backend.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

FORMATS = {
    "bf16": ("BF16", {}),
    "int8": ("AMXINT8", {}),
    "int8-g32": ("AMXINT8", {"_int8_group": 32}),
    "int4-g32": ("AMXINT4", {"group_size": 32}),
    "int4-perchannel": ("AMXINT4", {"group_size": 0}),
    "int4-asym-g64": ("AMXINT4", {"group_size": 64, "zero_point": True}),
    "int4-asym-perchannel": ("AMXINT4", {"group_size": 0, "zero_point": True}),
    "fp8": ("FP8", {}),
}
E, K, H, I, T = 4, 2, 128, 128, 6


def _in_subprocess(call: str) -> None:
    """Runs `call` (an expression over this module, imported as m) in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in sys.path if p])
    code = f"import test_nonfinite as m; {call}; print('OK')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (
        f"{call} exited with {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}")


def _wrapper(method, kw, g, u, d):
    from conftest import make_wrapper
    from kt_kernel.wrapper import SCHEME_INT8_GROUP

    kw = dict(kw)
    int8_group = kw.pop("_int8_group", None)
    wr = make_wrapper(E, K, H, I, method, **kw)
    if int8_group:
        wr._rebuild_layer(int8_group, SCHEME_INT8_GROUP)
    wr.load_weights_from_tensors(g, u, d)
    return wr


def _integer(method) -> bool:
    return method in ("AMXINT8", "AMXINT4", "FP8")  # FP8: the group scale of a bad weight is NaN too


def _forward(wr, x, ids, w):
    return np.array(wr.forward(x, ids, w), dtype=np.float32, copy=True)  # the wrapper reuses its output buffer


def _same_bits(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _inputs():
    from conftest import make_inputs, make_weights

    g, u, d = make_weights(E, H, I, seed=23)
    x, ids, w = make_inputs(T, H, E, K, seed=5)
    w[0, 1] = 0.0  # a zero routing weight still multiplies its expert's output: 0 * NaN stays NaN
    return g, u, d, x, ids, w


def check_input(name: str) -> None:
    import kt_kernel

    method, kw = FORMATS[name]
    g, u, d, x, ids, w = _inputs()
    bad_rows = (0, 2, 5)
    for be in kt_kernel.backends():
        kt_kernel.set_backend(be)
        wr = _wrapper(method, kw, g, u, d)
        clean = _forward(wr, x, ids, w)
        assert np.isfinite(clean).all()
        for bad in (np.nan, np.inf, -np.inf):
            xb = x.copy()
            xb[0, 0] = bad        # first column
            xb[2, 37] = bad       # inside a 32-float chunk
            xb[5, H - 1] = bad    # last column
            y = _forward(wr, xb, ids, w)
            assert kt_kernel.last_used_backend() == be
            for t in range(T):
                if t in bad_rows:
                    if method in ("AMXINT8", "AMXINT4") or np.isnan(bad):
                        assert np.isnan(y[t]).all(), f"{be} {name} x={bad}: token {t} has non-NaN outputs"
                    else:
                        assert not np.isfinite(y[t]).any(), f"{be} {name} x={bad}: token {t} has finite outputs"
                else:
                    assert _same_bits(y[t], clean[t]), f"{be} {name} x={bad}: token {t} changed"
        # A finite input whose intermediate overflows (|gate * up| > FLT_MAX): non-finite, not laundered.
        xb = x.copy()
        xb[3] *= np.float32(1e25)
        y = _forward(wr, xb, ids, w)
        assert not np.isfinite(y[3]).all(), f"{be} {name}: an overflowing intermediate came out finite"
        for t in range(T):
            if t != 3:
                assert _same_bits(y[t], clean[t])
    kt_kernel.set_backend("")


def check_weight(name: str) -> None:
    import kt_kernel

    method, kw = FORMATS[name]
    g, u, d, x, ids, w = _inputs()
    e, n, c = 1, 5, 9
    routed = [t for t in range(T) if e in ids[t]]
    assert routed and len(routed) < T
    for be in kt_kernel.backends():
        kt_kernel.set_backend(be)
        clean = _forward(_wrapper(method, kw, g, u, d), x, ids, w)
        for which, bad in (("gate", np.nan), ("up", np.inf), ("down", np.nan), ("down", -np.inf)):
            gb, ub, db = g.copy(), u.copy(), d.copy()
            {"gate": gb, "up": ub, "down": db}[which][e, n, c] = bad
            y = _forward(_wrapper(method, kw, gb, ub, db), x, ids, w)
            what = f"{be} {name} {which}[{e}][{n}, {c}] = {bad}"
            for t in range(T):
                if t not in routed:
                    assert _same_bits(y[t], clean[t]), f"{what}: token {t} (not routed to {e}) changed"
                    continue
                bad_cols = np.arange(H) if which != "down" else np.array([n])
                ok_cols = np.setdiff1d(np.arange(H), bad_cols)
                if _integer(method) or np.isnan(bad):
                    assert np.isnan(y[t, bad_cols]).all(), f"{what}: token {t} has non-NaN outputs"
                else:
                    assert not np.isfinite(y[t, bad_cols]).any(), f"{what}: token {t} has finite outputs"
                assert _same_bits(y[t, ok_cols], clean[t, ok_cols]), f"{what}: token {t}'s other columns changed"
    kt_kernel.set_backend("")


def check_swiglu_limit() -> None:
    """GPT-OSS's clamps (torch.clamp) propagate NaN; fmin/fmax-style clamps made it the bound."""
    import kt_kernel
    from conftest import make_inputs, make_weights, make_wrapper

    g, u, d = make_weights(E, H, I, seed=7)
    x, ids, w = make_inputs(T, H, E, K, seed=8)
    for be in kt_kernel.backends():
        kt_kernel.set_backend(be)
        for method in ("BF16", "AMXINT8", "AMXINT4"):
            wr = make_wrapper(E, K, H, I, method, swiglu_limit=0.5, swiglu_alpha=1.702)
            wr.load_weights_from_tensors(g, u, d)
            clean = _forward(wr, x, ids, w)
            xb = x.copy()
            xb[1, 3] = np.nan
            y = _forward(wr, xb, ids, w)
            assert np.isnan(y[1]).all(), f"{be} {method}: NaN laundered by the swiglu clamps"
            assert _same_bits(np.delete(y, 1, 0), np.delete(clean, 1, 0))
    kt_kernel.set_backend("")


def check_encoder() -> None:
    """prepare_acts of every backend: a row with a non-finite element gets scale NaN and the
    contract's codes (non-finite -> 127, finite -> 0, as with inv = 0), bit-identical across
    backends and to reference.quantize_rows_like_kernel; finite rows are unchanged."""
    import kt_kernel
    from kt_kernel import _kt_kernel
    from reference import quantize_rows_like_kernel

    rng = np.random.default_rng(3)
    for k in (64, 100, 200):
        x = rng.standard_normal((12, k)).astype(np.float32)
        x[1, 0] = np.nan
        x[2, k - 1] = np.inf
        x[3, k // 2] = -np.inf
        x[4, :] = np.nan
        x[5, 7] = np.nan
        x[5, 8] = np.inf
        x[6, :] = 0.0
        x[6, 33] = np.nan                    # a zero row but for one NaN
        x[7, 3] = np.float32(3e38)           # finite, near FLT_MAX: still an ordinary row
        x[8, 5] = np.float32(1e-40)          # subnormal amax ...
        x[8, np.arange(k) != 5] = 0.0        # ... for the whole row
        bad = np.zeros(len(x), bool)
        bad[[1, 2, 3, 4, 5, 6]] = True
        q_ref, s_ref = quantize_rows_like_kernel(x)
        assert np.isnan(s_ref[bad]).all() and np.isfinite(s_ref[~bad]).all()
        for scheme in (1, 2, 3, 4):  # INT8, INT4 sym/asym (s8 + sums), INT8 grouped
            first = None
            for be in kt_kernel.backends():
                data, scale, sums = (np.asarray(a) for a in _kt_kernel.prepare_acts(be, scheme, x))
                codes = data[:, :k].view(np.int8) if scheme in (2, 3) else (data[:, :k].astype(np.int16) - 128)
                assert np.array_equal(codes, q_ref.astype(np.int16)), f"{be} scheme {scheme} k={k}: codes"
                assert np.isnan(scale[bad]).all(), f"{be} scheme {scheme} k={k}: a non-finite row kept a finite scale"
                assert _same_bits(scale[~bad], s_ref[~bad]), f"{be} scheme {scheme} k={k}: finite rows' scales"
                if first is None:
                    first = (data, sums)
                else:
                    assert np.array_equal(data, first[0]) and np.array_equal(sums, first[1]), be
                # A bad row does not change its neighbours: each finite row encodes as it does alone.
                for r in np.flatnonzero(~bad):
                    d1, s1, g1 = (np.asarray(a) for a in _kt_kernel.prepare_acts(be, scheme, x[r:r + 1]))
                    assert np.array_equal(d1[0], data[r]) and s1[0] == scale[r] and np.array_equal(g1[0], sums[r])


def check_weight_quantisers() -> None:
    """quantize_matrix and pack_matrix (the converter's and the loader's quantisers): a row
    (per channel) or group holding NaN/Inf gets a NaN scale; others are unchanged."""
    from kt_kernel import _kt_kernel

    rng = np.random.default_rng(4)
    w = rng.standard_normal((20, 256)).astype(np.float32)
    cases = [(1, 0), (4, 32), (2, 0), (2, 64), (3, 0), (3, 32), (5, 128)]  # (scheme, group)
    for scheme, group in cases:
        q0, s0, m0 = _kt_kernel.quantize_matrix(scheme, group, w, False)
        for bad in (np.nan, np.inf, -np.inf):
            wb = w.copy()
            wb[3, 70] = bad
            for search in ((False, True) if scheme in (2, 3) else (False,)):
                q, s, m = _kt_kernel.quantize_matrix(scheme, group, wb, search)
                q0s, s0s, _ = _kt_kernel.quantize_matrix(scheme, group, w, search)
                gs = group or 256
                gi = 70 // gs if scheme != 1 else 0
                assert np.isnan(s[3, gi]), f"scheme {scheme} group {group} w={bad}: scale {s[3, gi]}"
                mask = np.ones(s.shape, bool)
                mask[3, gi] = False
                assert np.array_equal(s[mask], s0s[mask]), f"scheme {scheme} group {group}: other scales changed"
                if m is not None:
                    assert np.isnan(m[3, gi])
            packed = _kt_kernel.pack_matrix(scheme, group, wb)
            back = _kt_kernel.unpack_matrix(scheme, group, 20, 256, np.asarray(packed))
            ref = _kt_kernel.unpack_matrix(scheme, group, 20, 256, np.asarray(_kt_kernel.pack_matrix(scheme, group, w)))
            gs = group or 256
            lo = 70 // gs * gs
            assert np.isnan(back[3, lo:lo + gs]).all(), f"scheme {scheme} group {group} w={bad}: packed group finite"
            keep = np.ones(back.shape, bool)
            keep[3, lo:lo + gs] = False
            assert np.array_equal(back[keep], ref[keep])


def check_fp8_nan_codes() -> None:
    """A pre-quantised FP8 checkpoint's NaN code (0x7f / 0xff) makes its group's scale NaN, so
    every backend gives NaN (the AVX-512 decoder reads those codes as +-480)."""
    from kt_kernel import _kt_kernel

    rng = np.random.default_rng(6)
    rows, cols = 20, 256
    q = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    q[(q & 0x7F) == 0x7F] ^= 1
    s = rng.uniform(1e-3, 1e-2, (rows, cols // 128)).astype(np.float32)
    clean = _kt_kernel.unpack_matrix(5, 128, rows, cols, np.asarray(_kt_kernel.pack_quantized(5, 128, rows, cols, q, s, None)))
    q[4, 130] = 0x7F
    q[9, 3] = 0xFF
    back = _kt_kernel.unpack_matrix(5, 128, rows, cols, np.asarray(_kt_kernel.pack_quantized(5, 128, rows, cols, q, s, None)))
    assert np.isnan(back[4, 128:]).all() and np.isnan(back[9, :128]).all()
    keep = np.ones(back.shape, bool)
    keep[4, 128:] = keep[9, :128] = False
    assert np.array_equal(back[keep], clean[keep])


@pytest.mark.parametrize("name", list(FORMATS))
def test_nonfinite_input_propagates(name):
    _in_subprocess(f"m.check_input({name!r})")


@pytest.mark.parametrize("name", list(FORMATS))
def test_nonfinite_weight_propagates(name):
    _in_subprocess(f"m.check_weight({name!r})")


def test_nan_propagates_through_swiglu_limit():
    _in_subprocess("m.check_swiglu_limit()")


def test_encoder_gives_nonfinite_rows_a_nan_scale():
    _in_subprocess("m.check_encoder()")


def test_weight_quantisers_give_nonfinite_groups_a_nan_scale():
    _in_subprocess("m.check_weight_quantisers()")


def test_fp8_nan_codes_get_a_nan_scale():
    _in_subprocess("m.check_fp8_nan_codes()")


def test_nan_routing_weights_with_deferral():
    _in_subprocess("m.check_nan_routing_weights()")


def check_nan_routing_weights() -> None:
    """NaN routing weights with expert deferral (which ranks a token's pairs by weight): no crash (the
    sort's comparison is a strict weak order with NaN), the token's output is NaN over the two layers,
    and every other token is bit-identical to a run with that token's weights finite."""
    import kt_kernel
    from conftest import make_wrapper

    g, u, d, x, ids, w = _inputs()
    for be in kt_kernel.backends():
        kt_kernel.set_backend(be)
        for dd in (1, K):
            layers = []
            for idx in (0, 1):
                wr = make_wrapper(E, K, H, I, "AMXINT8", max_deferred_experts_per_token=dd if idx == 0 else 0)
                wr.layer_idx = idx
                wr.load_weights_from_tensors(g, u, d)
                layers.append(wr)
            clean = sum(_forward(l, x, ids, w) for l in layers)
            wb = w.copy()
            wb[1, :] = np.nan
            wb[4, 0] = np.nan
            y = sum(_forward(l, x, ids, wb) for l in layers)
            for t in range(T):
                if t in (1, 4):
                    assert np.isnan(y[t]).all(), f"{be} d={dd}: token {t} has non-NaN outputs"
                else:
                    assert _same_bits(y[t], clean[t]), f"{be} d={dd}: token {t} changed"
    kt_kernel.set_backend("")
