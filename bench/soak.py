#!/usr/bin/env python3
"""Soak and determinism: what a long-running server would notice.

    .venv/bin/python bench/soak.py --quick     # under a minute on 2 cores
    .venv/bin/python bench/soak.py             # 10^5 calls, 1000 cycles, every setting

Three checks on a small layer (8 experts, top-2, H 256, I 128 by default):

  calls        --calls layer calls on one pair of layers, rotating over
               forward() with NumPy arrays, forward() with torch tensors,
               submit_forward + sync_forward, and a two-layer chain whose first
               layer defers an expert per token (submit/sync each); RSS is
               sampled along the way.
  cycles       --cycles times: a wrapper created, loaded, called and dropped
               (settings rotating; every third cycle a deferring layer and a
               last layer after it); RSS sampled.
  determinism  the same inputs through every (backend, method setting,
               deferral on/off, token count) at each cpuinfer_threads count of
               --threads (and threadpool_count of --pools); the outputs of a
               two-layer chain are compared bitwise against the first thread
               count's. Deferral on: the first layer defers one expert per
               token into the second (its last layer defers nothing, as servers
               do); off: neither defers.

RSS growth is the resident set at the end minus its value after the warm-up
(the first --warmup fraction of the calls or cycles), in MiB. Exits 1 when any
output differs, any backend other than the forced one ran, or a growth exceeds
--max-growth-mib; prints a summary table either way.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

import kt_kernel
from kt_kernel import _pool

try:
    import torch
except ImportError:  # torch is optional for kt_kernel; the torch calls are then skipped
    torch = None

# Method settings: name -> KTMoEWrapper keyword arguments. The INT4 variants
# cover each group layout (grouped, per channel) with and without mins.
SETTINGS: Dict[str, dict] = {
    "BF16": dict(method="BF16"),
    "FP8": dict(method="FP8"),
    "INT8": dict(method="AMXINT8"),
    "INT4-g128": dict(method="AMXINT4"),
    "INT4-g32": dict(method="AMXINT4", group_size=32),
    "INT4-pc": dict(method="AMXINT4", group_size=0),
    "INT4-zp-g64": dict(method="AMXINT4", group_size=64, zero_point=True),
    "INT4-zp-pc": dict(method="AMXINT4", group_size=0, zero_point=True),
    "RAWINT4": dict(method="RAWINT4"),
    "MOE_INT8": dict(method="MOE_INT8"),
}


_malloc_trim = None  # set by --trim: glibc's malloc_trim, called before each sample


def rss_mib() -> float:
    """Resident set size. With --trim, glibc first returns freed heap pages to the system, so what is
    left is memory still allocated rather than memory the allocator keeps for reuse."""
    if _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_weights(E: int, H: int, I: int, seed: int):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(np.float32)
    u = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(np.float32)
    d = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(np.float32)
    return g, u, d


def make_inputs(T: int, H: int, E: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    ids[rng.random((T, k)) < 0.1] = -1  # a few skipped pairs, as GPU-resident experts are
    w = rng.random((T, k)).astype(np.float32)
    return x, ids, w


class Shape:
    def __init__(self, args):
        self.E, self.k, self.H, self.I = args.experts, args.top_k, args.hidden, args.inter


def make_layer(shape: Shape, layer_idx: int, setting: str, weights, threads: int, pools: int,
               deferred: Optional[int] = None):
    wr = kt_kernel.KTMoEWrapper(layer_idx=layer_idx, num_experts=shape.E, num_experts_per_tok=shape.k,
                                hidden_size=shape.H, moe_intermediate_size=shape.I, cpuinfer_threads=threads,
                                threadpool_count=pools, numa_nodes=[0] * pools,
                                max_deferred_experts_per_token=deferred, **SETTINGS[setting])
    wr.load_weights_from_tensors(*weights)
    return wr


def chain(l0, l1, x, ids, w) -> Tuple[np.ndarray, np.ndarray]:
    """One step of a two-layer model: l0's deferred experts (if any) land in l1's output."""
    l0.submit_forward(x, ids, w)
    y0 = np.array(l0.sync_forward(x))
    l1.submit_forward(x, ids, w)
    y1 = np.array(l1.sync_forward(x))
    return y0, y1


def growth(samples: List[Tuple[int, float]], warm: int) -> Tuple[float, float]:
    """(RSS at the end - RSS after warm-up, peak - RSS after warm-up), MiB."""
    after = [r for i, r in samples if i >= warm]
    base = after[0]
    return after[-1] - base, max(after) - base


def soak_calls(args, shape: Shape, weights) -> dict:
    _pool.reset_pool_for_tests()
    plain = make_layer(shape, 0, args.soak_method, weights[0], args.soak_threads, 1)
    defer0 = make_layer(shape, 0, args.soak_method, weights[0], args.soak_threads, 1, deferred=1)
    last = make_layer(shape, 1, args.soak_method, weights[1], args.soak_threads, 1, deferred=0)
    inputs = [make_inputs(T, shape.H, shape.E, shape.k, seed=100 + i)
              for i, T in enumerate([1, 1, 2, 3, 4, 8, 16, 33])]
    tinputs = [tuple(torch.from_numpy(a) for a in inp) for inp in inputs] if torch is not None else None
    ways = 4 if torch is not None else 3
    warm = int(args.calls * args.warmup)
    every = max(1, args.calls // 200)
    samples: List[Tuple[int, float]] = []
    t0 = time.perf_counter()
    i = 0
    while i < args.calls:
        x, ids, w = inputs[i % len(inputs)]
        way = (i // len(inputs)) % ways
        if way == 0:
            plain.forward(x, ids, w)
        elif way == 1:
            plain.submit_forward(x, ids, w)
            plain.sync_forward(x)
        elif way == 2:
            chain(defer0, last, x, ids, w)
            i += 1  # two layer calls
        else:
            tx, tids, tw = tinputs[i % len(inputs)]
            plain.forward(tx, tids, tw)
        if i % every == 0 or i >= args.calls - 1:
            samples.append((i, rss_mib()))
        i += 1
    wall = time.perf_counter() - t0
    end, peak = growth(samples, warm)
    return dict(calls=args.calls, seconds=wall, us_per_call=wall / args.calls * 1e6, rss_start=samples[0][1],
                rss_after_warmup=[r for j, r in samples if j >= warm][0], rss_end=samples[-1][1],
                growth_mib=end, peak_growth_mib=peak)


def soak_cycles(args, shape: Shape, weights) -> dict:
    _pool.reset_pool_for_tests()
    names = list(args.settings)
    x, ids, w = make_inputs(4, shape.H, shape.E, shape.k, seed=7)
    warm = int(args.cycles * args.warmup)
    samples: List[Tuple[int, float]] = []
    t0 = time.perf_counter()
    for c in range(args.cycles):
        setting = names[c % len(names)]
        if c % 3 == 0:
            # A deferring layer and the last layer after it (which defers nothing, as servers configure it,
            # so no deferred work outlives the cycle).
            wr = make_layer(shape, c % 4, setting, weights[c % 2], args.soak_threads, 1, deferred=1)
            tail = make_layer(shape, c % 4 + 1, setting, weights[(c + 1) % 2], args.soak_threads, 1, deferred=0)
            chain(wr, tail, x, ids, w)
            del tail
        else:
            wr = make_layer(shape, c % 4, setting, weights[c % 2], args.soak_threads, 1)
            wr.forward(x, ids, w)
            if c % 5 == 0:
                wr.submit_forward(x, ids, w)
                wr.sync_forward(x)
        del wr
        if c % 50 == 0:
            gc.collect()
        samples.append((c, rss_mib()))
    wall = time.perf_counter() - t0
    end, peak = growth(samples, warm)
    return dict(cycles=args.cycles, seconds=wall, ms_per_cycle=wall / args.cycles * 1e3, rss_start=samples[0][1],
                rss_after_warmup=[r for j, r in samples if j >= warm][0], rss_end=samples[-1][1],
                growth_mib=end, peak_growth_mib=peak)


def determinism(args, shape: Shape, weights) -> dict:
    inputs = {T: make_inputs(T, shape.H, shape.E, shape.k, seed=200 + T) for T in args.tokens}
    configs = [(p, t) for p in args.pools for t in args.threads if p <= t]
    # results[(setting, deferral, backend, T)][config] = (y0, y1)
    results: Dict[tuple, Dict[tuple, Tuple[np.ndarray, np.ndarray]]] = {}
    wrong_backend: List[str] = []
    refused: List[str] = []
    for pools, threads in configs:
        _pool.reset_pool_for_tests()
        for setting in args.settings:
            for deferral in (False, True):
                try:
                    l0 = make_layer(shape, 0, setting, weights[0], threads, pools, deferred=1 if deferral else 0)
                    l1 = make_layer(shape, 1, setting, weights[1], threads, pools, deferred=0)
                except ValueError as e:  # a configuration this build refuses is reported, not compared
                    refused.append(f"pools={pools} threads={threads} {setting}: {e}")
                    continue
                for backend in args.backends:
                    kt_kernel.set_backend(backend)
                    try:
                        for T, (x, ids, w) in inputs.items():
                            out = chain(l0, l1, x, ids, w)
                            if kt_kernel.last_used_backend() != backend:
                                wrong_backend.append(f"{backend} asked, {kt_kernel.last_used_backend()} ran")
                            results.setdefault((setting, deferral, backend, T), {})[(pools, threads)] = out
                    finally:
                        kt_kernel.set_backend("")
                del l0, l1
    compared = differing = nonfinite = 0
    rows: Dict[tuple, List[int]] = {}  # (setting, backend) -> [compared, differing]
    diffs: List[str] = []
    for (setting, deferral, backend, T), by_config in results.items():
        ref_cfg = next(iter(by_config))
        ref = by_config[ref_cfg]
        row = rows.setdefault((setting, backend), [0, 0])
        if not all(np.isfinite(y).all() for y in ref):
            nonfinite += 1
            diffs.append(f"{setting} {backend} deferral={deferral} T={T} pools/threads={ref_cfg}: non-finite output")
        for cfg, out in by_config.items():
            if cfg == ref_cfg:
                continue
            compared += 1
            row[0] += 1
            # Bitwise: the bytes, so that NaN patterns and signed zeros count too.
            if any(a.tobytes() != b.tobytes() for a, b in zip(ref, out)):
                differing += 1
                row[1] += 1
                diffs.append(f"{setting} {backend} deferral={deferral} T={T}: pools/threads {cfg} != {ref_cfg}")
    return dict(configs=configs, compared=compared, differing=differing, nonfinite=nonfinite, rows=rows,
                diffs=diffs, wrong_backend=wrong_backend, refused=refused)


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="5000 calls, 100 cycles, tokens 1,9 (the settings, backends and threads stay)")
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--threads", type=csv(int), default=[1, 2, 3], help="cpuinfer_threads counts compared")
    p.add_argument("--pools", type=csv(int), default=[1, 2],
                   help="threadpool_count values compared (numa_nodes all 0; a value this build refuses is listed)")
    p.add_argument("--backends", type=csv(str), default=None, help="default: kt_kernel.backends()")
    p.add_argument("--settings", type=csv(str), default=list(SETTINGS), help=f"of {','.join(SETTINGS)}")
    p.add_argument("--tokens", type=csv(int), default=[1, 5, 33])
    p.add_argument("--soak-method", default="INT8", choices=sorted(SETTINGS), help="setting of the call soak")
    p.add_argument("--soak-threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of calls/cycles before the RSS baseline")
    p.add_argument("--max-growth-mib", type=float, default=4.0)
    p.add_argument("--skip", type=csv(str), default=[], help="of calls,cycles,determinism")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--trim", action="store_true",
                   help="malloc_trim(0) before each RSS sample (glibc): growth then counts live memory only")
    args = p.parse_args()
    if args.trim:
        global _malloc_trim
        import ctypes

        _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    if args.quick:
        args.calls, args.cycles, args.tokens = min(args.calls, 5000), min(args.cycles, 100), [1, 9]
    if args.backends is None:
        args.backends = kt_kernel.backends()
    for s in args.settings:
        if s not in SETTINGS:
            p.error(f"--settings: unknown setting {s!r} (known: {', '.join(SETTINGS)})")
    unavailable = [b for b in args.backends if b not in kt_kernel.backends()]
    if unavailable:
        p.error(f"--backends: not available on this CPU: {', '.join(unavailable)} "
                f"(available: {', '.join(kt_kernel.backends())})")
    shape = Shape(args)
    weights = [make_weights(shape.E, shape.H, shape.I, seed=s) for s in (1, 2)]

    print(f"kt_kernel {kt_kernel.__version__} from {os.path.dirname(kt_kernel.__file__)}; "
          f"backends {','.join(args.backends)}; layer E={shape.E} k={shape.k} H={shape.H} I={shape.I}")
    failed = False
    report: dict = {}
    lines: List[str] = []
    if "calls" not in args.skip:
        r = report["calls"] = soak_calls(args, shape, weights)
        bad = r["growth_mib"] > args.max_growth_mib
        failed |= bad
        lines.append(f"calls        {r['calls']} calls ({args.soak_method}, {args.soak_threads} threads), "
                     f"{r['us_per_call']:.1f} us/call; RSS {r['rss_start']:.1f} -> {r['rss_after_warmup']:.1f} "
                     f"(warm) -> {r['rss_end']:.1f} MiB: growth {r['growth_mib']:+.1f} MiB "
                     f"(peak {r['peak_growth_mib']:+.1f}){'  FAIL' if bad else ''}")
    if "cycles" not in args.skip:
        r = report["cycles"] = soak_cycles(args, shape, weights)
        bad = r["growth_mib"] > args.max_growth_mib
        failed |= bad
        lines.append(f"cycles       {r['cycles']} create/load/call/destroy, {r['ms_per_cycle']:.2f} ms each; "
                     f"RSS {r['rss_start']:.1f} -> {r['rss_after_warmup']:.1f} (warm) -> {r['rss_end']:.1f} MiB: "
                     f"growth {r['growth_mib']:+.1f} MiB (peak {r['peak_growth_mib']:+.1f}){'  FAIL' if bad else ''}")
    if "determinism" not in args.skip:
        t0 = time.perf_counter()
        r = determinism(args, shape, weights)
        bad = bool(r["differing"] or r["nonfinite"] or r["wrong_backend"])
        failed |= bad
        lines.append(f"determinism  {r['compared']} bitwise comparisons over pools/threads {r['configs']}, "
                     f"tokens {args.tokens}, deferral off/on: {r['differing']} differ, {r['nonfinite']} non-finite "
                     f"({time.perf_counter() - t0:.1f} s){'  FAIL' if bad else ''}")
        print("\nsetting        " + "".join(f"{b:>12}" for b in args.backends) + "   (differing / compared)")
        for setting in args.settings:
            cells = [r["rows"].get((setting, b)) for b in args.backends]
            print(f"{setting:<15}" + "".join(f"{'-' if c is None else f'{c[1]}/{c[0]}':>12}" for c in cells))
        for d in r["diffs"][:20]:
            print("  differs:", d)
        for d in sorted(set(r["wrong_backend"]))[:5]:
            print("  wrong backend:", d)
        for d in r["refused"][:5]:
            print("  refused:", d)
        report["determinism"] = {k: v for k, v in r.items() if k != "rows"}
        report["determinism"]["rows"] = {f"{s}/{b}": v for (s, b), v in r["rows"].items()}
    print("\n" + "\n".join(lines))
    print("soak: FAIL" if failed else "soak: OK")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
