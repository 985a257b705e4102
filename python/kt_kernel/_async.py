"""submit_forward / sync_forward of KTMoEWrapper (INTERFACE.md), over the
native AsyncLayer (src/moe/async_layer.h).

Two modes, chosen per call:
- CPU mode (cuda_stream == 0, CPU tensors): submit copies the inputs into the
  layer's staging and queues the task on the process-wide ordered queue;
  sync waits for it and returns the output (a persistent buffer for the
  capture batch sizes).
- Stream mode (a nonzero cuda_stream, or inputs on a CUDA device): submit and
  sync only enqueue work on the stream (copies in, a host function that
  queues the task, a host function that waits for it, the copy out). The CUDA
  runtime is loaded at that moment, never for CPU-only use. Host (CPU)
  tensors are accepted in stream mode too: the copies then run host to host,
  in stream order. That is how the tests drive this path without a GPU, with
  a stand-in runtime (KT_KERNEL_CUDART).

The torch-CUDA glue is only: data_ptr()/device/dtype of the inputs, and the
output allocated with torch on the caller's device.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _kt_kernel
from ._tensors import (FLOAT_CODES, _torch_dtype_names, _torch_types, data_ptr, describe, empty_like_rows,
                       is_torch, torch_module)

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _native(wr):
    """The AsyncLayer of the wrapper's current native layer (rebuilt if the layer was)."""
    a = getattr(wr, "_async", None)
    if a is None or wr._async_owner is not wr._layer:
        a = _kt_kernel.AsyncLayer(wr._layer, wr._layer.address, wr.layer_idx)
        wr._async, wr._async_owner = a, wr._layer
    return a


def _device_key(info) -> str:
    obj = info.obj
    return str(obj.device) if is_torch(obj) else "numpy"


def _output(wr, x_info, T: int, persistent: bool, use_stream: bool):
    """[T, H] in the input's dtype on the input's device; persistent for capture sizes (one per mode, so
    a CPU-mode call never writes a captured graph's output)."""
    if persistent:
        key = (T, x_info.dtype, _device_key(x_info), use_stream)
        buf = wr._out_cache.get(key)
        if buf is None:
            buf = wr._out_cache[key] = _new_output(x_info, T, wr.hidden_size)
        return buf
    return _new_output(x_info, T, wr.hidden_size)


def _new_output(x_info, T: int, H: int):
    obj = x_info.obj
    return obj.new_empty((T, H)) if x_info.device != "cpu" else empty_like_rows(obj, T, H)


def submit(wr, hidden_states: Any, topk_ids: Any, topk_weights: Any, cuda_stream: int,
           num_tokens: Optional[Any] = None, run_inline: bool = False) -> None:
    """run_inline (forward(), which syncs at once): in CPU mode the layer runs on this thread if no
    other layer task is queued or running, which saves the hand-off to the executor and back."""
    if not wr._loaded:
        raise RuntimeError("weights are not loaded: call load_weights_from_tensors or load_weights first")
    if isinstance(cuda_stream, bool) or not isinstance(cuda_stream, (int, np.integer)) or cuda_stream < 0:
        raise TypeError(f"cuda_stream: expected a non-negative int (a cudaStream_t handle), got {cuda_stream!r}")
    H, k = wr.hidden_size, wr.num_experts_per_tok
    x = describe(hidden_states, "hidden_states", dtypes=_FLOAT_DTYPES, ndim=2, shape=(None, H), allow_cuda=True)
    T = x.shape[0]
    ids = describe(topk_ids, "topk_ids", dtypes=("int32", "int64"), ndim=2, shape=(T, k), allow_cuda=True)
    w = describe(topk_weights, "topk_weights", dtypes=_FLOAT_DTYPES, ndim=2, shape=(T, k), allow_cuda=True)
    if is_torch(x.obj) != is_torch(ids.obj) or is_torch(x.obj) != is_torch(w.obj):
        raise TypeError("hidden_states, topk_ids and topk_weights must all be torch tensors or all NumPy arrays")
    all_cpu = x.device == "cpu" and ids.device == "cpu" and w.device == "cpu"
    devices = {"cpu"} if all_cpu else {_device_key(i) for i in (x, ids, w)}
    if len(devices) != 1:
        raise ValueError(f"hidden_states, topk_ids and topk_weights must be on one device, got {sorted(devices)}")
    on_device = x.device != "cpu"
    use_stream = bool(cuda_stream) or on_device
    if on_device and not cuda_stream:  # CUDA tensors without a stream: PyTorch's current stream
        cuda_stream = int(torch_module().cuda.current_stream(x.obj.device).cuda_stream)
    tokens_dev = 0
    if num_tokens is not None:
        if not use_stream:
            raise ValueError("num_tokens applies to stream mode only (a nonzero cuda_stream or device inputs)")
        nt = describe(num_tokens, "num_tokens", dtypes=("int64",), ndim=1, shape=(1,), allow_cuda=True)
        tokens_dev = nt.ptr
    if wr._pending is not None:
        raise RuntimeError(f"layer {wr.layer_idx}: submit_forward called twice without sync_forward")
    persistent = T in wr._capture_batch_sizes  # the class's list (set_capture_batch_sizes)
    y, y_ptr, y_stride = None, 0, 0
    if not use_stream:
        y = _output(wr, x, T, persistent, False)  # ours: [T, H], C-contiguous, on the CPU
        y_ptr, y_stride = data_ptr(y), H
    counts = wr._expert_counts
    _native(wr).submit(T, x.ptr, FLOAT_CODES[x.dtype], x.row_stride, ids.ptr, ids.dtype == "int64", ids.row_stride,
                       w.ptr, FLOAT_CODES[w.dtype], w.row_stride, wr._mask_ptr(), y_ptr, FLOAT_CODES[x.dtype],
                       y_stride, int(wr.max_deferred_experts_per_token or 0),
                       counts.ctypes.data if counts is not None else 0, persistent, use_stream, int(cuda_stream),
                       tokens_dev, run_inline and not use_stream)
    wr._pending = (use_stream, y, x, T, persistent)


