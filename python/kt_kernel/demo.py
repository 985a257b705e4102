"""The demo: a real model's MoE layers, end to end, on this CPU.

1. Writes a checkpoint with a real model's MoE shape (default Qwen3-30B-A3B:
   128 experts, top-8, hidden 2048, intermediate 768; a few layers) in the
   Hugging Face format (config.json + model.safetensors, bf16 tensors named
   model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight) with random
   weights: nothing is downloaded.
2. Converts it to INT4 with `kt-kernel convert` (the converter's API).
3. Loads each format through KTMoEWrapper: INT4 from the converted files,
   INT8 and BF16 straight from the checkpoint (quantised at load).
4. Runs decode (one token through every layer, forward() per layer: in CPU
   mode it runs the layer on the calling thread, as a CPU-only server would;
   submit_forward/sync_forward let a caller overlap other work, a GPU's
   above all) and prefill, and prints the error against a float64
   reference on the checkpoint's weights, tokens per second, and the
   fraction of this machine's memory read bandwidth that decode reaches
   (against read probes run right before and after each format's decode
   steps).
`--hf` instead generates text with a tiny Hugging Face model whose experts
run on kt_kernel (needs `pip install kt_kernel[hf]`). `--in-memory` skips
the checkpoint and packs random weights directly (the quickest look).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from . import _kt_kernel, _pool, backends, current_backend, last_used_backend
from .wrapper import KTMoEWrapper

MODELS: Dict[str, Dict[str, int]] = {
    "qwen3-30b-a3b": dict(num_experts=128, top_k=8, hidden=2048, intermediate=768, model_type="qwen3_moe"),
    "deepseek-v2-lite": dict(num_experts=64, top_k=6, hidden=2048, intermediate=1408, model_type="deepseek_v2"),
    "mixtral-8x7b": dict(num_experts=8, top_k=2, hidden=4096, intermediate=14336, model_type="mixtral"),
    "tiny": dict(num_experts=8, top_k=2, hidden=128, intermediate=256, model_type="qwen3_moe"),  # for tests
}
# The read probe run right before and after each format's decode steps (best of 3 over this many
# bytes), and the ratio of its two results above which the host's bandwidth is taken to have changed
# in between (as bench/moe_bench.py does).
_ADJACENT_PROBE_BYTES = 512 << 20
_SWITCH_FACTOR = 1.15
# Format -> (method, wrapper options, where its weights come from).
METHODS = {"INT4": ("AMXINT4", {"group_size": 128}, "converted"), "INT8": ("AMXINT8", {}, "checkpoint"),
           "BF16": ("BF16", {}, "checkpoint")}


class Progress:
    """One updating line on a terminal, plain lines otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last = 0.0

    def update(self, msg: str, force: bool = False) -> None:
        now = time.time()
        if self.tty and (force or now - self.last > 0.1):
            self.stream.write("\r\033[K" + msg)
            self.stream.flush()
            self.last = now
        elif not self.tty and force:
            self.stream.write(msg + "\n")

    def done(self, msg: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + msg + "\n")
        self.stream.flush()


def _bf16_pool(rng, n: int, scale: float) -> np.ndarray:
    """n bf16 bit patterns of N(0, scale^2), rounded to nearest even."""
    f = (rng.standard_normal(n, dtype=np.float32) * np.float32(scale)).view(np.uint32)
    return ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)


def write_checkpoint(path: str, shape: Dict, layers: int, seed: int, prog: Progress) -> float:
    """A Hugging Face checkpoint of `layers` MoE layers with random bf16 experts. Returns its size in GiB.

    Each expert matrix is a random window into a large pool of N(0, 1/fan_in)
    values (generating every weight independently would dominate the demo's
    time); windows start at random offsets, so experts differ."""
    from .weights.safetensors_io import StreamingWriter

    E, H, I, k = shape["num_experts"], shape["hidden"], shape["intermediate"], shape["top_k"]
    os.makedirs(path, exist_ok=True)
    config = {"model_type": shape["model_type"], "hidden_size": H,
              "moe_intermediate_size": I, "intermediate_size": 4 * I, "num_experts": E, "num_experts_per_tok": k,
              "num_hidden_layers": layers, "hidden_act": "silu", "norm_topk_prob": True, "torch_dtype": "bfloat16"}
    if shape["model_type"] == "mixtral":
        config.update(num_local_experts=E, intermediate_size=I)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    rng = np.random.default_rng(seed)
    pool_n = min(1 << 24, 64 * I * H)
    pool_h, pool_i = _bf16_pool(rng, pool_n + I * H, H ** -0.5), _bf16_pool(rng, pool_n + H * I, I ** -0.5)
    names = [(f"model.layers.{L}.mlp.experts.{e}.{p}_proj.weight", p) for L in range(layers) for e in range(E)
             for p in ("gate", "up", "down")]
    specs = [(n, "BF16", (H, I) if p == "down" else (I, H)) for n, p in names]
    w = StreamingWriter(os.path.join(path, "model.safetensors"), specs, {"format": "pt"})
    try:
        for i, (n, p) in enumerate(names):
            src = pool_i if p == "down" else pool_h
            off = int(rng.integers(0, pool_n))
            w.write(n, src[off:off + I * H].reshape((H, I) if p == "down" else (I, H)))
            if i % 48 == 0 or i == len(names) - 1:
                prog.update(f"[1/4] writing checkpoint: {i + 1}/{len(names)} tensors "
                            f"({100 * (i + 1) // len(names)}%)", force=i == len(names) - 1)
        w.close({"format": "pt"})
    except BaseException:
        w.abort()
        raise
    return os.path.getsize(os.path.join(path, "model.safetensors")) / 2 ** 30


