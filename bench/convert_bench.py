"""Conversion throughput and load time of real-format weight files.

Writes a synthetic bf16 Hugging Face checkpoint at a real model's expert
shape (default Qwen3-30B-A3B: H=2048, I=768; E and the layer count are
scaled down so it fits anywhere), converts it to each method, and loads
it with 1 and 2 NUMA sub-pools. Also reports the requantisation error of
GGUF inputs that are not lossless (Q8_0, K-quants). Not part of the tests.

    .venv/bin/python bench/convert_bench.py [--experts 16] [--layers 2] [--threads 8] [--out bench/results/convert_bench.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import torch

    import kt_kernel
    from kt_kernel import _pool
    from kt_kernel.weights import convert as conv
    from kt_kernel.weights.safetensors_io import SafetensorsFile
    import weight_writers as ww

    E, H, I = a.experts, a.hidden, a.inter
    lines = [f"# Conversion and load ({os.cpu_count()} CPUs, {a.threads} threads; E={E}, H={H}, I={I}, "
             f"{a.layers} layers, bf16 source)", "",
             "| method | convert s | source MiB/s | output MiB | max rel RMS error | load s/layer (1 pool) | "
             "load s/layer (2 pools) |", "|---|---|---|---|---|---|---|"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        src, *_ = ww.write_hf(os.path.join(tmp, "hf"), "deepseek", torch.bfloat16, num_layers=a.layers, E=E, H=H, I=I,
                              shards=1)
        src_mb = a.layers * E * 3 * H * I * 2 / 2 ** 20
        print(f"[bench] wrote {src_mb:.0f} MiB checkpoint in {time.time() - t0:.1f} s", file=sys.stderr)
        for method, kw in (("BF16", {}), ("AMXINT8", {}), ("AMXINT4", {"search": False}), ("AMXINT4", {"search": True})):
            tag = method + (" (MSE search)" if kw.get("search") else (" (amax)" if "search" in kw else ""))
            out = os.path.join(tmp, tag.replace(" ", "_").replace("(", "").replace(")", ""))
            t = time.time()
            s = conv.convert(src, out, method, threads=a.threads, progress=None, **kw)
            dt = time.time() - t
            err = max(max(v.values()) for v in s["layers"].values())
            loads = []
            for pools in (1, 2):
                _pool.reset_pool_for_tests()
                w = kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=8, hidden_size=H,
                                           moe_intermediate_size=I, cpuinfer_threads=a.threads,
                                           threadpool_count=pools, numa_nodes=[0] * pools, weight_path=out,
                                           method=method)
                t = time.time()
                for L in range(a.layers):
                    w.layer_idx = L
                    w.load_weights()
                loads.append((time.time() - t) / a.layers)
            mb = s["bytes_written"] / 2 ** 20
            results[tag] = {"convert_s": dt, "source_mib_s": src_mb / dt, "output_mib": mb, "max_rel_rms": err,
                            "load_s_per_layer": loads}
            lines.append(f"| {tag} | {dt:.2f} | {src_mb / dt:.0f} | {mb:.0f} | {err:.2e} | {loads[0]:.3f} | "
                         f"{loads[1]:.3f} |")
            print(lines[-1], file=sys.stderr)
            del w
        # GGUF inputs that cannot be repacked losslessly: their requantisation error.
        lines += ["", "| GGUF input | method | rel RMS error (gate, up, down) |", "|---|---|---|"]
        for qt, method in (("Q4_0", "AMXINT4"), ("Q8_0", "AMXINT8"), ("Q8_0", "AMXINT4"), ("Q4_K", "AMXINT4"),
                           ("Q6_K", "AMXINT8")):
            path, *_ = ww.write_gguf(os.path.join(tmp, f"{qt}.gguf"), qt, num_layers=1, E=4, H=512, I=512)
            out = os.path.join(tmp, f"g_{qt}_{method}")
            s = conv.convert(path, out, method, threads=a.threads, progress=None)
            e = s["layers"][0]
            lines.append(f"| {qt} | {method} | {e['gate']:.2e}, {e['up']:.2e}, {e['down']:.2e} |")
            results[f"gguf {qt} -> {method}"] = e
            print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
