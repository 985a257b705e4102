#!/usr/bin/env python3
"""The MoE layer at real model shapes, measured against the machine and against peers.

Each result is a layer call of KTMoEWrapper.forward (fresh random hidden
states and fresh random top-k routing every call; warm-up, then the median
over repeats), reported
  - against the machine, measured in the same run by bench_probes: decode as
    packed bytes of the distinct experts touched / time, a fraction of the
    read bandwidth; prefill as 2*T*k*3*H*I ops / time, a fraction of the
    vpdpbusd (INT4/INT8) or vdpbf16ps (BF16) peak;
  - against PyTorch: the same routing as a per-expert loop of bf16 matmuls,
    torch.set_num_threads(same), fresh inputs each call;
  - against oneDNN: for every call, the sum over its active experts of one
    oneDNN matmul per projection at that expert's (tokens, N, K)
    (bench_onednn_matmul; int8 u8 x s8 for INT4/INT8, bf16 for BF16), with
    each expert's token count interpolated between measured M values.
Ratios > 1 mean kt_kernel is faster. Roofs are the best of the probe's
repeats (the host may be shared); timings are medians.

    python bench/moe_bench.py --quick                 # sanity run, minutes
    python bench/moe_bench.py                         # full run (AVX-512 backend: ~15-20 min)
    python bench/moe_bench.py --models dsv2-lite --methods INT8 --tokens 1,512 --threads 2

Writes bench/results/moe_bench.json and bench/results/moe_bench.md and
prints the table. The C++ binaries are built into build/bench if missing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "bench"
BIN_DIR = BUILD_DIR / "bench"
RESULTS_DIR = ROOT / "bench" / "results"

DECODE_MAX_TOKENS = 32  # DESIGN.md: decode = T <= 32 (bandwidth bound), prefill above
ADJACENT_PROBE_BYTES = 512 << 20  # the read probe run right before and after each decode row
# Adjacent probes that differ by more than this factor met a bandwidth switch (~50 <-> ~80 GB/s).
STABLE_STATE = 1.15


@dataclass(frozen=True)
class Model:
    title: str
    experts: int  # the model's expert count (the DeepSeek-V3 layer is capped by memory)
    top_k: int
    hidden: int
    inter: int
    fit_memory: bool = False


MODELS: Dict[str, Model] = {
    "dsv2-lite": Model("DeepSeek-V2-Lite", 64, 6, 2048, 1408),
    "qwen3-30b-a3b": Model("Qwen3-30B-A3B", 128, 8, 2048, 768),
    # DeepSeek-V3 has 256 routed experts, Kimi-K2 384, both top-8 at H 7168, I 2048:
    # as many as fit the packed-weight budget.
    "dsv3": Model("DeepSeek-V3/Kimi-K2 layer", 256, 8, 7168, 2048, fit_memory=True),
    "tiny": Model("tiny (sanity shapes, cache-resident)", 8, 2, 256, 128),
}

# Bench name -> (KTMoEWrapper method, group_size, oneDNN peer dtype, probe roof for prefill)
METHODS = {
    "INT4": ("AMXINT4", 128, "int8", "vnni_int8_tops"),
    "INT8": ("AMXINT8", None, "int8", "vnni_int8_tops"),
    "BF16": ("BF16", None, "bf16", "bf16_tflops"),
}

# oneDNN is measured at these M and interpolated linearly in between.
M_LADDER = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
            3072, 4096, 6144, 8192]

# Targets of the issue (2 threads): (method, tokens, metric, threshold, text)
TARGETS = [
    ("INT4", 1, "frac_bw_adjacent", 0.85, "INT4 decode (1 token) >= 85% of read bandwidth (adjacent probe)"),
    ("INT8", 1, "frac_bw_adjacent", 0.85, "INT8 decode (1 token) >= 85% of read bandwidth (adjacent probe)"),
    ("INT8", 512, "frac_peak", 0.60, "INT8 prefill 512 tokens >= 60% of VNNI peak"),
    ("INT4", 512, "frac_peak", 0.50, "INT4 prefill 512 tokens >= 50% of VNNI peak"),
    ("BF16", 512, "frac_peak", 0.60, "BF16 prefill 512 tokens >= 60% of BF16 peak"),
]
TARGET_THREADS = 2


def log(msg: str) -> None:
    print(f"[moe_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def int_list(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def str_list(s: str) -> List[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


# --------------------------------------------------------------------------- options
@dataclass
class Plan:
    models: List[str]
    methods: List[str]
    tokens: List[int]
    threads: List[int]
    reps_min: int
    reps_max: int
    row_target_s: float  # stop after reps_min once this much timed work is done
    row_budget_s: float  # hard cap per row (then as few as one timed call)
    warmup_s: float
    probe_args: List[str]
    onednn_reps: int
    onednn_max_ms: float
    onednn_decode_max_ms: float
    onednn_cold_mib: float


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sanity run: tiny shapes, tokens 1,16,128, few reps, short probes (defaults only; "
                        "explicit filters still apply)")
    p.add_argument("--models", type=str_list, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--methods", type=str_list, help="comma list of INT4, INT8, BF16")
    p.add_argument("--tokens", type=int_list, help="comma list (default 1,4,16,128,512,2048)")
    p.add_argument("--threads", type=int_list, help="comma list (default 1 and all CPUs)")
    p.add_argument("--reps-min", type=int)
    p.add_argument("--reps-max", type=int)
    p.add_argument("--row-target-s", type=float, help="timed seconds per row after which reps-min suffices")
    p.add_argument("--row-budget-s", type=float, help="hard cap of seconds per row")
    p.add_argument("--mem-gib", type=float, default=6.0,
                   help="packed-weight budget for the memory-capped layer (dsv3), GiB (default 6)")
    p.add_argument("--dsv3-experts", type=int, help="expert count of the dsv3 layer (default: what fits --mem-gib)")
    p.add_argument("--dsv3-sources", type=int, default=16,
                   help="distinct random bf16 source experts for dsv3 (slots map onto them; each slot is "
                        "still packed separately, so every slot's weights are distinct memory; default 16)")
    p.add_argument("--backend", default="", help="force a kt_kernel backend (kt_kernel.set_backend)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--no-onednn", action="store_true", help="skip the oneDNN peer")
    p.add_argument("--pin", action="store_true", help="pin the probe threads")
    p.add_argument("--rebuild", action="store_true", help="rebuild the C++ bench binaries first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default bench/results)")
    args = p.parse_args(argv)

    ncpu = os.cpu_count() or 1
    q = args.quick
    models = args.models or (["tiny"] if q else ["dsv2-lite", "qwen3-30b-a3b", "dsv3"])
    methods = args.methods or list(METHODS)
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (known: {', '.join(MODELS)})")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    threads = sorted(set(args.threads or [1, ncpu]))
    plan = Plan(
        models=models,
        methods=methods,
        tokens=args.tokens or ([1, 16, 128] if q else [1, 4, 16, 128, 512, 2048]),
        threads=threads,
        reps_min=args.reps_min or (3 if q else 5),
        reps_max=args.reps_max or (5 if q else 50),
        row_target_s=args.row_target_s if args.row_target_s is not None else (0.2 if q else 1.5),
        row_budget_s=args.row_budget_s if args.row_budget_s is not None else (20.0 if q else 30.0),
        warmup_s=0.05 if q else 0.3,
        probe_args=(["--bw-repeats", "8", "--repeats", "3", "--compute-ms", "50"] if q else
                    ["--bw-repeats", "20", "--repeats", "7", "--compute-ms", "200"]),
        onednn_reps=20 if q else 200,
        onednn_max_ms=100 if q else 600,
        onednn_decode_max_ms=50 if q else 300,
        onednn_cold_mib=64 if q else 256,
    )
    if min(plan.tokens) < 1 or min(plan.threads) < 1:
        p.error("tokens and threads must be >= 1")
    return args, plan


# --------------------------------------------------------------------------- binaries
def _tool_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def ensure_binaries(want_onednn: bool, rebuild: bool) -> Dict[str, Optional[Path]]:
    """Paths of bench_probes and bench_onednn_matmul (None where they cannot be built)."""
    names = ["bench_probes"] + (["bench_onednn_matmul"] if want_onednn else [])
    found: Dict[str, Optional[Path]] = {n: BIN_DIR / n for n in names}
    missing = [n for n in names if rebuild or not (BIN_DIR / n).exists()]
    if missing:
        env = _tool_env()
        cmake = shutil.which("cmake", path=env["PATH"])
        if cmake is None:
            raise SystemExit("moe_bench: cmake not found (run scripts/setup.sh --bench)")
        # (Re)configure: the folder may exist from a configuration without KT_BUILD_BENCH.
        fresh = not (BUILD_DIR / "CMakeCache.txt").exists()
        gen = ["-G", "Ninja"] if fresh and shutil.which("ninja", path=env["PATH"]) else []
        log(f"configuring {BUILD_DIR}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(BUILD_DIR), *gen, "-DKT_BUILD_BENCH=ON",
                        "-DKT_BUILD_PYTHON=OFF"], check=True, env=env, stdout=subprocess.DEVNULL)
        for n in missing:
            log(f"building {n}")
            r = subprocess.run([cmake, "--build", str(BUILD_DIR), "--target", n], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                if n == "bench_probes":
                    sys.stderr.write(r.stdout[-4000:])
                    raise SystemExit("moe_bench: building bench_probes failed")
                log(f"{n} could not be built (is libdnnl-dev installed? scripts/setup.sh --bench); "
                    "the oneDNN peer is skipped")
                found[n] = None
    return found


def _cpu_times() -> Tuple[float, float, float]:
    """(busy, steal, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    steal = v[7] if len(v) > 7 else 0.0
    total = sum(v[:8])
    return total - idle - steal, steal, total


def others_busy(window_s: float = 0.1) -> float:
    """Fraction of the machine's CPU time used by other processes (and stolen by the hypervisor)
    while this one sleeps: how contended the next measurement will be."""
    try:
        time.sleep(0.02)  # let our own spinning workers (pool, OpenMP) go to sleep
        b0, s0, t0 = _cpu_times()
        time.sleep(window_s)
        b1, s1, t1 = _cpu_times()
        return max(0.0, ((b1 - b0) + (s1 - s0)) / max(t1 - t0, 1e-9))
    except OSError:
        return float("nan")


BUSY_WARN = 0.2  # rows measured while others used more than this fraction of the CPUs are flagged


def run_json(cmd: List[str], env: Optional[Dict[str, str]] = None) -> dict:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout)


