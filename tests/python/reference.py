"""Float64 references for the MoE layer, written with PyTorch.

Two references per format:
  * `moe_reference`: the layer on the original (unquantised) weights, in float64.
    Quantised formats differ from it by their quantisation error (the budgets
    in test_accuracy.py).
  * the quantisation-aware reference (`quantize_rows_like_kernel`,
    `quant_aware_*`): the same packed weights (unpacked exactly by the
    library) and the same activation encoding, replayed here bit for bit in
    float32 NumPy, then float64 maths. A kernel bug shows up as an error far
    above float32 rounding (the 1e-5 bound), even when it hides inside the
    loose quantisation budget.
"""

from __future__ import annotations

import numpy as np
import torch

BF16, INT8, INT4_SYM, INT4_ASYM = 0, 1, 2, 3
FP8 = 5  # e4m3 weights, bf16 activations


def activation(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0, alpha: float = 0.0) -> torch.Tensor:
    if limit <= 0:
        return torch.nn.functional.silu(gate) * up
    g = torch.clamp(gate, max=limit)
    u = torch.clamp(up, -limit, limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)


def routed_pairs(ids: np.ndarray, num_experts: int, skip_mask=None):
    """(t, j, e) of every pair the CPU computes."""
    out = []
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0 or e >= num_experts or (skip_mask is not None and bool(skip_mask[e])):
                continue
            out.append((t, j, e))
    return out


def moe_reference(x, ids, w, gate, up, down, skip_mask=None, limit=0.0, alpha=0.0) -> np.ndarray:
    """float64 MoE on dense weights gate/up [E, I, H], down [E, H, I] (numpy or torch)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    gate, up, down = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (gate, up, down))
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t, j, e in routed_pairs(np.asarray(ids), gate.shape[0], skip_mask):
        h = activation(gate[e] @ x[t], up[e] @ x[t], limit, alpha)
        y[t] += float(w[t, j]) * (down[e] @ h)
    return y.numpy()


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bfloat16, returned as float32 (what the kernels see)."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def quantize_rows_like_kernel(x: np.ndarray):
    """The kernels' per-row int8 activation quantiser, replayed in float32.

    scale = amax / 127; q = rint(x * (127 / amax)), clamped to [-127, 127], a NaN
    product giving 127. A row holding Inf or NaN: inv = 0 and scale NaN.
    Returns (q as int8 [rows, k], scale float32 [rows]).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=1).astype(np.float32)  # NaN if the row holds one, Inf if it holds Inf
    finite = np.isfinite(amax)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(finite & (amax > 0), np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.rint(x * inv[:, None]).astype(np.float32)
    q = np.clip(np.where(np.isnan(q), np.float32(127.0), q), -127, 127).astype(np.int8)
    scale = np.where(finite, amax / np.float32(127.0), np.float32(np.nan)).astype(np.float32)
    return q, scale


def encode_like_kernel(x: np.ndarray, scheme: int) -> np.ndarray:
    """The exact float64 values the kernels multiply for activation rows x (float32)."""
    if scheme in (BF16, FP8):
        return bf16_round(x).astype(np.float64)
    q, s = quantize_rows_like_kernel(x)
    return q.astype(np.float64) * s.astype(np.float64)[:, None]


def unpack_layer(layer, num_experts: int):
    """Exact float64 weights of every expert of a native MoeLayer: gate, up [E, I, H], down [E, H, I]."""
    g = np.stack([layer.unpack_expert(e, 0) for e in range(num_experts)])
    u = np.stack([layer.unpack_expert(e, 1) for e in range(num_experts)])
    d = np.stack([layer.unpack_expert(e, 2) for e in range(num_experts)])
    return g, u, d


def quant_aware_intermediate(x, ids, layer, scheme, num_experts, weights, limit=0.0, alpha=0.0, skip_mask=None):
    """float64 act(gate, up) per pair, [T*k, I] (NaN for skipped pairs), from the exact packed
    weights and the exactly replayed activation encoding."""
    g, u, _ = weights
    xe = torch.as_tensor(encode_like_kernel(np.asarray(x, dtype=np.float32), scheme))
    T, k = ids.shape
    out = np.full((T * k, g.shape[1]), np.nan)
    gt, ut = torch.as_tensor(g), torch.as_tensor(u)
    for t, j, e in routed_pairs(ids, num_experts, skip_mask):
        out[t * k + j] = activation(gt[e] @ xe[t], ut[e] @ xe[t], limit, alpha).numpy()
    return out


def quant_aware_output(h_kernel, ids, w, scheme, num_experts, weights, skip_mask=None):
    """float64 y from the kernel's own fp32 intermediate (encoded exactly as the kernel does)."""
    _, _, d = weights
    T, k = ids.shape
    y = np.zeros((T, d.shape[1]))
    pairs = routed_pairs(ids, num_experts, skip_mask)
    if not pairs:
        return y
    rows = np.stack([h_kernel[t * k + j] for t, j, _ in pairs]).astype(np.float32)
    he = encode_like_kernel(rows, scheme)
    for (t, j, e), hrow in zip(pairs, he):
        y[t] += float(w[t, j]) * (d[e] @ hrow)
    return y


def rel_max_err(got, ref) -> float:
    """max |got - ref| / max |ref| (0 when both are 0)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.max(np.abs(ref)) if ref.size else 0.0
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    return float(err / denom) if denom > 0 else float(err)


def rel_fro_err(got, ref) -> float:
    """||got - ref|| / ||ref|| (Frobenius)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    n = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / n) if n > 0 else float(np.linalg.norm(got))
