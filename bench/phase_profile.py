#!/usr/bin/env python3
"""Where a MoE layer call spends its time, step by step (kt_kernel.phase_times):
routing, encoding x, gate/up, encoding the intermediate, down, combine.

    .venv/bin/python bench/phase_profile.py --model qwen3-30b-a3b --method INT4 --tokens 1,1024 --threads 1,2

Per step: microseconds per internal pass (src/moe/pass_size.h: 1024-4096 tokens), and
the rate of the two matrix steps: GB/s of packed weights read at decode
(tokens <= 32; every routed expert's matrices are read once), TOP/s at
prefill. Random bf16 weights at the model's shape; the experts used are
capped by --experts (default 64) so that loading stays quick while the
weights stay far larger than the caches. Fresh random routing every call,
calls back to back. Timings on a shared host move from run to run: compare
configurations within one run.
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
from moe_bench import DECODE_MAX_TOKENS, METHODS, MODELS  # noqa: E402

import kt_kernel  # noqa: E402
from kt_kernel import KTMoEWrapper, _pool  # noqa: E402

STEPS = ("routing", "encode_x", "gate_up", "encode_h", "down", "combine")


def int_list(s: str):
    return [int(v) for v in s.split(",") if v]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODELS))
    p.add_argument("--method", default="INT8", choices=sorted(METHODS))
    p.add_argument("--tokens", type=int_list, default=[1, 1024])
    p.add_argument("--threads", type=int_list, default=[1, 2])
    p.add_argument("--experts", type=int, default=64, help="experts loaded (capped by the model's count)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row (at least 5 calls)")
    args = p.parse_args()

    m = MODELS[args.model]
    E = min(args.experts, m.experts)
    kt_method, group = METHODS[args.method][0], METHODS[args.method][1]
    gen = torch.Generator().manual_seed(0)
    print(f"{m.title}: {E} experts, top-{m.top_k}, H {m.hidden}, I {m.inter}; {args.method} ({kt_method}); "
          f"backend {kt_kernel.current_backend()}", flush=True)
    src = [torch.randn(E, m.inter, m.hidden, generator=gen, dtype=torch.bfloat16),
           torch.randn(E, m.inter, m.hidden, generator=gen, dtype=torch.bfloat16),
           torch.randn(E, m.hidden, m.inter, generator=gen, dtype=torch.bfloat16)]
    rng = np.random.default_rng(0)
    header = "threads tokens  ms/call  " + " ".join(f"{s:>9}" for s in STEPS) + "   gate_up   down  (us per pass)"
    for threads in args.threads:
        _pool.reset_pool_for_tests()
        kw = dict(layer_idx=0, num_experts=E, num_experts_per_tok=m.top_k, hidden_size=m.hidden,
                  moe_intermediate_size=m.inter, num_gpu_experts=0, cpuinfer_threads=threads, threadpool_count=1,
                  weight_path="", chunked_prefill_size=max(args.tokens), method=kt_method)
        if group:
            kw["group_size"] = group
        wr = KTMoEWrapper(**kw)
        wr.load_weights_from_tensors(*src)
        bytes_per_expert = wr._layer.packed_bytes / E
        gu_share = 2.0 / 3.0  # gate + up of the three equal-sized matrices
        print(header)
        for T in args.tokens:
            x = torch.randn(T, m.hidden, generator=gen).to(torch.bfloat16)
            w = torch.rand(T, m.top_k, generator=gen)
            ids = [torch.from_numpy(np.stack([rng.choice(E, m.top_k, replace=False) for _ in range(T)]))
                   for _ in range(16)]
            wr.forward(x, ids[0], w)  # warm-up
            kt_kernel.phase_times(reset=True)
            times, distinct, start = [], [], time.perf_counter()
            while len(times) < 5 or time.perf_counter() - start < args.seconds:
                i = len(times) % len(ids)
                t0 = time.perf_counter()
                wr.forward(x, ids[i], w)
                times.append(time.perf_counter() - t0)
                distinct.append(len(set(ids[i].flatten().tolist())))
            ph = kt_kernel.phase_times(reset=True)
            n = max(1, ph["passes"])
            us = {s: ph[s] / n * 1e6 for s in STEPS}
            if T <= DECODE_MAX_TOKENS:
                nbytes = bytes_per_expert * statistics.mean(distinct)
                rates = (f"{nbytes * gu_share / us['gate_up'] / 1e3:7.1f}  {nbytes / 3 / us['down'] / 1e3:6.1f}  GB/s")
            else:
                ops = 2.0 * T * m.top_k * m.hidden * m.inter * len(times) / n
                rates = f"{2 * ops / us['gate_up'] / 1e6:7.3f}  {ops / us['down'] / 1e6:6.3f}  TOP/s"
            print(f"{threads:7d} {T:6d} {statistics.median(times) * 1e3:8.3f}  " +
                  " ".join(f"{us[s]:9.1f}" for s in STEPS) + f"   {rates}", flush=True)
        del wr


if __name__ == "__main__":
    main()