# --------------------------------------------------------------------------- timing
@dataclass
class Series:
    seconds: List[float] = field(default_factory=list)
    info: List[dict] = field(default_factory=list)
    warmup_calls: int = 0
    capped: bool = False  # stopped by the per-row budget before reps_min
    others_busy: Tuple[float, float] = (0.0, 0.0)  # before and after

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure(make_inputs: Callable[[], tuple], call: Callable[..., object], plan: Plan,
            describe: Optional[Callable[[tuple], dict]] = None) -> Series:
    """Times `call(*make_inputs())`: fresh inputs for every call, generated outside the timed region."""
    s = Series()
    busy0 = others_busy()
    start = time.perf_counter()
    warm_spent = 0.0
    reps_min = plan.reps_min
    while True:  # warm-up: at least one call, more while they are cheap
        inputs = make_inputs()
        t0 = time.perf_counter()
        call(*inputs)
        dt = time.perf_counter() - t0
        warm_spent += dt
        s.warmup_calls += 1
        if warm_spent >= plan.warmup_s or s.warmup_calls >= 20 or dt > plan.row_budget_s / 4:
            break
    if dt > plan.row_target_s:  # slow calls (large prefill): three timed calls are enough
        reps_min = min(reps_min, 3)
    timed = 0.0
    while True:
        inputs = make_inputs()
        t0 = time.perf_counter()
        call(*inputs)
        dt = time.perf_counter() - t0
        timed += dt
        s.seconds.append(dt)
        s.info.append(describe(inputs) if describe else {})
        n = len(s.seconds)
        if n >= plan.reps_max or (n >= reps_min and timed >= plan.row_target_s):
            break
        if time.perf_counter() - start + dt > plan.row_budget_s:
            s.capped = n < reps_min
            break
    s.others_busy = (round(busy0, 3), round(others_busy(), 3))
    return s


