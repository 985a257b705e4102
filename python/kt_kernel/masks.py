"""Expert placement: which (layer, expert) pairs live on the GPU."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._tensors import is_torch, torch_module


def _to_numpy_2d(freq: Any) -> np.ndarray:
    if is_torch(freq):
        arr = freq.detach().to("cpu").double().numpy()
    elif isinstance(freq, np.ndarray):
        arr = freq.astype(np.float64, copy=False)
    else:
        raise TypeError(f"activation_freq: expected a torch.Tensor or numpy.ndarray, got {type(freq).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"activation_freq: expected a 2-D [layers, experts] table, got shape {list(arr.shape)}")
    if np.isnan(arr).any():
        raise ValueError("activation_freq: contains NaN")
    return arr


def generate_gpu_experts_masks(activation_freq: Any, num_gpu_experts: int):
    """A global top-`num_gpu_experts` over the flattened [L, E] frequency table.

    Returns a bool table of the same shape (a torch tensor for torch input,
    else a NumPy array): True = that (layer, expert) lives on the GPU. The
    count is clamped to [0, L * E]; ties go to the lower (layer, expert) index.
    """
    freq = _to_numpy_2d(activation_freq)
    if isinstance(num_gpu_experts, bool) or not isinstance(num_gpu_experts, (int, np.integer)):
        raise TypeError(f"num_gpu_experts: expected an int, got {type(num_gpu_experts).__name__}")
    n = int(min(max(int(num_gpu_experts), 0), freq.size))
    flat = np.zeros(freq.size, dtype=bool)
    if n:
        order = np.argsort(-freq.reshape(-1), kind="stable")
        flat[order[:n]] = True
    mask = flat.reshape(freq.shape)
    if is_torch(activation_freq):
        return torch_module().from_numpy(mask)
    return mask
