"""The demo: one MoE layer at a real model's shape, on this CPU.

Random weights with the real shapes (nothing is downloaded), the layer run
through KTMoEWrapper for decode and prefill, the output compared with a
float64 reference on the original weights, and the speed printed: per-call
latency, tokens per second and, for decode, the bandwidth of packed weight
bytes read.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import numpy as np

from . import _pool, backends, current_backend, last_used_backend
from .wrapper import KTMoEWrapper

MODELS: Dict[str, Dict[str, int]] = {
    "qwen3-30b-a3b": dict(num_experts=128, top_k=8, hidden=2048, intermediate=768),
    "deepseek-v2-lite": dict(num_experts=64, top_k=6, hidden=2048, intermediate=1408),
    "mixtral-8x7b": dict(num_experts=8, top_k=2, hidden=4096, intermediate=14336),
}
METHODS = {"INT4": ("AMXINT4", {"group_size": 128}), "INT8": ("AMXINT8", {}), "BF16": ("BF16", {})}


def _random_weights(E: int, H: int, I: int, seed: int):
    """fp16 weights ~ N(0, 1/fan_in), generated expert by expert to bound memory."""
    rng = np.random.default_rng(seed)
    gate = np.empty((E, I, H), np.float16)
    up = np.empty((E, I, H), np.float16)
    down = np.empty((E, H, I), np.float16)
    for e in range(E):
        gate[e] = rng.standard_normal((I, H), np.float32) / np.sqrt(H)
        up[e] = rng.standard_normal((I, H), np.float32) / np.sqrt(H)
        down[e] = rng.standard_normal((H, I), np.float32) / np.sqrt(I)
    return gate, up, down


def _routing(rng, T: int, E: int, k: int):
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int64)
    w = rng.random((T, k)).astype(np.float32)
    return ids, w / w.sum(axis=1, keepdims=True)


def _reference(x, ids, w, gate, up, down, rows: int):
    """float64 reference for the first `rows` tokens."""
    y = np.zeros((rows, x.shape[1]))
    for t in range(rows):
        xt = x[t].astype(np.float64)
        for j in range(ids.shape[1]):
            e = ids[t, j]
            g = gate[e].astype(np.float64) @ xt
            u = up[e].astype(np.float64) @ xt
            h = g / (1 + np.exp(-g)) * u
            y[t] += w[t, j] * (down[e].astype(np.float64) @ h)
    return y


def run(model: str, methods: List[str], threads: int, decode_reps: int, prefill_tokens: int, seed: int) -> None:
    shape = MODELS[model]
    E, k, H, I = shape["num_experts"], shape["top_k"], shape["hidden"], shape["intermediate"]
    print(f"kt_kernel demo: {model} MoE layer: {E} experts, top-{k}, hidden {H}, intermediate {I}")
    print(f"backends here: {', '.join(backends())}; running: {current_backend()}; threads: {threads}")
    t0 = time.perf_counter()
    gate, up, down = _random_weights(E, H, I, seed)
    print(f"random weights generated in {time.perf_counter() - t0:.1f} s "
          f"({3 * E * H * I * 2 / 2**30:.2f} GiB fp16)")
    rng = np.random.default_rng(seed + 1)
    header = f"{'format':6} {'load s':>7} {'decode ms':>10} {'decode GB/s':>12} {'prefill':>8} {'prefill ms':>11} " \
             f"{'tok/s':>9} {'rel err':>8}"
    rows = []
    _pool.reset_pool_for_tests()
    for name in methods:
        method, kw = METHODS[name]
        wr = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                          moe_intermediate_size=I, cpuinfer_threads=threads, threadpool_count=1,
                          method=method, **kw)
        t0 = time.perf_counter()
        wr.load_weights_from_tensors(gate, up, down)
        load_s = time.perf_counter() - t0
        bytes_per_expert = wr.packed_bytes / E
        # Decode: one token per call, fresh routing each call.
        times, touched = [], []
        for i in range(decode_reps + 3):
            x = rng.standard_normal((1, H)).astype(np.float32)
            ids, w = _routing(rng, 1, E, k)
            t0 = time.perf_counter()
            wr.forward(x, ids, w)
            if i >= 3:
                times.append(time.perf_counter() - t0)
                touched.append(len(np.unique(ids)))
        dec = float(np.median(times))
        dec_gbs = float(np.median(np.array(touched) * bytes_per_expert / np.array(times))) / 1e9
        # Prefill: accuracy on the first rows against float64.
        x = rng.standard_normal((prefill_tokens, H)).astype(np.float32)
        ids, w = _routing(rng, prefill_tokens, E, k)
        wr.forward(x, ids, w)
        ptimes = []
        for _ in range(3):
            t0 = time.perf_counter()
            y = wr.forward(x, ids, w)
            ptimes.append(time.perf_counter() - t0)
        pre = float(np.median(ptimes))
        nref = min(8, prefill_tokens)
        ref = _reference(x, ids, w, gate, up, down, nref)
        err = float(np.linalg.norm(y[:nref] - ref) / np.linalg.norm(ref))
        rows.append(f"{name:6} {load_s:7.1f} {dec * 1e3:10.3f} {dec_gbs:12.1f} {prefill_tokens:8d} "
                    f"{pre * 1e3:11.1f} {prefill_tokens / pre:9.0f} {err:8.4f}")
        print(f"  {name}: done on backend {last_used_backend()}")
        del wr
    print()
    print(header)
    for r in rows:
        print(r)
    print("\ndecode GB/s = packed bytes of the distinct experts a call reads / its time (median of "
          f"{decode_reps} calls); rel err = ||y - y_fp64|| / ||y_fp64|| on the first tokens of the prefill batch, "
          "against the original (unquantised) weights.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kt-kernel demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    p.add_argument("--methods", default="INT4,INT8,BF16", help="comma list of INT4, INT8, BF16")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: all CPUs)")
    p.add_argument("--decode-reps", type=int, default=20)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import os

    methods = [m.strip().upper() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {sorted(METHODS)}")
    run(a.model, methods, a.threads or os.cpu_count() or 1, a.decode_reps, a.prefill_tokens, a.seed)
