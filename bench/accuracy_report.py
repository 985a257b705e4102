"""Prints the measured error of every format on every available backend:
(a) relative Frobenius error against the float64 MoE on the original weights,
(b) max relative error of the intermediate and of the output against the
quantisation-aware float64 reference. The same checks as
tests/python/test_accuracy.py, as numbers instead of pass/fail.

    .venv/bin/python bench/accuracy_report.py [--E 8 --k 2 --H 256 --I 512 --T 16]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))

import kt_kernel  # noqa: E402
from conftest import make_inputs, make_weights, make_wrapper  # noqa: E402
from reference import (moe_reference, quant_aware_intermediate, quant_aware_output, rel_fro_err,  # noqa: E402
                       rel_max_err, unpack_layer)

FORMATS = [("BF16", {}), ("AMXINT8", {}), ("AMXINT4", {"group_size": 32}), ("AMXINT4", {"group_size": 128}),
           ("AMXINT4", {"group_size": 0}), ("AMXINT4", {"group_size": 64, "zero_point": True})]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--E", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--I", type=int, default=512)
    p.add_argument("--T", type=int, default=16)
    a = p.parse_args()
    g, u, d = make_weights(a.E, a.H, a.I, seed=0)
    x, ids, w = make_inputs(a.T, a.H, a.E, a.k)
    ref = moe_reference(x, ids, w, g, u, d)
    print(f"E={a.E} k={a.k} H={a.H} I={a.I} T={a.T}; weights ~ N(0, 1/fan_in), x ~ N(0, 1)")
    print(f"{'backend':8} {'format':22} {'(a) vs fp64':>12} {'(b) interm.':>12} {'(b) output':>12}")
    for backend in kt_kernel.backends():
        kt_kernel.set_backend(backend)
        for method, kw in FORMATS:
            wr = make_wrapper(a.E, a.k, a.H, a.I, method, **kw)
            wr.load_weights_from_tensors(g, u, d)
            wr._layer.set_capture(True)
            y = wr.forward(x, ids, w)
            assert kt_kernel.last_used_backend() == backend
            weights = unpack_layer(wr._layer, a.E)
            h = wr._layer.captured_intermediate()
            h_ref = quant_aware_intermediate(x, ids, wr._layer, wr.scheme, a.E, weights)
            valid = ~np.isnan(h_ref)
            y_ref = quant_aware_output(h, ids, w, wr.scheme, a.E, weights)
            name = method + "".join(f" {k}={v}" for k, v in kw.items())
            print(f"{backend:8} {name:22} {rel_fro_err(y, ref):12.5f} {rel_max_err(h[valid], h_ref[valid]):12.2e} "
                  f"{rel_max_err(y, y_ref):12.2e}")
    kt_kernel.set_backend("")


if __name__ == "__main__":
    main()
