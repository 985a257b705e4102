#!/usr/bin/env python3
"""Decode calls with a pause between them, under several worker spin settings.

In a server the CPU's layer calls of a decode step are separated by the GPU's
work (attention, the hot experts): if the pool's idle workers have gone to
sleep by then, the next call pays their wake-up (~30 us in a VM) inside its
first parallel step. This bench times 1-token (and small-batch) layer calls
with a busy pause of --gap-us before each, with the pool's worker spin set to
each of --spin-us in turn, alternated call by call in one process, so every
setting meets the same host state. Prints the median microseconds per call.

    .venv/bin/python bench/spin_gap.py --model qwen3-30b-a3b --method INT8 --spin-us 80,2000

The default spin is 2000 us (KT_KERNEL_SPIN_US overrides it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_bench import METHODS, MODELS  # noqa: E402

from kt_kernel import KTMoEWrapper, _pool  # noqa: E402


def int_list(s: str):
    return [int(v) for v in s.split(",") if v]


def busy_wait(seconds: float) -> None:
    """The GPU's share of a step: the calling thread stays busy (a sleep would let its CPU idle too)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODELS))
    p.add_argument("--method", default="INT8", choices=sorted(METHODS))
    p.add_argument("--tokens", type=int_list, default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=64, help="experts loaded (capped by the model's count)")
    p.add_argument("--gap-us", type=int_list, default=[200, 1000], help="busy pause before each call")
    p.add_argument("--spin-us", type=int_list, default=[80, 2000], help="worker spin settings to alternate")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per (tokens, gap)")
    args = p.parse_args()
    if not args.spin_us or min(args.spin_us) < 0 or min(args.gap_us, default=0) < 0:
        p.error("--spin-us needs at least one value; spins and gaps must be >= 0")

    m = MODELS[args.model]
    E = min(args.experts, m.experts)
    kt_method, group = METHODS[args.method][0], METHODS[args.method][1]
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(E, m.inter, m.hidden, generator=gen, dtype=torch.bfloat16),
           torch.randn(E, m.inter, m.hidden, generator=gen, dtype=torch.bfloat16),
           torch.randn(E, m.hidden, m.inter, generator=gen, dtype=torch.bfloat16)]
    _pool.reset_pool_for_tests()
    kw = dict(layer_idx=0, num_experts=E, num_experts_per_tok=m.top_k, hidden_size=m.hidden,
              moe_intermediate_size=m.inter, num_gpu_experts=0, cpuinfer_threads=args.threads, threadpool_count=1,
              weight_path="", chunked_prefill_size=max(args.tokens), method=kt_method)
    if group:
        kw["group_size"] = group
    wr = KTMoEWrapper(**kw)
    wr.load_weights_from_tensors(*src)
    pool = wr._pool
    default_spin = pool.worker_spin_us
    rng = np.random.default_rng(0)
    print(f"{m.title}: {E} experts, top-{m.top_k}; {args.method}; {args.threads} threads; "
          f"median us per call (spin settings alternated call by call)", flush=True)
    print("tokens  gap_us  " + "  ".join(f"spin {s:>6} us" for s in args.spin_us))
    try:
        for T in args.tokens:
            x = torch.randn(T, m.hidden, generator=gen).to(torch.bfloat16)
            w = torch.rand(T, m.top_k, generator=gen)
            ids = [torch.from_numpy(np.stack([rng.choice(E, m.top_k, replace=False) for _ in range(T)]))
                   for _ in range(16)]
            for gap in args.gap_us:
                times = {s: [] for s in args.spin_us}
                start, k = time.perf_counter(), 0
                while time.perf_counter() - start < args.seconds or min(len(v) for v in times.values()) < 5:
                    spin = args.spin_us[k % len(args.spin_us)]
                    pool.worker_spin_us = spin
                    # One untimed call: the workers then finish a job under the new setting.
                    wr.forward(x, ids[k % len(ids)], w)
                    for r in range(4):
                        busy_wait(gap * 1e-6)
                        t0 = time.perf_counter()
                        wr.forward(x, ids[(k + r + 1) % len(ids)], w)
                        times[spin].append(time.perf_counter() - t0)
                    k += 1
                print(f"{T:6d}  {gap:6d}  " + "  ".join(f"{statistics.median(times[s]) * 1e6:12.1f}"
                                                       for s in args.spin_us), flush=True)
    finally:
        pool.worker_spin_us = default_spin


if __name__ == "__main__":
    main()
