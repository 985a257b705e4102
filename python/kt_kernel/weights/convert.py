"""`kt-kernel convert`: Hugging Face or GGUF experts -> kt_kernel canonical files.

Output: a directory with one safetensors file per MoE layer,
`layer_{L:03d}.safetensors`, holding every routed expert's matrices in the
canonical quantised form of include/kt_kernel/pack.h (not the packed byte
layout, and no NUMA count: loading packs them per NUMA slice, a lossless
shuffle, so the same files load on 1, 2 or 8 nodes):
  blk.{L}.ffn_{gate,up,down}_exps.{e}.weight  INT8 (per channel or grouped) int8 [N, K]; INT4 uint8 [N, K/2]
                                               (low nibble = even k); BF16 uint16 bits [N, K]
  blk.{L}.ffn_{gate,up,down}_exps.{e}.scale   float32 [N, groups] (not for BF16)
  blk.{L}.ffn_{gate,up,down}_exps.{e}.min     float32 [N, groups] (INT4 asymmetric)
with __metadata__ naming the format and version, layout version, method,
scheme, group size, shapes, source, per-matrix error and a CRC32 per tensor.
Scales come first in the data region so every float32 tensor is aligned.

Memory stays bounded: experts are read (memory-mapped), quantised and written
one at a time per worker thread. A layer file is written as
`*.partial` and renamed when complete and verified (CRCs re-read from disk),
so an interrupted or failed run never leaves a file under a final name that
was not checked. A rerun resumes: each complete layer file is verified again
(metadata and every tensor's CRC32), kept if it passes, and converted again,
with a message naming it, if it does not. load_weights checks the CRC32 of
every tensor it reads (verify_tensors).
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .common import (BF16, CONVERTED_FORMAT, CONVERTED_FORMAT_VERSION, INT4_ASYM, INT4_SYM, INT8, INT8_GROUP,
                     SCHEME_NAMES, WHICH, Matrix, dequant_canonical)
from .safetensors_io import SafetensorsFile, StreamingWriter, open_regular

MANIFEST = "kt_kernel_model.json"

METHOD_SCHEMES = {"AMXINT4": INT4_SYM, "MOE_INT4": INT4_SYM, "AMXINT8": INT8, "MOE_INT8": INT8, "BF16": BF16,
                  "RAWINT4": INT4_SYM}


def layer_file(root: str, L: int) -> str:
    return os.path.join(root, f"layer_{L:03d}.safetensors")


def tensor_name(L: int, which: str, e: int, part: str) -> str:
    return f"blk.{L}.ffn_{which}_exps.{e}.{part}"


def open_source(path: str):
    """A weight source by what the path holds: a GGUF file or a Hugging Face directory."""
    path = str(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            from .hf_checkpoint import HFCheckpoint

            return HFCheckpoint(path)
        raise ValueError(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
    if os.path.exists(path):
        with open_regular(path) as f:  # a FIFO or device is refused here, not read
            magic = f.read(4)
        if magic == b"GGUF":
            from .gguf_input import GGUFSource

            return GGUFSource(path)
        raise ValueError(f"{path}: not a GGUF file (bad magic {magic!r}) and not a checkpoint directory")
    raise ValueError(f"{path}: no such file or directory")


def target_for(method: str, group_size: Optional[int], zero_point: bool, hidden: int, inter: int,
               natural_group: Optional[int] = None) -> Tuple[int, int]:
    """(scheme, group) a conversion writes for a wrapper method."""
    if method not in METHOD_SCHEMES:
        raise ValueError(f"cannot convert to method {method!r} (choose from {', '.join(METHOD_SCHEMES)})")
    scheme = METHOD_SCHEMES[method]
    if scheme != INT4_SYM:
        return scheme, 0
    if method == "RAWINT4":
        if group_size not in (None, 32) or zero_point:
            raise ValueError("RAWINT4 is INT4 symmetric with group 32")
        return INT4_SYM, 32
    scheme = INT4_ASYM if zero_point else INT4_SYM
    if group_size is None:
        cands = ([natural_group] if natural_group else []) + [128, 64, 32]
        for g in cands:
            if g and hidden % g == 0 and inter % g == 0:
                return scheme, g
        return scheme, 0
    if group_size not in (0, 32, 64, 128):
        raise ValueError(f"group size must be 0 (per channel), 32, 64 or 128, got {group_size}")
    if group_size and (hidden % group_size or inter % group_size):
        raise ValueError(f"group size {group_size} must divide hidden_size {hidden} and moe_intermediate_size {inter}")
    return scheme, group_size


def quantize(m: Matrix, scheme: int, group: int, search: bool):
    """Canonical (q, scales, mins) of m for the target, and whether it is lossless."""
    from .. import _kt_kernel

    if m.kind == "quant" and m.scheme == scheme and (m.group == group or (m.group == m.cols and group == 0)):
        return m.q, m.scales, m.mins, True
    if m.kind == "dense" and m.bf16 and scheme == BF16:
        return np.ascontiguousarray(m.values), None, None, True
    w = np.ascontiguousarray(m.to_f32())
    q, s, mn = _kt_kernel.quantize_matrix(scheme, group, w, bool(search and scheme in (INT4_SYM, INT4_ASYM)))
    return q, s, mn, False


def _specs(L: int, E: int, H: int, I: int, scheme: int, group: int):
    scales, codes = [], []
    for e in range(E):
        for which in WHICH:
            N, K = (H, I) if which == "down" else (I, H)
            groups = (K // group if group else 1) if scheme in (INT4_SYM, INT4_ASYM, INT8_GROUP) else 1
            if scheme != BF16:
                scales.append((tensor_name(L, which, e, "scale"), "F32", (N, groups)))
            if scheme == INT4_ASYM:
                scales.append((tensor_name(L, which, e, "min"), "F32", (N, groups)))
            if scheme == BF16:
                codes.append((tensor_name(L, which, e, "weight"), "U16", (N, K)))
            elif scheme in (INT8, INT8_GROUP):
                codes.append((tensor_name(L, which, e, "weight"), "I8", (N, K)))
            else:
                codes.append((tensor_name(L, which, e, "weight"), "U8", (N, K // 2)))
    return scales + codes


def tensor_crc32(a: np.ndarray) -> str:
    """The CRC32 of an array's bytes as the 8 hex digits stored in a converted file's crc32 metadata."""
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))) & 0xffffffff:08x}"


def stored_crcs(f: SafetensorsFile) -> Dict[str, str]:
    """The crc32 metadata of a converted file ({tensor: 8 hex digits}), with one CRC for every tensor."""
    try:
        crcs = json.loads(f.metadata.get("crc32", ""))
    except ValueError:
        crcs = None
    if not isinstance(crcs, dict) or not all(isinstance(v, str) and len(v) == 8 for v in crcs.values()):
        raise ValueError(f"{f.path}: corrupt metadata: the crc32 list is not a map of tensor names to CRC32s")
    missing = [n for n in f.keys() if n not in crcs]
    if missing:
        raise ValueError(f"{f.path}: corrupt metadata: no CRC32 for tensor {missing[0]} "
                         f"({len(missing)} tensors without one)")
    extra = [n for n in crcs if n not in f.entries]
    if extra:
        raise ValueError(f"{f.path}: corrupt metadata: a CRC32 for tensor {extra[0]}, which the file lacks")
    return crcs


def verify_tensors(f: SafetensorsFile, names: Sequence[str], threads: int = 1, what=None) -> None:
    """Checks the CRC32 of each named tensor of converted file f against its metadata; ValueError naming the
    file and the first bad tensor (what(name), if given, describes it further, e.g. its layer and expert).

    zlib.crc32 releases the GIL on large buffers, so threads > 1 checks tensors in parallel."""
    crcs = stored_crcs(f)

    def check(name: str):
        got = tensor_crc32(f.get(name))
        return None if got == crcs[name] else (name, got)

    names = list(names)
    if threads > 1 and len(names) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(names))) as ex:
            bad = [r for r in ex.map(check, names) if r]
    else:
        bad = [r for r in map(check, names) if r]
    if bad:
        name, got = bad[0]
        more = f"; {len(bad) - 1} more tensors fail too" if len(bad) > 1 else ""
        desc = f" ({what(name)})" if what else ""
        raise ValueError(f"{f.path}: tensor {name}{desc} fails its CRC32 check (stored {crcs[name]}, computed "
                         f"{got}): the file is corrupt{more}; convert it again")


def verify_layer(path: str, expect: Dict[str, str]) -> Dict[str, str]:
    """Re-reads a layer file and checks the metadata against expect and every tensor's CRC32; returns the
    file's metadata."""
    f = SafetensorsFile(path)
    for k, v in expect.items():
        if f.metadata.get(k) != v:
            raise ValueError(f"{path}: metadata {k} = {f.metadata.get(k)!r}, expected {v!r}")
    verify_tensors(f, f.keys())
    return f.metadata


