"""What the CRC32 check costs load_weights on converted files.

Converts a synthetic bf16 checkpoint (default Qwen3-30B-A3B's expert shape,
H=2048, I=768, with few experts) to each method, then times load_weights of
one layer with the check (the default) and with KT_KERNEL_SKIP_CRC=1, page
cache warm (the file is read once first), best of --repeat, and the check
alone (verify_tensors over the same tensors). Not part of the tests.

    .venv/bin/python bench/crc_load_cost.py [--experts 8] [--threads 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()

    import torch

    import kt_kernel
    from kt_kernel.weights import convert as conv
    from kt_kernel.weights.loader import SKIP_CRC_ENV
    from kt_kernel.weights.safetensors_io import SafetensorsFile
    import weight_writers as ww

    warnings.simplefilter("ignore", UserWarning)  # the skip warning, expected here
    E, H, I = a.experts, a.hidden, a.inter
    print(f"# CRC32 at load ({os.cpu_count()} CPUs, {a.threads} threads; E={E}, H={H}, I={I}; warm page cache, "
          f"best of {a.repeat})\n")
    print("| method | layer MiB | load s (CRC) | load s (KT_KERNEL_SKIP_CRC=1) | CRC alone s | CRC GiB/s | "
          "CRC share of load |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        src, *_ = ww.write_hf(os.path.join(tmp, "hf"), "deepseek", torch.bfloat16, num_layers=1, E=E, H=H, I=I,
                              shards=1)
        for method, kw in (("BF16", {}), ("AMXINT8", {}), ("AMXINT4", {"search": False})):
            out = os.path.join(tmp, method)
            conv.convert(src, out, method, threads=a.threads, progress=None, **kw)
            path = conv.layer_file(out, 0)
            mib = os.path.getsize(path) / 2 ** 20
            w = kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=min(8, E), hidden_size=H,
                                       moe_intermediate_size=I, cpuinfer_threads=a.threads, threadpool_count=1,
                                       weight_path=out, method=method)
            w.load_weights()  # warms the page cache
            times = {}
            for skip in ("0", "1"):
                os.environ[SKIP_CRC_ENV] = skip
                best = float("inf")
                for _ in range(a.repeat):
                    t = time.perf_counter()
                    w.load_weights()
                    best = min(best, time.perf_counter() - t)
                times[skip] = best
            os.environ.pop(SKIP_CRC_ENV, None)
            f = SafetensorsFile(path)
            crc = float("inf")
            for _ in range(a.repeat):
                t = time.perf_counter()
                conv.verify_tensors(f, f.keys(), a.threads)
                crc = min(crc, time.perf_counter() - t)
            print(f"| {method} | {mib:.0f} | {times['0']:.3f} | {times['1']:.3f} | {crc:.3f} | "
                  f"{mib / 1024 / crc:.2f} | {100 * (times['0'] - times['1']) / times['0']:.0f}% |")
            del w
    return 0


if __name__ == "__main__":
    sys.exit(main())
