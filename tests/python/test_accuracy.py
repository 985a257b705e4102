"""Accuracy of every format on every available backend, two ways.

(a) Against the float64 MoE on the ORIGINAL weights: the error must stay within
    the format's quantisation budget (relative Frobenius error of the output).
    Budgets, for weights ~ N(0, 1/fan_in) and activations ~ N(0, 1):
      BF16   0.02  bf16 rounding (2^-9 relative) of weights, x and the intermediate;
                   measured about 0.005.
      INT8   0.06  per-channel int8 weights (step amax/127, amax ~ 3-4 sigma) and
                   per-token int8 activations, over three matrices; measured ~0.025.
      INT4   0.30  4-bit weights (Q4_0 rule: step ~ amax/8, ~7.5% RMS error per
                   matrix at group 32, more per channel), compounded over gate, up
                   and down; measured 0.16 (group 32) to 0.19 (per channel).
      FP8    0.10  e4m3 weights (3 mantissa bits: up to 2^-4 relative rounding,
                   ~1.8% RMS per weight) per group of 128, bf16 activations;
                   measured about 0.05.
(b) Against the quantisation-aware float64 reference (same packed weights, same
    activation encoding replayed bit for bit): the intermediate act(gate, up) and
    the output must agree to 1e-5 of their max magnitude. Anything above float32
    rounding here is a kernel bug.
"""

from __future__ import annotations

import numpy as np
import pytest

import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper
from reference import (moe_reference, quant_aware_intermediate, quant_aware_output, rel_fro_err, rel_max_err,
                       unpack_layer)

QUANT_AWARE_TOL = 1e-5
BUDGET = {"BF16": 0.02, "AMXINT8": 0.06, "AMXINT4": 0.30, "FP8": 0.10}

FORMATS = [
    pytest.param("BF16", {}, id="bf16"),
    pytest.param("AMXINT8", {}, id="int8"),
    pytest.param("AMXINT4", {"group_size": 32}, id="int4-g32"),
    pytest.param("AMXINT4", {"group_size": 128}, id="int4-g128"),
    pytest.param("AMXINT4", {"group_size": 0}, id="int4-perchannel"),
    pytest.param("AMXINT4", {"group_size": 64, "zero_point": True}, id="int4-asym-g64"),
    # Grouped INT8 (kInt8Group, what GGUF Q8_0 loads as): an AMXINT8 wrapper whose
    # layer is rebuilt as grouped INT8, as load_weights does for a Q8_0 source.
    pytest.param("AMXINT8", {"_int8_group": 32}, id="int8-g32"),
    pytest.param("AMXINT8", {"_int8_group": 128}, id="int8-g128"),
    # FP8 block (kFP8Block): float weights quantised to e4m3 per row and group of 128
    # (scale = amax / 448, round to nearest even) by load_weights_from_tensors.
    pytest.param("FP8", {}, id="fp8"),
]

# (E, k, H, I, T): a regular shape and hostile ones (odd expert counts, 17
# tokens, widths that are not multiples of 64 where the format allows).
SHAPES = [
    pytest.param(8, 2, 128, 256, 5, id="E8k2H128I256T5"),
    pytest.param(7, 3, 384, 128, 17, id="E7k3H384I128T17"),
]
ODD_SHAPE = (5, 2, 100, 40, 9)  # per-channel formats accept any width


def _run_checks(backend, method, kw, E, k, H, I, T, limit=0.0, alpha=0.0):
    g, u, d = make_weights(E, H, I, seed=E * 1000 + H)
    x, ids, w = make_inputs(T, H, E, k, invalid_ids=True)
    kw = dict(kw)
    int8_group = kw.pop("_int8_group", None)
    wr = make_wrapper(E, k, H, I, method, swiglu_limit=limit, swiglu_alpha=alpha, **kw)
    if int8_group:
        from kt_kernel.wrapper import SCHEME_INT8_GROUP

        wr._rebuild_layer(int8_group, SCHEME_INT8_GROUP)
        assert wr.scheme == SCHEME_INT8_GROUP
    wr.load_weights_from_tensors(g, u, d)
    wr._layer.set_capture(True)
    # Poison the (persistent) output buffer: the call must write every element.
    kt_kernel.KTMoEWrapper.set_capture_batch_sizes([T])
    try:
        wr.forward(x, ids, w)[:] = np.nan
        y = wr.forward(x, ids, w)
    finally:
        kt_kernel.KTMoEWrapper.set_capture_batch_sizes([])
    assert kt_kernel.last_used_backend() == backend
    assert np.isfinite(y).all()

    ref = moe_reference(x, ids, w, g, u, d, limit=limit, alpha=alpha)
    err_a = rel_fro_err(y, ref)
    assert err_a <= BUDGET[method], f"(a) {method} {kw}: error {err_a:.4f} > budget {BUDGET[method]}"

    weights = unpack_layer(wr._layer, E)
    h = wr._layer.captured_intermediate()
    h_ref = quant_aware_intermediate(x, ids, wr._layer, wr.scheme, E, weights, limit, alpha)
    assert np.array_equal(np.isnan(h), np.isnan(h_ref)), "captured pairs differ from the routed pairs"
    valid = ~np.isnan(h_ref)
    err_h = rel_max_err(h[valid], h_ref[valid])
    assert err_h <= QUANT_AWARE_TOL, f"(b) intermediate: {err_h:.2e}"
    y_ref = quant_aware_output(h, ids, w, wr.scheme, E, weights)
    err_y = rel_max_err(y, y_ref)
    assert err_y <= QUANT_AWARE_TOL, f"(b) output: {err_y:.2e}"
    return err_a, err_h, err_y


@pytest.mark.parametrize("method,kw", FORMATS)
@pytest.mark.parametrize("E,k,H,I,T", SHAPES)
def test_accuracy(backend, method, kw, E, k, H, I, T):
    _run_checks(backend, method, kw, E, k, H, I, T)


@pytest.mark.parametrize("method,kw", [FORMATS[0], FORMATS[1], FORMATS[4]])
def test_accuracy_widths_not_multiple_of_64(backend, method, kw):
    _run_checks(backend, method, kw, *ODD_SHAPE)


@pytest.mark.parametrize("method,kw", [FORMATS[0], FORMATS[1], FORMATS[2]])
def test_accuracy_swiglu_limit(backend, method, kw):
    """The clamped 'swigluoai' activation (GPT-OSS): g*sigmoid(alpha*g)*(u+1) with clamps."""
    _run_checks(backend, method, kw, 8, 2, 128, 128, 6, limit=0.5, alpha=1.702)


HOSTILE_T = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33]


@pytest.mark.parametrize("method,kw", [FORMATS[0], FORMATS[1], FORMATS[2], FORMATS[5], FORMATS[6]])
def test_hostile_token_counts(backend, method, kw):
    """Token counts around register-tile and block edges, an odd expert count, and
    every expert from 0 to many tokens (top-k over 5 experts)."""
    for T in HOSTILE_T:
        _run_checks(backend, method, kw, 5, 3, 128, 192, T)


def test_hostile_token_counts_fp8(backend):
    """FP8 (widths must be multiples of its scale group, 128) over the same token counts."""
    for T in HOSTILE_T:
        _run_checks(backend, "FP8", {}, 5, 3, 128, 256, T)


def test_fp8_needs_widths_multiple_of_128():
    with pytest.raises(ValueError, match="multiples of 128"):
        make_wrapper(4, 2, 128, 192, "FP8")