def _routing(rng, T: int, E: int, k: int):
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int64)
    w = rng.random((T, k)).astype(np.float32)
    return ids, w / w.sum(axis=1, keepdims=True)


def _reference(src, L: int, x, ids, w, rows: int):
    """float64 MoE output of layer L for the first `rows` tokens, from the checkpoint's weights."""
    cache = {}

    def mat(e, which):
        if (e, which) not in cache:
            cache[(e, which)] = src.matrix(L, int(e), which).to_f64()
        return cache[(e, which)]

    y = np.zeros((rows, x.shape[1]))
    for t in range(rows):
        xt = x[t].astype(np.float64)
        for j in range(ids.shape[1]):
            e = ids[t, j]
            g, u = mat(e, "gate") @ xt, mat(e, "up") @ xt
            y[t] += w[t, j] * (mat(e, "down") @ (g / (1 + np.exp(-g)) * u))
    return y


def run(model: str, methods: List[str], threads: int, layers: int, decode_steps: int, prefill_tokens: int,
        seed: int, workdir: str, keep: bool, search: bool = False) -> None:
    from .weights.convert import convert, open_source

    shape = MODELS[model]
    E, k, H, I = shape["num_experts"], shape["top_k"], shape["hidden"], shape["intermediate"]
    prog = Progress()
    t_all = time.time()
    print(f"kt_kernel demo: {model}, {layers} MoE layers of {E} experts, top-{k}, hidden {H}, intermediate {I}")
    print(f"backends here: {', '.join(backends())}; running: {current_backend()}; threads: {threads}")
    _pool.reset_pool_for_tests()
    pool = _pool.get_pool(threads, [0])
    bw = _kt_kernel.measure_read_bandwidth(pool, 1 << 30, 5)
    print(f"memory read bandwidth: {bw:.1f} GB/s (read probe, {threads} threads, best of 5 over 1 GiB; "
          f"bench/ has the careful one)")
    own = workdir is None
    root = tempfile.mkdtemp(prefix="kt_kernel_demo_") if own else workdir
    ckpt, conv = os.path.join(root, "checkpoint"), os.path.join(root, "converted-int4")
    try:
        t0 = time.time()
        gib = write_checkpoint(ckpt, shape, layers, seed, prog)
        prog.done(f"[1/4] checkpoint written: {ckpt} ({gib:.2f} GiB bf16, Hugging Face names) in "
                  f"{time.time() - t0:.1f} s")
        if any(METHODS[m][2] == "converted" for m in methods):
            t0 = time.time()
            summ = convert(ckpt, conv, "AMXINT4", group_size=128, threads=threads, search=search,
                           progress=sys.stderr)
            errs = [v for d in summ["layers"].values() for v in d.values()]
            prog.done(f"[2/4] converted to INT4 (group 128{', MSE scale search' if search else ''}): {conv} ({summ['bytes_written'] / 2**30:.2f} GiB) in "
                      f"{time.time() - t0:.1f} s; weight relative RMS error {max(errs):.3f}")
        src = open_source(ckpt)
        rng = np.random.default_rng(seed + 1)
        rows = []
        for name in methods:
            method, kw, origin = METHODS[name]
            t0 = time.time()
            wrs = []
            for L in range(layers):
                wr = KTMoEWrapper(layer_idx=L, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                                  moe_intermediate_size=I, cpuinfer_threads=threads, threadpool_count=1,
                                  weight_path=conv if origin == "converted" else ckpt, method=method, **kw)
                wr.load_weights()
                wrs.append(wr)
                prog.update(f"[3/4] {name}: loading layer {L + 1}/{layers} from the {origin} files",
                            force=L == layers - 1)
            load_s = time.time() - t0
            bytes_per_expert = wrs[0].packed_bytes / E
            # Decode: one token through every layer per step, fresh routing per layer, between two
            # read probes (a shared host's bandwidth can switch within minutes: the decode figure is
            # stated against the probes around it, not the one at the start).
            bw_around = [_kt_kernel.measure_read_bandwidth(pool, _ADJACENT_PROBE_BYTES, 3)]
            step_times, layer_gbs = [], []
            for step in range(decode_steps + 2):
                x = rng.standard_normal((1, H)).astype(np.float32)
                routes = [_routing(rng, 1, E, k) for _ in range(layers)]
                t_step = time.perf_counter()
                for wr, (ids, w) in zip(wrs, routes):
                    t_l = time.perf_counter()
                    y = wr.forward(x, ids, w)
                    if step >= 2:
                        layer_gbs.append(len(np.unique(ids)) * bytes_per_expert / (time.perf_counter() - t_l) / 1e9)
                    x = (x + y).astype(np.float32)
                if step >= 2:
                    step_times.append(time.perf_counter() - t_step)
                prog.update(f"[4/4] {name}: decode step {step + 1}/{decode_steps + 2}")
            bw_around.append(_kt_kernel.measure_read_bandwidth(pool, _ADJACENT_PROBE_BYTES, 3))
            dec = float(np.median(step_times))
            dec_gbs = float(np.median(layer_gbs))
            roof = max(bw_around)
            switched = roof > _SWITCH_FACTOR * min(bw_around)
            # Prefill: every layer, then accuracy of layer 0 on its first tokens.
            x = rng.standard_normal((prefill_tokens, H)).astype(np.float32)
            ids, w = _routing(rng, prefill_tokens, E, k)
            prog.update(f"[4/4] {name}: prefill {prefill_tokens} tokens x {layers} layers", force=True)
            t_p = time.perf_counter()
            outs = [np.array(wr.forward(x, ids, w)) for wr in wrs]
            pre = (time.perf_counter() - t_p) / layers
            nref = min(4, prefill_tokens)
            ref = _reference(src, 0, x, ids, w, nref)
            err = float(np.linalg.norm(outs[0][:nref] - ref) / np.linalg.norm(ref))
            rows.append((name, origin, load_s, dec * 1e3 / layers, 1 / dec, dec_gbs, dec_gbs / roof, roof, switched,
                         pre * 1e3, prefill_tokens / pre, err))
            prog.done(f"      {name}: done on backend {last_used_backend()}")
            del wrs, outs
        print()
        print(f"{'format':6} {'weights from':12} {'load s':>7} {'decode ms/layer':>16} {'tok/s (' + str(layers) + ' layers)':>18}"
              f" {'GB/s':>6} {'of read probe':>15} {'prefill ms/layer':>17} {'prefill tok/s':>14} {'rel err':>8}")
        for (name, origin, load_s, dms, tps, gbs, frac, roof, switched, pms, ptps, err) in rows:
            of_bw = f"{100 * frac:3.0f}% of {roof:.0f}" + (" ↯" if switched else "  ")
            print(f"{name:6} {origin:12} {load_s:7.1f} {dms:16.3f} {tps:18.1f} {gbs:6.1f} {of_bw:>15} "
                  f"{pms:17.1f} {ptps:14.0f} {err:8.4f}")
        print(f"\ndecode: one token through {layers} layers per step (median of {decode_steps} steps); GB/s = packed "
              f"bytes of the distinct experts a layer reads / its time; 'of read probe' = that over the higher of two "
              f"read probes (GB/s) run on the same threads right before and after the format's decode steps "
              f"(↯: they differ by more than {round(100 * (_SWITCH_FACTOR - 1))}%, the host's bandwidth changed "
              f"meanwhile; rerun). "
              f"prefill: {prefill_tokens} tokens per layer call. rel err = ||y - y_fp64|| / ||y_fp64|| of layer 0 on "
              f"{min(4, prefill_tokens)} tokens against the checkpoint's bf16 weights in float64.")
        print(f"total demo time {time.time() - t_all:.0f} s")
    finally:
        if own and not keep:
            shutil.rmtree(root, ignore_errors=True)
        elif keep or not own:
            print(f"files kept in {root}")


