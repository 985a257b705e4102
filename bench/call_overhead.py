#!/usr/bin/env python3
"""What a layer call costs beyond its kernels: forward() against the full
submit + sync path it short-cuts, and against the native call alone.

    .venv/bin/python bench/call_overhead.py                       # tiny layer: the overhead itself
    .venv/bin/python bench/call_overhead.py --model qwen3-30b-a3b --method INT8 --experts 128

Five ways to run the same 1-token call, alternated call by call in one
process (the host's state moves between runs, not between neighbouring
calls), fresh random routing and hidden state every call:
  forward  KTMoEWrapper.forward (its short path for CPU torch tensors and
           NumPy arrays);
  full     the full path (_async.forward: the argument descriptions, then
           submit + sync in one native call, run inline), which forward()
           still runs for other inputs (capture batch sizes, unusual layouts,
           bad arguments);
  forward-np, full-np  the same two with NumPy arrays (fp32 hidden state);
  native   the native forward (submit + sync) with the arguments prepared beforehand:
           the floor, the layer's own work plus the binding.
Prints the median microseconds per call of each and the differences.
The default layer is moe_bench's tiny one (8 experts, H 256, I 128), so its
kernels take a few microseconds and the figures are the overhead; at a
model's shape the Python path also runs with caches the kernels have just
flushed.
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

from kt_kernel import KTMoEWrapper, _async  # noqa: E402
from kt_kernel._tensors import FLOAT_CODES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--method", default="INT8", choices=sorted(METHODS))
    p.add_argument("--experts", type=int, default=64, help="experts loaded (capped by the model's count)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=6000, help="calls per way (the first 10%% are warm-up)")
    args = p.parse_args()

    m = MODELS[args.model]
    E, k, H, I = min(args.experts, m.experts), m.top_k, m.hidden, m.inter
    kt_method, group = METHODS[args.method][0], METHODS[args.method][1]
    kw = dict(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
              num_gpu_experts=0, cpuinfer_threads=args.threads, threadpool_count=1, weight_path="",
              chunked_prefill_size=1, method=kt_method)
    if group:
        kw["group_size"] = group
    wr = KTMoEWrapper(**kw)
    gen = torch.Generator().manual_seed(0)
    wr.load_weights_from_tensors(torch.randn(E, I, H, generator=gen, dtype=torch.bfloat16),
                                 torch.randn(E, I, H, generator=gen, dtype=torch.bfloat16),
                                 torch.randn(E, H, I, generator=gen, dtype=torch.bfloat16))
    rng = np.random.default_rng(1)
    w = torch.rand(1, k, generator=gen)
    w_np = w.numpy()
    y_native = torch.empty(1, H, dtype=torch.bfloat16)

    def full(x, ids):
        wr._pool.wake()
        weights = w_np if isinstance(x, np.ndarray) else w
        with wr._lock:
            return _async.forward(wr, x, ids, weights, 0)

    def native(x, ids):
        nat = _async._native(wr)
        nat.forward(1, x.data_ptr(), FLOAT_CODES["bfloat16"], H, ids.data_ptr(), True, k, w.data_ptr(),
                    FLOAT_CODES["float32"], k, wr._mask_ptr(), y_native.data_ptr(), FLOAT_CODES["bfloat16"], H, 0, 0,
                    False, False, 0, 0, True, 0, 0)

    ways = {"forward": lambda x, ids: wr.forward(x, ids, w), "full": full,
            "forward-np": lambda x, ids: wr.forward(x, ids, w_np), "full-np": full, "native": native}
    times = {name: [] for name in ways}
    names = list(ways)
    for i in range(args.calls * len(names)):
        name = names[i % len(names)]
        ids = rng.choice(E, k, replace=False)[None].astype(np.int64)
        if name.endswith("-np"):
            x = rng.standard_normal((1, H)).astype(np.float32)
        else:
            ids, x = torch.from_numpy(ids), torch.randn(1, H).to(torch.bfloat16)
        t0 = time.perf_counter()
        ways[name](x, ids)
        times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t[len(t) // 10:]) * 1e6 for name, t in times.items()}
    print(f"{m.title}: {E} experts, top-{k}, H {H}, I {I}; {args.method}, {args.threads} threads, 1 token; "
          f"median us per call over {args.calls - args.calls // 10} calls each")
    for name in names:
        print(f"  {name:8s} {med[name]:9.1f}")
    print(f"  forward - native {med['forward'] - med['native']:6.1f} us (Python and argument checks)")
    print(f"  full - forward   {med['full'] - med['forward']:6.1f} us (saved by the short path; NumPy: "
          f"{med['full-np'] - med['forward-np']:.1f} us)")


if __name__ == "__main__":
    main()
