"""GGUF files as a source of expert matrices (parsed with the `gguf` package,
the optional extra `kt_kernel[convert]`).

Expert tensors are blk.{L}.ffn_{gate,up,down}_exps.weight, numpy shape
[E, I, H] (down [E, H, I]). Per ggml type:
  Q4_0 -> INT4 symmetric group 32, lossless: block = fp16 d + 16 bytes, code j
          in the low nibble of byte j and code j + 16 in its high nibble,
          value d * (q - 8): exactly our scale d with bias -8d.
  Q4_1 -> INT4 asymmetric group 32, lossless: value d * q + m (scale d, min m).
  Q8_0 -> INT8 grouped (kInt8Group) group 32, lossless: block = fp16 d + 32
          int8 codes, value d * q: our scale d (widened to fp32) and code q.
          An INT8 wrapper (AMXINT8 / MOE_INT8) reading it adopts this scheme.
  BF16 / F16 / F32 -> dense.
  anything else (Q4_K, Q5_K, Q6_K, ...) -> dequantised by the gguf
          package to float32 and requantised by the converter, with the error
          reported.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import numpy as np

from .common import INT4_ASYM, INT4_SYM, INT8_GROUP, Matrix
from .safetensors_io import open_regular

_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


def _gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'kt_kernel[convert]' "
                          "(or pip install gguf)") from None
    return gguf


def _q4_blocks(raw: np.ndarray, rows: int, cols: int, with_min: bool):
    """Q4_0/Q4_1 bytes [rows, cols/32 * (18|20)] -> (canonical codes [rows, cols/2], d, m)."""
    nb = cols // 32
    bsz = 20 if with_min else 18
    b = np.ascontiguousarray(raw).reshape(rows, nb, bsz)
    d = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m = b[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32) if with_min else None
    qs = b[:, :, bsz - 16:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(rows, cols)  # ggml order: j, then j + 16
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return q, d, m


def _q8_blocks(raw: np.ndarray, rows: int, cols: int):
    """Q8_0 bytes [rows, cols/32 * 34] -> (int8 codes [rows, cols], float32 d [rows, cols/32])."""
    nb = cols // 32
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, nb, 34)
    d = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(rows, cols)
    return q, np.ascontiguousarray(d)


# GGUF value types -> fixed size in bytes (8 string, 9 array are variable).
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf_layout(path: str) -> None:
    """Walks a GGUF file's header, key-value section and tensor table with every
    length checked against the file size, before the `gguf` parser (which
    trusts the counts, and can exhaust memory on a corrupt file) sees it.
    Raises ValueError naming the file."""
    import struct

    gguf = _gguf()

    def bad(msg):
        return ValueError(f"{path}: not a valid GGUF file: {msg}")

    with open_regular(path) as f:  # refuses a FIFO or device (reading one could block forever)
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, 64 << 20))  # the metadata section of real files is far smaller
    pos = 0

    def take(n):
        nonlocal pos
        if n < 0 or pos + n > len(head):
            raise bad(f"truncated at byte {pos} (needs {n} more bytes)")
        pos += n
        return head[pos - n:pos]

    def u32():
        return struct.unpack("<I", take(4))[0]

    def u64():
        return struct.unpack("<Q", take(8))[0]

    def string():
        return take(u64())

    def value(t, depth=0):
        if t in _GGUF_FIXED:
            take(_GGUF_FIXED[t])
        elif t == 8:
            string()
        elif t == 9:
            if depth > 2:
                raise bad("arrays nested too deeply")
            et, n = u32(), u64()
            if et in _GGUF_FIXED:
                take(_GGUF_FIXED[et] * n) if n <= len(head) else take(len(head) + 1)
            else:
                if n > (len(head) - pos) // 8:
                    raise bad(f"array of {n} elements cannot fit")
                for _ in range(n):
                    value(et, depth + 1)
        else:
            raise bad(f"unknown value type {t}")

    if take(4) != b"GGUF":
        raise bad("bad magic")
    version = u32()
    if version not in (2, 3):
        raise bad(f"unsupported version {version}")
    n_tensors, n_kv = u64(), u64()
    if n_tensors > size // 24 or n_kv > size // 12:
        raise bad(f"{n_tensors} tensors / {n_kv} keys cannot fit in {size} bytes")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        t = u32()
        if key == b"general.alignment" and t == 4:
            alignment = struct.unpack("<I", head[pos:pos + 4])[0] if pos + 4 <= len(head) else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise bad(f"general.alignment {alignment} is not a power of two")
        value(t)
    infos = []
    for _ in range(n_tensors):
        name = string()
        nd = u32()
        if not 1 <= nd <= 4:
            raise bad(f"tensor {name[:64]!r} has {nd} dimensions")
        dims = [u64() for _ in range(nd)]
        qt, off = u32(), u64()
        try:
            block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qt)]
        except (ValueError, KeyError):
            raise bad(f"tensor {name[:64]!r} has unknown ggml type {qt}") from None
        count = 1
        for d in dims:
            if d == 0 or d >= 2 ** 40:
                raise bad(f"tensor {name[:64]!r} has dimension {d}")
            count *= d
        if dims[0] % block:
            raise bad(f"tensor {name[:64]!r}: row of {dims[0]} is not whole {block}-element blocks")
        infos.append((name, off, count // block * tsize))
    data_start = pos + (-pos) % alignment
    for name, off, nbytes in infos:
        if data_start + off + nbytes > size:
            raise bad(f"tensor {name[:64]!r} runs past the end of the file (truncated?)")


class GGUFSource:
    kind = "gguf"

    def __init__(self, path: str):
        gguf = _gguf()
        self.path = str(path)
        if not os.path.lexists(self.path):
            raise ValueError(f"{self.path}: no such GGUF file")
        check_gguf_layout(self.path)  # also refuses anything but a regular file
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf parser raises many kinds on corrupt input
            raise ValueError(f"{self.path}: not a valid GGUF file ({e.__class__.__name__}: {str(e)[:120]})") from None
        self.Q = gguf.GGMLQuantizationType
        self.tensors: Dict[Tuple[int, str], object] = {}
        for t in self.reader.tensors:
            m = _NAME.match(t.name)
            if m:
                self.tensors[(int(m.group(1)), m.group(2))] = t
        self.layers: List[int] = sorted({L for L, _ in self.tensors})
        if not self.layers:
            raise ValueError(f"{self.path}: no blk.{{L}}.ffn_{{gate,up,down}}_exps.weight tensors")
        L0 = self.layers[0]
        for which in ("gate", "up", "down"):
            if (L0, which) not in self.tensors:
                raise ValueError(f"{self.path}: layer {L0} has no ffn_{which}_exps tensor")
        E, I, H = (int(x) for x in self._shape(self.tensors[(L0, "gate")]))
        self.num_experts, self.inter, self.hidden = E, I, H
        self.top_k = self._field_int("expert_used_count", default=1)
        self.model_type = self._field_str("general.architecture")

    def _shape(self, t) -> Tuple[int, ...]:
        return tuple(int(x) for x in reversed(list(t.shape)))  # ggml ne order -> numpy order

    def _field(self, suffix: str):
        for name, f in self.reader.fields.items():
            if name == suffix or name.endswith("." + suffix):
                return f
        return None

    def _field_int(self, suffix: str, default: int) -> int:
        f = self._field(suffix)
        try:
            return int(f.parts[f.data[0]][0]) if f is not None else default
        except Exception:
            return default

    def _field_str(self, suffix: str) -> str:
        f = self._field(suffix)
        try:
            return bytes(f.parts[f.data[0]]).decode() if f is not None else ""
        except Exception:
            return ""

    def describe(self) -> str:
        return "gguf:" + self.tensors[(self.layers[0], "gate")].tensor_type.name

    def matrix(self, L: int, e: int, which: str) -> Matrix:
        t = self.tensors.get((L, which))
        if t is None:
            raise ValueError(f"{self.path}: layer {L} has no ffn_{which}_exps tensor")
        rows, cols = (self.hidden, self.inter) if which == "down" else (self.inter, self.hidden)
        shape = self._shape(t)
        if shape != (self.num_experts, rows, cols):
            raise ValueError(f"{self.path}: {t.name} has shape {shape}, expected {(self.num_experts, rows, cols)}")
        if not 0 <= e < self.num_experts:
            raise ValueError(f"{self.path}: expert {e} is out of range")
        qt = t.tensor_type
        data = t.data[e]
        if qt == self.Q.Q4_0 or qt == self.Q.Q4_1:
            q, d, m = _q4_blocks(data, rows, cols, qt == self.Q.Q4_1)
            return Matrix("quant", rows, cols, scheme=INT4_ASYM if m is not None else INT4_SYM, group=32, q=q,
                          scales=d, mins=m)
        if qt == self.Q.Q8_0:
            q, d = _q8_blocks(data, rows, cols)
            return Matrix("quant", rows, cols, scheme=INT8_GROUP, group=32, q=q, scales=d)
        if qt == self.Q.BF16:
            return Matrix("dense", rows, cols, values=np.ascontiguousarray(data).view(np.uint16).reshape(rows, cols),
                          bf16=True)
        if qt in (self.Q.F16, self.Q.F32):
            return Matrix("dense", rows, cols, values=np.asarray(data).reshape(rows, cols))
        gguf = _gguf()
        try:
            vals = gguf.quants.dequantize(np.asarray(data), qt)
        except NotImplementedError:
            raise ValueError(f"{self.path}: {t.name}: ggml type {qt.name} is not supported") from None
        return Matrix("dense", rows, cols, values=np.asarray(vals, dtype=np.float32).reshape(rows, cols))