class _Progress:
    def __init__(self, stream, total_layers: int, experts: int):
        self.stream, self.total, self.experts, self.t0 = stream, total_layers, experts, time.time()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def expert(self, li: int, L: int, done: int) -> None:
        if self.tty and self.stream is not None:
            self.stream.write(f"\r[convert] layer {L} ({li + 1}/{self.total})  experts {done}/{self.experts}   ")
            self.stream.flush()

    def line(self, msg: str, always: bool = False) -> None:
        """always: a message the user must see (a layer converted again) even with progress=None: stderr."""
        stream = self.stream if self.stream is not None else (sys.stderr if always else None)
        if stream is not None:
            stream.write(("\r" if self.tty and stream is self.stream else "") + msg + "\n")
            stream.flush()


def convert(input_path: str, output_dir: str, method: str, group_size: Optional[int] = None,
            layers: Optional[Sequence[int]] = None, threads: int = 0, zero_point: bool = False,
            search: bool = True, progress=sys.stderr) -> dict:
    """Converts input_path (HF directory or GGUF file) into output_dir. Returns a summary dict."""
    from .. import PACKED_LAYOUT_VERSION

    output_dir = str(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir}: the output path exists and is not a directory")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0 = min(8, CPUs)), got {threads!r}")
    src = open_source(input_path)
    E, H, I = src.num_experts, src.hidden, src.inter
    all_layers = list(src.layers)
    if layers is not None:
        missing = [L for L in layers if L not in all_layers]
        if missing:
            raise ValueError(f"layers {missing} have no routed experts in {input_path} (MoE layers: "
                             f"{all_layers[0]}-{all_layers[-1]})")
        todo = sorted(set(layers))
    else:
        todo = all_layers
    probe = src.matrix(todo[0], 0, "gate")
    natural = probe.group if probe.kind == "quant" else None
    scheme, group = target_for(method, group_size, zero_point, H, I, natural)
    if scheme == INT8 and probe.kind == "quant" and probe.scheme == INT8_GROUP:
        scheme, group = INT8_GROUP, probe.group  # GGUF Q8_0: kept losslessly as grouped INT8
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{output_dir}: cannot create the output directory ({e.strerror})") from None
    threads = threads or min(8, os.cpu_count() or 1)
    source_desc = f"{os.path.basename(os.path.normpath(input_path))} ({src.describe()})"
    base_meta = {
        "format": CONVERTED_FORMAT, "format_version": str(CONVERTED_FORMAT_VERSION),
        "layout_version": str(PACKED_LAYOUT_VERSION), "method": method, "scheme": SCHEME_NAMES[scheme],
        "group_size": str(group), "hidden_size": str(H), "moe_intermediate_size": str(I), "num_experts": str(E),
        "num_experts_per_tok": str(src.top_k), "source": source_desc, "mse_search": "1" if search else "0",
    }
    manifest = dict(base_meta, layers=all_layers if layers is None else todo, model_type=src.model_type)
    _write_manifest(output_dir, manifest)

    prog = _Progress(progress, len(todo), E)
    summary = {"scheme": SCHEME_NAMES[scheme], "group_size": group, "layers": {}, "skipped": [], "reconverted": {},
               "bytes_written": 0, "source_bytes": 0}
    t_start = time.time()
    for li, L in enumerate(todo):
        path = layer_file(output_dir, L)
        meta = dict(base_meta, layer=str(L))
        if os.path.lexists(path):
            # Resume: keep a complete file only if its metadata is what this run would write and every tensor
            # still matches its CRC32 (a file damaged since, or converted with other settings, is written again).
            try:
                old = verify_layer(path, meta)
                summary["skipped"].append(L)
                summary["layers"][L] = json.loads(old.get("error", "{}"))
                prog.line(f"[convert] layer {L}: already converted and verified, skipped")
                continue
            except ValueError as e:
                summary["reconverted"][L] = str(e)
                prog.line(f"[convert] layer {L}: converting again, the existing file fails verification: {e}",
                          always=True)
        t0 = time.time()
        specs = _specs(L, E, H, I, scheme, group)
        placeholder = dict(meta, crc32=json.dumps({n: "00000000" for n, _, _ in specs}, separators=(",", ":")),
                           error=json.dumps({w: 0.0 for w in WHICH}), lossless="0")
        writer = StreamingWriter(path, specs, placeholder, reserve=1024)
        crcs: Dict[str, str] = {}
        err2 = {w: 0.0 for w in WHICH}
        ref2 = {w: 0.0 for w in WHICH}
        lossless = [True]
        src_bytes = [0]

        def do_expert(e: int):
            out = []
            for which in WHICH:
                m = src.matrix(L, e, which)
                q, s, mn, exact = quantize(m, scheme, group, search)
                ref = m.to_f64()
                e2 = 0.0 if exact else float(np.sum((dequant_canonical(scheme, group, q, s, mn, m.cols) - ref) ** 2))
                out.append((which, q, s, mn, exact, e2, float(np.sum(ref * ref)),
                            int((m.values if m.kind == "dense" else m.q).nbytes)))
                for part, arr in (("weight", q), ("scale", s), ("min", mn)):
                    if arr is not None:
                        writer.write(tensor_name(L, which, e, part), arr)
            return e, out

        try:
            with ThreadPoolExecutor(max_workers=threads) as ex:
                window = max(1, 2 * threads)
                pending, nxt, done = [], 0, 0
                while nxt < E or pending:
                    while nxt < E and len(pending) < window:
                        pending.append(ex.submit(do_expert, nxt))
                        nxt += 1
                    e, out = pending.pop(0).result()
                    for which, q, s, mn, exact, e2, r2, nb in out:
                        for part, arr in (("weight", q), ("scale", s), ("min", mn)):
                            if arr is not None:
                                crcs[tensor_name(L, which, e, part)] = tensor_crc32(arr)
                        err2[which] += e2
                        ref2[which] += r2
                        lossless[0] &= exact
                        src_bytes[0] += nb
                    done += 1
                    prog.expert(li, L, done)
            err = {w: (float(np.sqrt(err2[w] / ref2[w])) if ref2[w] > 0 else 0.0) for w in WHICH}
            final = dict(meta, crc32=json.dumps(crcs, separators=(",", ":")), error=json.dumps(err),
                         lossless="1" if lossless[0] else "0")
            writer.close(final, verify=lambda p: verify_layer(p, meta))  # renamed into place only if it verifies
        except BaseException:
            writer.abort()
            raise
        dt = time.time() - t0
        size = os.path.getsize(path)
        summary["layers"][L] = err
        summary["bytes_written"] += size
        summary["source_bytes"] += src_bytes[0]
        prog.line(f"[convert] layer {L} ({li + 1}/{len(todo)}): {E} experts, {size / 2**20:.1f} MiB in {dt:.2f} s "
                  f"({src_bytes[0] / 2**20 / max(dt, 1e-9):.0f} MiB/s of source); "
                  + ("lossless" if lossless[0] else
                     "relative RMS error gate {gate:.2e} up {up:.2e} down {down:.2e}".format(**err)))
    summary["seconds"] = time.time() - t_start
    manifest["complete"] = True
    _write_manifest(output_dir, manifest)
    return summary