def run_in_memory(model: str, methods: List[str], threads: int, decode_reps: int, prefill_tokens: int,
                  seed: int) -> None:
    """One layer from in-memory random weights (no checkpoint, no conversion)."""
    shape = MODELS[model]
    E, k, H, I = shape["num_experts"], shape["top_k"], shape["hidden"], shape["intermediate"]
    print(f"kt_kernel demo (in memory): {model} MoE layer: {E} experts, top-{k}, hidden {H}, intermediate {I}")
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((E, I, H), np.float32) / np.sqrt(H)).astype(np.float16)
    up = (rng.standard_normal((E, I, H), np.float32) / np.sqrt(H)).astype(np.float16)
    down = (rng.standard_normal((E, H, I), np.float32) / np.sqrt(I)).astype(np.float16)
    _pool.reset_pool_for_tests()
    for name in methods:
        method, kw, _ = METHODS[name]
        wr = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
                          cpuinfer_threads=threads, threadpool_count=1, method=method, **kw)
        wr.load_weights_from_tensors(gate, up, down)
        times = []
        for i in range(decode_reps + 3):
            x = rng.standard_normal((1, H)).astype(np.float32)
            ids, w = _routing(rng, 1, E, k)
            t0 = time.perf_counter()
            wr.forward(x, ids, w)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        x = rng.standard_normal((prefill_tokens, H)).astype(np.float32)
        ids, w = _routing(rng, prefill_tokens, E, k)
        wr.forward(x, ids, w)
        t0 = time.perf_counter()
        wr.forward(x, ids, w)
        pre = time.perf_counter() - t0
        print(f"  {name}: decode {np.median(times) * 1e3:.3f} ms, prefill {prefill_tokens} tokens "
              f"{pre * 1e3:.1f} ms ({prefill_tokens / pre:.0f} tok/s), backend {last_used_backend()}")