# --------------------------------------------------------------------------- workloads
class Inputs:
    """Fresh random hidden states and top-k routing (distinct experts per token) per call."""

    def __init__(self, torch, E: int, k: int, H: int, seed: int):
        self.torch, self.E, self.k, self.H = torch, E, k, H
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, T: int):
        torch = self.torch
        x = torch.randn(T, self.H, generator=self.gen, dtype=torch.bfloat16)
        ids = torch.rand(T, self.E, generator=self.gen).topk(self.k, dim=1).indices  # int64, distinct per token
        w = torch.softmax(torch.randn(T, self.k, generator=self.gen), dim=1)  # float32
        return x, ids, w


def expert_counts(torch, ids, E: int) -> List[int]:
    """Tokens per active expert in this call."""
    c = torch.bincount(ids.reshape(-1), minlength=E)
    return [int(v) for v in c[c > 0].tolist()]


def make_sources(torch, model: Model, n_src: int, seed: int):
    """Random bf16 gate/up [n, I, H] and down [n, H, I], generated one expert at a time."""
    gen = torch.Generator().manual_seed(seed)
    H, I = model.hidden, model.inter
    gate = torch.empty(n_src, I, H, dtype=torch.bfloat16)
    up = torch.empty(n_src, I, H, dtype=torch.bfloat16)
    down = torch.empty(n_src, H, I, dtype=torch.bfloat16)
    for e in range(n_src):
        gate[e].normal_(0.0, H ** -0.5, generator=gen)
        up[e].normal_(0.0, H ** -0.5, generator=gen)
        down[e].normal_(0.0, I ** -0.5, generator=gen)
    return gate, up, down


def torch_moe(torch, F, x, ids, w, sources, slot_to_src: List[int]):
    """The PyTorch peer: a per-expert loop of bf16 matmuls, fp32 combine, output in x's dtype."""
    gate, up, down = sources
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(slot_to_src)).tolist()
    tok = order // k
    wsorted = w.reshape(-1)[order]
    y = torch.zeros(T, x.shape[1], dtype=torch.float32)
    pos = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        sel = tok[pos:pos + c]
        we = wsorted[pos:pos + c]
        pos += c
        s = slot_to_src[e]
        xe = x.index_select(0, sel)
        h = F.silu(xe @ gate[s].t()) * (xe @ up[s].t())
        y.index_add_(0, sel, (h @ down[s].t()).float() * we[:, None])
    return y.to(x.dtype)


