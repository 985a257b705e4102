"""What every weight source and the converter share: the target formats,
exact dequantisation helpers (bf16, FP8 e4m3), and the per-matrix record a
source hands out (dense values, or codes already in our canonical form)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# Native scheme codes (kt::QuantScheme) and their names in file metadata.
BF16, INT8, INT4_SYM, INT4_ASYM, INT8_GROUP, FP8 = 0, 1, 2, 3, 4, 5
SCHEME_NAMES = {BF16: "bf16", INT8: "int8_per_channel", INT4_SYM: "int4_sym", INT4_ASYM: "int4_asym",
                INT8_GROUP: "int8_group", FP8: "fp8_block"}
SCHEME_BY_NAME = {v: k for k, v in SCHEME_NAMES.items()}

# Our canonical-file format (kt_kernel/weights/convert.py); bump on change.
CONVERTED_FORMAT = "kt_kernel.canonical"
CONVERTED_FORMAT_VERSION = 1

WHICH = ("gate", "up", "down")


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _fp8_e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (bias 7, no infinities; 0x7f/0xff are NaN)."""
    t = np.zeros(256, dtype=np.float32)
    for c in range(256):
        s = -1.0 if c & 0x80 else 1.0
        e = (c >> 3) & 0xF
        m = c & 0x7
        if e == 0xF and m == 0x7:
            t[c] = np.nan
        elif e == 0:
            t[c] = s * (m / 8.0) * 2.0 ** -6
        else:
            t[c] = s * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return t


FP8_E4M3 = _fp8_e4m3_table()


def fp8_block_scales_per_row(scale_inv: np.ndarray, rows: int, cols: int, block=(128, 128),
                             name: str = "") -> np.ndarray:
    """A [ceil(N/bn), ceil(K/bk)] weight_scale_inv expanded to the per-row-and-group scales of the FP8 block
    scheme: float32 [N, K/bk], scale[r][g] = weight_scale_inv[r // bn][g] (K must be a multiple of bk)."""
    bn, bk = block
    need = (-(-rows // bn), -(-cols // bk))
    if tuple(scale_inv.shape) != need:
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {need} for a "
                         f"[{rows}, {cols}] FP8 weight with {bn}x{bk} blocks")
    return np.ascontiguousarray(np.repeat(np.asarray(scale_inv, dtype=np.float32), bn, axis=0)[:rows])


def dequant_fp8_block(codes: np.ndarray, scale_inv: np.ndarray, block=(128, 128), name: str = "") -> np.ndarray:
    """codes uint8 [N, K] (e4m3) x per-block scale [ceil(N/bn), ceil(K/bk)] -> float32 [N, K]."""
    N, K = codes.shape
    bn, bk = block
    need = (-(-N // bn), -(-K // bk))
    if tuple(scale_inv.shape) != need:
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {need} for a "
                         f"[{N}, {K}] FP8 weight with {bn}x{bk} blocks")
    s = np.asarray(scale_inv, dtype=np.float32)
    s = np.repeat(np.repeat(s, bn, axis=0)[:N], bk, axis=1)[:, :K]
    return FP8_E4M3[codes] * s


@dataclass
class Matrix:
    """One expert matrix from a source, logical shape [rows, cols] (cols = K, the reduction).

    kind "dense": `values` float32/float16 array, or uint16 bf16 bits (`bf16=True`).
    kind "quant": canonical codes (pack.h) of `scheme`/`group`, with `scales`, `mins`.
    """
    kind: str
    rows: int
    cols: int
    values: Optional[np.ndarray] = None
    bf16: bool = False
    scheme: int = -1
    group: int = 0
    q: Optional[np.ndarray] = None
    scales: Optional[np.ndarray] = None
    mins: Optional[np.ndarray] = None

    def to_f32(self) -> np.ndarray:
        """Exact values as float32 (the codes' values are exact in float64; float32 is what quantisers read)."""
        return self.to_f64().astype(np.float32) if self.kind == "quant" else (
            bf16_bits_to_f32(self.values) if self.bf16 else np.asarray(self.values, dtype=np.float32))

    def to_f64(self) -> np.ndarray:
        if self.kind == "dense":
            return self.to_f32().astype(np.float64) if self.bf16 else np.asarray(self.values, dtype=np.float64)
        return dequant_canonical(self.scheme, self.group, self.q, self.scales, self.mins, self.cols)


def int4_codes(q: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [rows, cols/2] nibble pairs (low = even k) -> uint8 [rows, cols] codes 0..15."""
    out = np.empty((q.shape[0], cols), dtype=np.uint8)
    out[:, 0::2] = q & 0xF
    out[:, 1::2] = q >> 4
    return out


def pack_int4_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] codes 0..15 -> uint8 [rows, cols/2] (low nibble = even k)."""
    c = np.asarray(codes, dtype=np.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def dequant_canonical(scheme: int, group: int, q, scales, mins, cols: int) -> np.ndarray:
    """The exact float64 values of a canonical quantised matrix (what the kernels use)."""
    if scheme == BF16:
        return bf16_bits_to_f32(q).astype(np.float64)
    if scheme == INT8:
        return np.asarray(q, dtype=np.float64) * np.asarray(scales, dtype=np.float64)[:, :1]
    if scheme == INT8_GROUP:
        return np.asarray(q, dtype=np.float64) * np.repeat(np.asarray(scales, dtype=np.float64), group, axis=1)
    if scheme == FP8:
        return FP8_E4M3[np.asarray(q, dtype=np.uint8)].astype(np.float64) * np.repeat(
            np.asarray(scales, dtype=np.float64), group, axis=1)
    codes = int4_codes(np.asarray(q), cols).astype(np.float64)
    gs = group if group else cols
    s = np.repeat(np.asarray(scales, dtype=np.float64), gs, axis=1)
    if scheme == INT4_SYM:
        return s * codes - 8.0 * s
    return s * codes + np.repeat(np.asarray(mins, dtype=np.float64), gs, axis=1)