def _write_manifest(output_dir: str, manifest: dict) -> None:
    """Writes the manifest through a fresh temporary file and a rename (never through whatever sits at the
    temporary name: opening a FIFO there for writing would block)."""
    tmp = os.path.join(output_dir, MANIFEST + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, MANIFEST))


def parse_layers(spec: Optional[str]) -> Optional[List[int]]:
    """'3-5' -> [3, 4, 5]; '1,4,7-8' -> [1, 4, 7, 8]; None -> None (all)."""
    if spec is None:
        return None
    out: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                a, b = int(a), int(b)
                if b < a:
                    raise ValueError(f"--layers: empty range {part}")
                out.extend(range(a, b + 1))
            elif part:
                out.append(int(part))
        except ValueError as e:
            if str(e).startswith("--layers"):
                raise
            raise ValueError(f"--layers: {spec!r} is not a layer list like 3-10 or 1,4,7-8") from None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="kt-kernel convert",
                                description="Convert Hugging Face safetensors or GGUF experts into kt_kernel files.")
    p.add_argument("input", help="Hugging Face model directory (config.json + *.safetensors) or a .gguf file")
    p.add_argument("output", help="output directory (the weight_path of a KTMoEWrapper with the same method)")
    p.add_argument("--method", required=True, choices=sorted(METHOD_SCHEMES),
                   help="target format: AMXINT4 / MOE_INT4 (INT4), AMXINT8 / MOE_INT8 (INT8 per channel), BF16, "
                        "RAWINT4 (INT4 group 32)")
    p.add_argument("--group-size", type=int, default=None,
                   help="INT4 group size (32, 64, 128; 0 = per channel). Default: the source's own group when it "
                        "is already INT4, else the largest of 128/64/32 that divides H and I")
    p.add_argument("--zero-point", action="store_true", help="INT4 with per-group mins (asymmetric)")
    p.add_argument("--no-search", action="store_true", help="INT4: plain amax scales instead of the MSE scale search")
    p.add_argument("--layers", default=None, help="layers to convert, e.g. 3-10 or 1,4,7-8 (default: all MoE layers)")
    p.add_argument("--threads", type=int, default=0, help="worker threads (default: min(8, CPUs))")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        if a.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = min(8, CPUs)), got {a.threads}")
        s = convert(a.input, a.output, a.method, a.group_size, parse_layers(a.layers), a.threads, a.zero_point,
                    not a.no_search)
    except (ValueError, ImportError, OSError) as e:  # bad input, missing package, I/O: one line, no traceback
        print("kt-kernel convert: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kt-kernel convert: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    mb = s["bytes_written"] / 2**20
    print(f"[convert] done: {len(s['layers'])} layers ({len(s['skipped'])} already present), {mb:.1f} MiB written "
          f"in {s['seconds']:.1f} s -> {a.output}", file=sys.stderr)
    return 0