# --------------------------------------------------------------------------- the run
class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan):
        import torch
        import torch.nn.functional as F

        import kt_kernel
        from kt_kernel import _pool

        self.args, self.plan = args, plan
        self.torch, self.F, self.kt, self.pool_mod = torch, F, kt_kernel, _pool
        if args.backend:
            kt_kernel.set_backend(args.backend)
        self.rows: List[dict] = []
        self.models_used: Dict[str, dict] = {}
        self.onednn_raw: List[dict] = []
        self.onednn_binary: Optional[Path] = None  # set by main when the peer is built

    # ---- kt_kernel
    def make_wrapper(self, model: Model, E: int, method: str, threads: int):
        kt_method, group, _, _ = METHODS[method]
        self.pool_mod.reset_pool_for_tests()  # the process-wide pool takes the new thread count
        return self.kt.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=model.top_k,
                                    hidden_size=model.hidden, moe_intermediate_size=model.inter,
                                    cpuinfer_threads=threads, threadpool_count=1, method=kt_method,
                                    group_size=group, chunked_prefill_size=max(8192, max(self.plan.tokens)))

    def bytes_per_expert(self, model: Model, method: str, sources) -> int:
        """Packed bytes of one expert, measured on a one-expert layer."""
        w = self.make_wrapper(model, 1, method, self.plan.threads[0])
        w.load_weights_from_tensors(sources[0][:1], sources[1][:1], sources[2][:1])
        b = w.packed_bytes
        del w
        self.drop_pool()
        return b

    def drop_pool(self) -> None:
        """Ends the pool of the wrappers just deleted, so no idle workers of ours linger during the peers."""
        gc.collect()
        self.pool_mod.reset_pool_for_tests()
        gc.collect()

    def run(self) -> None:
        for name in self.plan.models:
            model = MODELS[name]
            self.run_model(name, model)
            gc.collect()

    def run_model(self, name: str, model: Model) -> None:
        torch, plan = self.torch, self.plan
        H, I, k = model.hidden, model.inter, model.top_k
        n_src = model.experts
        if model.fit_memory:
            n_src = min(self.args.dsv3_sources, model.experts)
        t0 = time.perf_counter()
        sources = make_sources(torch, model, n_src, self.args.seed + 1)
        log(f"{name}: {n_src} random bf16 source experts in {time.perf_counter() - t0:.1f} s")
        E = model.experts
        per_expert = {}
        if model.fit_memory:
            for m in plan.methods:
                per_expert[m] = self.bytes_per_expert(model, m, sources)
            E = self.args.dsv3_experts or max(
                1, min(model.experts, int(self.args.mem_gib * 2 ** 30 // max(per_expert.values()))))
            log(f"{name}: packed bytes per expert {per_expert}; {E} experts fit {self.args.mem_gib} GiB")
        slot_to_src = [e % n_src for e in range(E)]
        slot_map = torch.tensor(slot_to_src, dtype=torch.int64)
        self.models_used[name] = dict(title=model.title, experts=E, model_experts=model.experts, top_k=k,
                                      hidden=H, inter=I, source_experts=n_src)
        inputs = Inputs(torch, E, k, H, self.args.seed + 2)

        for threads in plan.threads:
            # PyTorch peer first (no kt_kernel pool alive, so no spinning workers around).
            torch_stats: Dict[int, Series] = {}
            if not self.args.no_torch:
                torch.set_num_threads(threads)
                for T in plan.tokens:
                    s = measure(lambda: inputs(T),
                                lambda x, ids, w: torch_moe(torch, self.F, x, ids, w, sources, slot_to_src), plan)
                    torch_stats[T] = s
                    log(f"{name} torch-bf16 T={T} threads={threads}: {s.median * 1e3:.3f} ms "
                        f"({len(s.seconds)} reps)")
            torch.set_num_threads(1)  # input generation only from here on
            for method in plan.methods:
                t0 = time.perf_counter()
                wrapper = self.make_wrapper(model, E, method, threads)
                if n_src == E:
                    wrapper.load_weights_from_tensors(*sources)
                else:
                    wrapper.load_weights_from_tensors(*sources, physical_to_logical_map=slot_map)
                load_s = time.perf_counter() - t0
                bpe = wrapper.packed_bytes / E
                for T in plan.tokens:
                    row = self.run_row(name, model, E, method, threads, T, wrapper, inputs, bpe, sources,
                                       slot_to_src, torch_stats.get(T))
                    row["load_s"] = round(load_s, 2)
                    if self.onednn_binary and row["regime"] == "decode":
                        self.run_onednn_decode(self.onednn_binary, row, wrapper)
                    self.rows.append(row)
                del wrapper
                self.drop_pool()
            torch.set_num_threads(max(plan.threads))
        del sources
        gc.collect()

    def run_row(self, name, model: Model, E, method, threads, T, wrapper, inputs, bpe, sources, slot_to_src,
                torch_series: Optional[Series]) -> dict:
        torch = self.torch

        def describe(inp):
            counts = expert_counts(torch, inp[1], E)
            return {"distinct": len(counts), "counts": counts}

        # Decode is bound by memory bandwidth, which on a shared host moves by tens of percent within
        # minutes: the read probe also runs right before and after the row, on the layer's own pool.
        adjacent = []
        if T <= DECODE_MAX_TOKENS:
            adjacent.append(self.adjacent_read_bw(wrapper))
        s = measure(lambda: inputs(T), wrapper.forward, self.plan, describe)
        if T <= DECODE_MAX_TOKENS:
            adjacent.append(self.adjacent_read_bw(wrapper))
        backend = self.kt.last_used_backend()
        # Accuracy sanity against the bf16 PyTorch loop on a few tokens (a fast wrong kernel is no result).
        x, ids, w = inputs(T)
        y = wrapper.forward(x, ids, w)
        n = min(T, 8)
        ref = torch_moe(torch, self.F, x[:n], ids[:n], w[:n], sources, slot_to_src).float()
        err = float((y[:n].float() - ref).norm() / ref.norm().clamp_min(1e-30))

        med = s.median
        ops = 2.0 * T * model.top_k * 3 * model.hidden * model.inter
        gbs = statistics.median(bpe * i["distinct"] / t / 1e9 for t, i in zip(s.seconds, s.info))
        row = dict(model=name, experts=E, method=method, kt_method=METHODS[method][0], tokens=T, threads=threads,
                   regime="decode" if T <= DECODE_MAX_TOKENS else "prefill", backend=backend,
                   ms=med * 1e3, ms_min=min(s.seconds) * 1e3, reps=len(s.seconds), warmup=s.warmup_calls,
                   capped=s.capped, tokens_per_s=T / med,
                   distinct_experts=statistics.median(i["distinct"] for i in s.info),
                   packed_bytes_per_expert=bpe, gbs=gbs, tops=ops / med / 1e12, rel_err_vs_torch=err,
                   others_busy=list(s.others_busy), adjacent_read_gbs=[round(b, 2) for b in adjacent],
                   expert_counts=[i["counts"] for i in s.info])
        if torch_series is not None:
            row["torch_ms"] = torch_series.median * 1e3
            row["vs_torch"] = torch_series.median / med
            row["torch_others_busy"] = list(torch_series.others_busy)
        row["contended"] = max(row["others_busy"] + row.get("torch_others_busy", [])) > BUSY_WARN
        log(f"{name} {method} T={T} threads={threads} [{backend}]: {med * 1e3:.3f} ms, {gbs:.1f} GB/s, "
            f"{row['tops']:.3f} TOP/s, err {err:.2e}" + (f", x{row['vs_torch']:.2f} vs torch" if torch_series else ""))
        return row

    def adjacent_read_bw(self, wrapper) -> float:
        """GB/s of the read probe (best of 3 over 512 MiB) on the pool the layer runs on."""
        from kt_kernel import _kt_kernel
        return float(_kt_kernel.measure_read_bandwidth(wrapper._pool, ADJACENT_PROBE_BYTES, 3))

    # ---- oneDNN peer
    def onednn_tables(self, binary: Path, name: str, dtype: str, threads: int, pts: set,
                      reps: int, max_ms: float) -> Tuple[Dict[int, float], Dict[int, float], bool]:
        """oneDNN times per M (seconds) for gate/up (N = I, K = H) and down (N = H, K = I) at the ladder
        points pts, and whether other processes were busy around them."""
        plan, mu = self.plan, self.models_used[name]
        tables, busy = [], False
        for N, K in ((mu["inter"], mu["hidden"]), (mu["hidden"], mu["inter"])):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            cmd = [str(binary), "--m", ",".join(map(str, sorted(pts))), "--n", str(N), "--k", str(K),
                   "--dtype", dtype, "--threads", str(threads), "--reps", str(reps),
                   "--max-ms", str(max_ms), "--cold-mib", str(plan.onednn_cold_mib)]
            log(f"oneDNN {dtype} N={N} K={K} threads={threads} M={sorted(pts)}")
            busy_before = others_busy()
            res = run_json(cmd, env)
            res["others_busy"] = [round(busy_before, 3), round(others_busy(), 3)]
            busy = busy or max(res["others_busy"]) > BUSY_WARN
            res["model"] = name
            self.onednn_raw.append(res)
            tables.append({e["m"]: e["median_us"] * 1e-6 for e in res["results"]})
        return tables[0], tables[1], busy

    @staticmethod
    def attach_onednn(r: dict, dtype: str, gu: Dict[int, float], dn: Dict[int, float], busy: bool) -> None:
        per_call = [sum(2 * _interp(gu, m) + _interp(dn, m) for m in counts) for counts in r["expert_counts"]]
        r["onednn_dtype"] = dtype
        r["onednn_ms"] = statistics.median(per_call) * 1e3
        r["vs_onednn"] = r["onednn_ms"] / r["ms"]
        r["onednn_contended"] = busy
        r["contended"] = r.get("contended", False) or busy

    def run_onednn_decode(self, binary: Path, r: dict, wrapper) -> None:
        """A decode row's peer, measured straight after the row (seconds, not minutes, apart: the host's
        2-thread read bandwidth switches between ~50 and ~80 GB/s within minutes, and decode time follows
        it), with the read probe on the layer's pool right before and after the peer as well."""
        dtype = METHODS[r["method"]][2]
        pts = {p for counts in r["expert_counts"] for m in set(counts) for p in _bracket(m)}
        reads = [self.adjacent_read_bw(wrapper)]
        gu, dn, busy = self.onednn_tables(binary, r["model"], dtype, r["threads"], pts,
                                          self.plan.onednn_reps, self.plan.onednn_decode_max_ms)
        reads.append(self.adjacent_read_bw(wrapper))
        self.attach_onednn(r, dtype, gu, dn, busy)
        r["onednn_adjacent_read_gbs"] = [round(b, 2) for b in reads]
        # The ratio at the row's bandwidth (memory-bound time scales with 1 / bandwidth): the lower probe
        # around the peer over the higher one around the row, the choice least favourable to kt_kernel;
        # only where each side's probes agree (a state that switched during a measurement has no value).
        own = r.get("adjacent_read_gbs") or []
        if own and max(reads) <= STABLE_STATE * min(reads) and max(own) <= STABLE_STATE * min(own):
            r["vs_onednn_same_bw"] = r["vs_onednn"] * min(reads) / max(own)

    def run_onednn(self, binary: Path) -> None:
        """The prefill rows' peers (compute-bound, so measured together at the end of the run)."""
        plan = self.plan
        needs: Dict[Tuple[str, str, int], set] = {}  # (model, dtype, threads) -> M ladder points
        for r in self.rows:
            if "vs_onednn" in r:
                continue
            dtype = METHODS[r["method"]][2]
            pts = needs.setdefault((r["model"], dtype, r["threads"]), set())
            for counts in r["expert_counts"]:
                for m in set(counts):
                    pts.update(_bracket(m))
        tables = {}
        for (name, dtype, threads), pts in needs.items():
            tables[(name, dtype, threads)] = self.onednn_tables(binary, name, dtype, threads, pts, plan.onednn_reps,
                                                                plan.onednn_max_ms)
        for r in self.rows:
            if "vs_onednn" in r:
                continue
            dtype = METHODS[r["method"]][2]
            self.attach_onednn(r, dtype, *tables[(r["model"], dtype, r["threads"])])


def _bracket(m: int) -> List[int]:
    """The ladder points needed to interpolate at m."""
    if m in M_LADDER:
        return [m]
    hi = next((v for v in M_LADDER if v > m), None)
    if hi is None:
        return [m]
    lo = max(v for v in M_LADDER if v < m)
    return [lo, hi]


def _interp(times: Dict[int, float], m: int) -> float:
    if m in times:
        return times[m]
    lo = max(v for v in times if v < m)
    hi = min(v for v in times if v > m)
    return times[lo] + (times[hi] - times[lo]) * (m - lo) / (hi - lo)


# --------------------------------------------------------------------------- report
ROOF_KEYS = ("read_bandwidth_gbs", "vnni_int8_tops", "bf16_tflops", "fp32_fma_tflops")


def merge_probes(passes: List[dict]) -> dict:
    """Roofs over several probe passes: per thread count, the largest best and the largest median."""
    out = dict(passes[0])
    for key in ROOF_KEYS:
        merged = {}
        for t in passes[0].get(key) or {}:
            vals = [p[key][t] for p in passes if (p.get(key) or {}).get(t)]
            merged[t] = ({"best": max(v["best"] for v in vals), "median": max(v["median"] for v in vals)}
                         if vals else None)
        out[key] = merged
    out["cpu"] = dict(passes[0]["cpu"], clock_ghz_estimate=max(p["cpu"]["clock_ghz_estimate"] for p in passes))
    return out


def attach_roofs(rows: List[dict], probes: dict) -> None:
    for r in rows:
        t = str(r["threads"])
        bw = (probes.get("read_bandwidth_gbs") or {}).get(t)
        peak_key = METHODS[r["method"]][3]
        peak = (probes.get(peak_key) or {}).get(t)
        r["roof_bw_gbs"] = bw["best"] if bw else None
        r["roof_peak_key"] = peak_key
        r["roof_peak_tops"] = peak["best"] if peak else None
        r["frac_bw"] = r["gbs"] / bw["best"] if bw else None
        adj = r.get("adjacent_read_gbs") or []
        # The higher of the two adjacent probes: the conservative roof for the row.
        r["roof_bw_adjacent_gbs"] = max(adj) if adj else None
        r["frac_bw_adjacent"] = r["gbs"] / max(adj) if adj else None
        # Probes that disagree: the host switched bandwidth state around the row, so the roof is unknown
        # (the higher probe stays the roof; the row is marked for a rerun).
        r["bw_state_switched"] = bool(adj) and max(adj) > STABLE_STATE * min(adj)
        r["frac_peak"] = r["tops"] / peak["best"] if peak else None


def evaluate_targets(rows: List[dict], models: List[str]) -> List[dict]:
    out = []
    for name in models:
        for method, T, metric, thr, text in TARGETS:
            r = next((r for r in rows if r["model"] == name and r["method"] == method and r["tokens"] == T
                      and r["threads"] == TARGET_THREADS), None)
            v = r.get(metric) if r else None
            out.append(dict(model=name, target=text, value=v, threshold=thr, contended=bool(r and r.get("contended")),
                            state_switched=bool(r and r.get("bw_state_switched") and metric == "frac_bw_adjacent"),
                            status="not run" if v is None else ("pass" if v >= thr else "FAIL")))
        for method in ("INT8", "INT4"):
            rs = [r for r in rows if r["model"] == name and r["method"] == method and r["threads"] == TARGET_THREADS
                  and r.get("vs_onednn") is not None]
            if rs:
                # Decode rows compare at the row's bandwidth state where the peer's adjacent probes exist.
                def ratio(r):
                    return r.get("vs_onednn_same_bw", r["vs_onednn"])
                worst = min(rs, key=ratio)
                out.append(dict(model=name, target=f"{method} faster than oneDNN int8 matmul (all token counts; "
                                "decode at the row's bandwidth)",
                                value=ratio(worst), threshold=1.0, worst_tokens=worst["tokens"],
                                contended=bool(worst.get("contended")),
                                # a decode row without a state-matched ratio: probes disagreed around it or its peer
                                state_switched=worst["regime"] == "decode" and "vs_onednn_same_bw" not in worst,
                                status="pass" if ratio(worst) > 1.0 else "FAIL"))
            elif method == "INT8":
                out.append(dict(model=name, target="INT8 faster than oneDNN int8 matmul (all token counts)",
                                value=None, threshold=1.0, status="not run"))
    return out


def _f(v, fmt: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, fmt)


def markdown(meta: dict, probes: dict, rows: List[dict], targets: List[dict], models_used: Dict[str, dict]) -> str:
    L = ["# kt_kernel MoE layer bench", "",
         f"{meta['date']} · {meta['cpu']} · {meta['logical_cpus']} CPUs · kt_kernel {meta['kt_kernel']} "
         f"(backends {', '.join(meta['backends'])}) · torch {meta['torch']}" +
         (" · **quick mode**" if meta["quick"] else ""), "",
         f"Rows marked ⚠ ({meta['contended_rows']} of {meta['rows']}): other processes used more than "
         f"{BUSY_WARN:.0%} of the CPUs just before or after the kt_kernel, PyTorch or oneDNN measurement (sampled from "
         "/proc/stat while the bench sleeps); their timings, 2-thread ones above all, are not trustworthy: rerun them.",
         "",
         "## Machine roofs (bench_probes at the start and end of the run: best of all repeats; "
         "larger median of the two passes in brackets)", "",
         "| threads | read GB/s | int8 VNNI TOP/s | bf16 TFLOP/s | fp32 FMA TFLOP/s |", "|---|---|---|---|---|"]
    for t in sorted({int(k) for k in probes.get("read_bandwidth_gbs", {})}):
        cells = []
        for key, fmt in (("read_bandwidth_gbs", ".1f"), ("vnni_int8_tops", ".3f"), ("bf16_tflops", ".3f"),
                         ("fp32_fma_tflops", ".3f")):
            v = (probes.get(key) or {}).get(str(t))
            cells.append("–" if not v else f"{v['best']:{fmt}} ({v['median']:{fmt}})")
        L.append(f"| {t} | " + " | ".join(cells) + " |")
    L += ["", f"Clock estimate {probes.get('cpu', {}).get('clock_ghz_estimate', 0):.2f} GHz.", "",
          "## Layers", "",
          "| key | model | experts used | top-k | H | I | distinct source experts |", "|---|---|---|---|---|---|---|"]
    for k, m in models_used.items():
        L.append(f"| {k} | {m['title']} | {m['experts']} (model: {m['model_experts']}) | {m['top_k']} | {m['hidden']} "
                 f"| {m['inter']} | {m['source_experts']} |")
    L += ["", "## Results", "",
          "ms = median per layer call; GB/s = packed bytes of the distinct experts touched / time (%BW of the "
          "probe's read bandwidth at the same thread count; %BW adj: of the higher of two read probes run on "
          "the layer's own pool right before and right after the row, decode rows only — the 2-thread "
          "bandwidth of a shared host moves within minutes); TOP/s = 2·T·k·3·H·I / time (%peak of VNNI for "
          "INT4/INT8, of vdpbf16ps for BF16). The roof that matters is in bold: bandwidth for decode "
          f"(T ≤ {DECODE_MAX_TOKENS}), compute for prefill. ×torch, ×oneDNN = peer time / kt_kernel time "
          "(> 1: kt_kernel faster); a decode row's oneDNN peer runs straight after the row, and in brackets "
          "is its ratio at the row's bandwidth (the peer's time × the lower read probe around it / the higher "
          "one around the row, where each pair agrees within 15%: "
          "memory-bound time scales with 1 / bandwidth, which can switch within minutes). "
          "err = relative L2 error vs the bf16 PyTorch loop on up to 8 tokens. ↯: the two read probes around "
          "a decode row differ by more than 15%: the host switched bandwidth state around the row, whose roof "
          "(the higher probe) is then uncertain; rerun it.", "",
          "| model | E | method | T | thr | backend | ms | tok/s | GB/s | %BW | %BW adj | TOP/s | %peak | ×torch | ×oneDNN | err |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = r["regime"] == "decode"
        bw = _f(r.get("frac_bw"), ".1f", 100)
        adj = _f(r.get("frac_bw_adjacent"), ".1f", 100)
        if r.get("roof_bw_adjacent_gbs"):
            adj += f" of {r['roof_bw_adjacent_gbs']:.1f}" + (" ↯" if r.get("bw_state_switched") else "")
        pk = _f(r.get("frac_peak"), ".1f", 100)
        L.append("| " + " | ".join([
            r["model"], str(r["experts"]), r["method"], str(r["tokens"]), str(r["threads"]), r["backend"],
            f"{r['ms']:.3f}" + (" (capped)" if r["capped"] else "") + (" ⚠" if r.get("contended") else ""), f"{r['tokens_per_s']:.0f}",
            f"{r['gbs']:.1f}", bw, f"**{adj}**" if dec else adj, f"{r['tops']:.3f}", pk if dec else f"**{pk}**",
            _f(r.get("vs_torch"), ".2f"),
            _f(r.get("vs_onednn"), ".2f") + (f" ({r['vs_onednn_same_bw']:.2f})" if r.get("vs_onednn_same_bw") else ""),
            f"{r['rel_err_vs_torch']:.1e}"]) + " |")
    L += ["", f"## Targets ({TARGET_THREADS} threads)", "", "| model | target | value | status |", "|---|---|---|---|"]
    for t in targets:
        if t["value"] is None:
            val = "–"
        elif "oneDNN" in t["target"]:
            val = f"worst ×{t['value']:.2f} (T={t.get('worst_tokens')})"
        else:
            val = f"{t['value'] * 100:.1f}%"
        L.append(f"| {t['model']} | {t['target']} | {val} | {t['status']}{' ⚠' if t.get('contended') else ''}"
                 f"{' ↯' if t.get('state_switched') else ''} |")
    L.append("")
    return "\n".join(L)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, plan = parse_args(argv)
    import torch

    import kt_kernel

    bins = ensure_binaries(not args.no_onednn, args.rebuild)
    log(f"kt_kernel backends {kt_kernel.backends()}; plan: models {plan.models}, methods {plan.methods}, "
        f"tokens {plan.tokens}, threads {plan.threads}")
    probe_cmd = [str(bins["bench_probes"]), "--threads", ",".join(map(str, plan.threads)), *plan.probe_args]
    if args.pin:
        probe_cmd.append("--pin")
    log("probing the machine: " + " ".join(probe_cmd[1:]))
    busy = others_busy()
    probe_passes = [dict(run_json(probe_cmd), others_busy_before=round(busy, 3))]
    log(f"read GB/s {probe_passes[0]['read_bandwidth_gbs']}; VNNI TOP/s {probe_passes[0]['vnni_int8_tops']}; "
        f"BF16 TFLOP/s {probe_passes[0]['bf16_tflops']}")

    bench = Bench(args, plan)
    if not args.no_onednn:
        bench.onednn_binary = bins.get("bench_onednn_matmul")
    t0 = time.perf_counter()
    bench.run()
    if not args.no_onednn and bins.get("bench_onednn_matmul"):
        bench.run_onednn(bins["bench_onednn_matmul"])
    log("probing the machine again (a neighbour's burst rarely covers both passes)")
    busy = others_busy()
    probe_passes.append(dict(run_json(probe_cmd), others_busy_before=round(busy, 3)))
    probes = merge_probes(probe_passes)
    attach_roofs(bench.rows, probes)
    targets = evaluate_targets(bench.rows, plan.models)

    info = kt_kernel.cpu_info()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=info.get("brand", platform.processor()),
                logical_cpus=os.cpu_count(), kt_kernel=kt_kernel.__version__, backends=kt_kernel.backends(),
                torch=torch.__version__, kt_kernel_pin=os.environ.get("KT_KERNEL_PIN", "1"), quick=args.quick, argv=sys.argv[1:], plan=plan.__dict__,
                cpu_info=info, wall_s=round(time.perf_counter() - t0, 1),
                rows=len(bench.rows), contended_rows=sum(1 for r in bench.rows if r.get("contended")))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = dict(meta=meta, probes=probes, probe_passes=probe_passes, models=bench.models_used, rows=bench.rows, targets=targets,
               onednn=bench.onednn_raw)
    (args.out / "moe_bench.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = markdown(meta, probes, bench.rows, targets, bench.models_used)
    (args.out / "moe_bench.md").write_text(md)
    print(md)
    log(f"wrote {args.out / 'moe_bench.json'} and {args.out / 'moe_bench.md'} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