# torch dtype object -> native float code / "is int64", filled on first sight from the names describe
# has already learnt (the fast path reads them, never str(dtype)).
_fast_float_codes: dict = {}
_fast_id_types: dict = {}


def _fast_codes(dtype):
    """(float code or None, int64 flag or None) of a torch dtype; remembered once describe knows its
    name (until then the full path runs, and describe learns it)."""
    name = _torch_dtype_names.get(dtype)
    code = FLOAT_CODES.get(name) if name in _FLOAT_DTYPES else None
    is64 = {"int32": False, "int64": True}.get(name)
    if name is not None:
        _fast_float_codes[dtype], _fast_id_types[dtype] = code, is64
    return code, is64


def forward_cpu(wr, x: Any, ids: Any, w: Any):
    """forward() of the common server call, in about half the Python time of submit + sync: CPU
    torch tensors of the dtypes and shapes describe accepts, row-contiguous, no capture batch size.
    Returns None, having done nothing, for anything else (other kinds, devices, dtypes, shapes,
    layouts, empty batches, a pending submit): the full path then runs, and raises its errors."""
    tx = type(x)
    if tx not in _torch_types or type(ids) is not tx or type(w) is not tx or not wr._loaded or wr._pending is not None:
        return None
    if not (x.is_cpu and ids.is_cpu and w.is_cpu):
        return None
    xc = _fast_float_codes.get(x.dtype, -1)
    if xc == -1:
        xc = _fast_codes(x.dtype)[0]
    wc = _fast_float_codes.get(w.dtype, -1)
    if wc == -1:
        wc = _fast_codes(w.dtype)[0]
    i64 = _fast_id_types.get(ids.dtype, -1)
    if i64 == -1:
        i64 = _fast_codes(ids.dtype)[1]
    if xc is None or wc is None or i64 is None:
        return None
    H, k = wr.hidden_size, wr.num_experts_per_tok
    xs = x.shape
    if len(xs) != 2 or xs[1] != H:
        return None
    T = xs[0]
    if T == 0 or ids.shape != (T, k) or w.shape != (T, k) or T in wr._capture_batch_sizes:
        return None
    # describe's layout rule ("rows"): unit stride along a row, rows that do not overlap.
    try:
        sx, si, sw = x.stride(), ids.stride(), w.stride()
    except RuntimeError:  # a sparse layout: describe names the argument
        return None
    if sx[1] != 1 or si[1] != 1 or sw[1] != 1:
        return None
    if T > 1 and (sx[0] < H or si[0] < k or sw[0] < k):
        return None
    y = x.new_empty((T, H))
    counts = wr._expert_counts
    nat = _native(wr)
    nat.submit(T, x.data_ptr(), xc, sx[0], ids.data_ptr(), i64, si[0], w.data_ptr(), wc, sw[0], wr._mask_ptr(),
               y.data_ptr(), xc, H, int(wr.max_deferred_experts_per_token or 0),
               counts.ctypes.data if counts is not None else 0, False, False, 0, 0, True)
    nat.sync(0, 0)
    return y


def sync(wr, hidden_states: Any, cuda_stream: int):
    if wr._pending is None:
        raise RuntimeError(f"layer {wr.layer_idx}: sync_forward called without submit_forward")
    use_stream, y, x, T, persistent = wr._pending
    wr._pending = None
    if use_stream:
        y = _output(wr, x, T, persistent, True)
        yi = describe(y, "output", dtypes=_FLOAT_DTYPES, ndim=2, shape=(T, wr.hidden_size), allow_cuda=True)
        _native(wr).sync(yi.ptr, yi.row_stride)
    else:
        _native(wr).sync(0, 0)
    return y