def run_hf(threads: int, tokens: int, seed: int) -> None:
    """Greedy generation with a tiny random Qwen3-MoE whose experts run on kt_kernel."""
    try:
        import torch
        import transformers
    except ImportError:
        print("--hf needs PyTorch and transformers >= 5: pip install 'kt_kernel[hf]'")
        return
    import copy

    from . import hf

    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                      moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=32, num_experts=32, num_experts_per_tok=4,
                                      max_position_embeddings=256, initializer_range=0.1)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    ours = copy.deepcopy(ref)
    wrs = hf.offload_experts(ours, method="BF16", cpuinfer_threads=threads)
    print(f"kt_kernel demo --hf: tiny random Qwen3-MoE ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts, "
          f"top-{cfg.num_experts_per_tok}, hidden {cfg.hidden_size}); {len(wrs)} expert blocks on kt_kernel (BF16)")
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        for m in (ref, ours):  # warm-up
            m.generate(prompt, **dict(kw, max_new_tokens=2, min_new_tokens=2))
        t0 = time.perf_counter()
        a = ref.generate(prompt, **kw)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = ours.generate(prompt, **kw)
        t_ours = time.perf_counter() - t0
    same = int((a[0, 8:] == b[0, 8:]).long().cumprod(0).sum())
    print(f"  PyTorch experts : {a[0, 8:].tolist()}  ({tokens / t_ref:.1f} tok/s)")
    print(f"  kt_kernel experts: {b[0, 8:].tolist()}  ({tokens / t_ours:.1f} tok/s)")
    print(f"  greedy tokens identical for the first {same} of {tokens}")
    if same < tokens:
        with torch.no_grad():  # both models teacher-forced on the reference tokens
            la, lb = ref(a).logits[0, 7:-1].float(), ours(a).logits[0, 7:-1].float()
        top2 = la[same].topk(2).values
        print(f"  at step {same + 1} the reference's top-2 logits differ by {float(top2[0] - top2[1]):.4f}; the two "
              f"models' logits differ by up to {float((la - lb).abs().max()):.4f} (a near-tie, decided by rounding)")


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (0 decode steps or layers would print NaN figures)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kt-kernel demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    p.add_argument("--methods", default="INT4,INT8,BF16", help="comma list of INT4, INT8, BF16")
    p.add_argument("--layers", type=_positive_int, default=2, help="MoE layers in the checkpoint (default 2)")
    p.add_argument("--threads", type=_positive_int, default=None, help="worker threads (default: all CPUs)")
    p.add_argument("--decode-steps", type=_positive_int, default=200,
                   help="decode steps timed per format (default 200: a median over a second or so)")
    p.add_argument("--prefill-tokens", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="write the checkpoint and converted files here (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    p.add_argument("--search", action="store_true",
                   help="convert with the per-group MSE scale search (lower INT4 error, several times slower)")
    p.add_argument("--in-memory", action="store_true", help="skip the checkpoint: pack random weights directly")
    p.add_argument("--hf", action="store_true", help="generate with a tiny HF model whose experts run on kt_kernel")
    a = p.parse_args(argv)
    methods = [m.strip().upper() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {sorted(METHODS)}")
    if a.layers < 1:
        p.error("--layers must be >= 1")
    threads = a.threads or os.cpu_count() or 1
    if a.hf:
        run_hf(threads, 16, a.seed)
    elif a.in_memory:
        run_in_memory(a.model, methods, threads, a.decode_steps, a.prefill_tokens, a.seed)
    else:
        run(a.model, methods, threads, a.layers, a.decode_steps, a.prefill_tokens, a.seed, a.workdir, a.keep,
            a.search)
