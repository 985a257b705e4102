"""Expert placement from measured activations: which (layer, expert) pairs to
put on the GPU.

1. Count: `wrapper.enable_activation_counting()` on each layer; the layer
   task adds, per expert, the (token, k) pairs routed to it (GPU-resident
   experts included, so the table stays valid as the placement changes).
2. Collect: `collect_activation_counts(wrappers)` -> int64 [L, E].
3. Place: `generate_gpu_experts_masks(counts, n)` (INTERFACE.md: a global
   top-n, which may crowd the budget into a few layers) or
   `balance_gpu_experts(counts, n)`, which keeps every layer's GPU share within
   [min_per_layer, max_per_layer] (default: as even as possible) and picks each
   layer's hottest experts, so per-layer GPU buffers of one size fit.
4. Apply: copy row L into layer L's `gpu_experts_mask` in place (servers
   reload those experts' weights on the GPU side).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np

from .masks import _to_numpy_2d
from ._tensors import is_torch, torch_module


def collect_activation_counts(wrappers: Iterable[Any]) -> np.ndarray:
    """int64 [L, E]: row i = the i-th wrapper's counts (in the order given)."""
    rows = [w.activation_counts() for w in wrappers]
    if not rows:
        raise ValueError("wrappers: need at least one layer")
    if len({r.shape for r in rows}) != 1:
        raise ValueError("wrappers: layers have different expert counts")
    return np.stack(rows)


def balance_gpu_experts(activation_counts: Any, total_gpu_experts: int, *, max_per_layer: Optional[int] = None,
                        min_per_layer: Optional[int] = None):
    """Bool [L, E] (torch for torch input): True = on the GPU.

    Spends `total_gpu_experts` (clamped to what the caps allow) so that every
    layer gets between min_per_layer and max_per_layer experts. Defaults: an
    even split, floor(total / L) to ceil(total / L) per layer, the remainder
    going to the layers where it covers the most activations (with only
    max_per_layer given, min_per_layer defaults to 0). Within those limits the
    most activated (layer, expert) pairs win (greedy over the table, optimal
    for per-layer bounds). Ties go to the lower (layer, expert) index.
    """
    freq = _to_numpy_2d(activation_counts)
    L, E = freq.shape
    if isinstance(total_gpu_experts, bool) or not isinstance(total_gpu_experts, (int, np.integer)):
        raise TypeError(f"total_gpu_experts: expected an int, got {type(total_gpu_experts).__name__}")
    total = int(min(max(int(total_gpu_experts), 0), L * E))
    if max_per_layer is None:
        hi = min(E, math.ceil(total / L))
        lo = total // L if min_per_layer is None else int(min_per_layer)
    else:
        hi = int(max_per_layer)
        lo = 0 if min_per_layer is None else int(min_per_layer)
    if not 0 <= lo <= hi <= E:
        raise ValueError(f"need 0 <= min_per_layer ({lo}) <= max_per_layer ({hi}) <= num_experts ({E})")
    total = min(total, hi * L)
    if lo * L > total:
        raise ValueError(f"min_per_layer ({lo}) x {L} layers exceeds the budget {total}")
    mask = np.zeros((L, E), bool)
    taken = np.zeros(L, np.int64)
    # Each layer's order, hottest first (stable: ties to the lower expert id).
    order = np.argsort(-freq, axis=1, kind="stable")
    for l in range(L):  # the guaranteed minimum
        mask[l, order[l, :lo]] = True
        taken[l] = lo
    budget = total - lo * L
    flat = np.argsort(-freq.reshape(-1), kind="stable")
    for idx in flat:
        if budget == 0:
            break
        l, e = divmod(int(idx), E)
        if mask[l, e] or taken[l] >= hi:
            continue
        mask[l, e] = True
        taken[l] += 1
        budget -= 1
    if is_torch(activation_counts):
        return torch_module().from_numpy(mask)
    return mask
