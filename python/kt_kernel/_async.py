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
from ._tensors import (_NUMPY_DTYPES, FLOAT_CODES, _torch_dtype_names, _torch_types, data_ptr, describe,
                       empty_like_rows, is_torch, torch_module)

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _native(wr):
    """The AsyncLayer of the wrapper's current native layer (rebuilt if the layer was)."""
    a = getattr(wr, "_async", None)
    if a is None or wr._async_owner is not wr._layer:
        a = _kt_kernel.AsyncLayer(wr._layer, wr.layer_idx)
        wr._async, wr._async_owner = a, wr._layer
    return a


def _current_native(wr):
    """The AsyncLayer of the wrapper's current native layer if one was made (None before the first call, or
    after the layer was rebuilt): the one whose pending flag counts."""
    return wr._async if wr._async_owner is wr._layer else None


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


def _prepare(wr, hidden_states: Any, topk_ids: Any, topk_weights: Any, cuda_stream: int,
             num_tokens: Optional[Any], run_inline: bool, caller: str):
    """Checks a call's arguments: (the native submit's arguments, (use_stream, CPU-mode output, x info,
    T, persistent)). Raises, having changed nothing, on bad input or a submit pending."""
    if not wr._loaded:
        raise RuntimeError("weights are not loaded: call load_weights_from_tensors or load_weights first")
    if isinstance(cuda_stream, bool) or not isinstance(cuda_stream, (int, np.integer)) or cuda_stream < 0:
        raise TypeError(f"cuda_stream: expected a non-negative int (a cudaStream_t handle), got {cuda_stream!r}")
    if cuda_stream >= 1 << 64:
        raise ValueError(f"cuda_stream: {cuda_stream} does not fit a 64-bit cudaStream_t handle")
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
    _check_not_pending(wr, caller)
    persistent = T in wr._capture_batch_sizes  # the class's list (set_capture_batch_sizes)
    y, y_ptr, y_stride = None, 0, 0
    if not use_stream:
        y = _output(wr, x, T, persistent, False)  # ours: [T, H], C-contiguous, on the CPU
        y_ptr, y_stride = data_ptr(y), H
    counts = wr._expert_counts
    args = (T, x.ptr, FLOAT_CODES[x.dtype], x.row_stride, ids.ptr, ids.dtype == "int64", ids.row_stride,
            w.ptr, FLOAT_CODES[w.dtype], w.row_stride, wr._mask_ptr(), y_ptr, FLOAT_CODES[x.dtype],
            y_stride, int(wr.max_deferred_experts_per_token or 0),
            counts.ctypes.data if counts is not None else 0, persistent, use_stream, int(cuda_stream),
            tokens_dev, run_inline and not use_stream)
    return args, (use_stream, y, x, T, persistent)


def _check_not_pending(wr, caller: str) -> None:
    """The native layer's pending flag is the truth; wr._pending (what sync needs to return) is set
    before the native submit, so a KeyboardInterrupt anywhere leaves at worst a stale record, which
    this clears."""
    nat = _current_native(wr)
    if nat is not None and nat.pending:
        if caller == "submit_forward":
            raise RuntimeError(f"layer {wr.layer_idx}: submit_forward called twice without sync_forward")
        raise RuntimeError(f"layer {wr.layer_idx}: {caller} called while a submit_forward is pending "
                           "(call sync_forward first)")
    wr._pending = None


def submit(wr, hidden_states: Any, topk_ids: Any, topk_weights: Any, cuda_stream: int,
           num_tokens: Optional[Any] = None) -> None:
    args, info = _prepare(wr, hidden_states, topk_ids, topk_weights, cuda_stream, num_tokens, False,
                          "submit_forward")
    nat = _native(wr)
    wr._pending = info
    try:
        nat.submit(*args)
    except BaseException:
        if not nat.pending:  # (an interrupt after the native submit returned leaves it pending: keep the record)
            wr._pending = None
        raise


def forward(wr, hidden_states: Any, topk_ids: Any, topk_weights: Any, cuda_stream: int):
    """forward()'s full path: submit + sync in one native call (nothing between them to interrupt); in CPU
    mode the layer runs on this thread if no other layer task is queued or running, which saves the
    hand-off to the executor and back."""
    args, (use_stream, y, x, T, persistent) = _prepare(wr, hidden_states, topk_ids, topk_weights, cuda_stream,
                                                       None, True, "forward")
    nat = _native(wr)
    if use_stream:
        y = _output(wr, x, T, persistent, True)
        yi = describe(y, "output", dtypes=_FLOAT_DTYPES, ndim=2, shape=(T, wr.hidden_size), allow_cuda=True)
        nat.forward(*args, yi.ptr, yi.row_stride)
    else:
        nat.forward(*args, 0, 0)
    return y


# dtype object (torch or NumPy) -> native float code / "is int64", for the short path; a dtype is
# remembered once its name is known (torch: once describe has seen it; until then the full path runs,
# and describe learns it), so the short path never calls str(dtype).
_fast_float_codes: dict = {}
_fast_id_types: dict = {}


def _fast_codes(dtype, name):
    """(float code or None, int64 flag or None) of a dtype whose name is `name` (None: unknown)."""
    code = FLOAT_CODES.get(name) if name in _FLOAT_DTYPES else None
    is64 = {"int32": False, "int64": True}.get(name)
    if name is not None:
        _fast_float_codes[dtype], _fast_id_types[dtype] = code, is64
    return code, is64


def _numpy_dtype_name(dtype):
    name = _NUMPY_DTYPES.get(dtype)
    return "bfloat16" if name is None and dtype.name == "bfloat16" else name  # ml_dtypes.bfloat16


def _code(dtype, ids: bool, name_of):
    """The float code (ids=False) or int64 flag (ids=True) of a dtype, None if the short path does not
    take it; name_of(dtype) gives its name the first time."""
    c = (_fast_id_types if ids else _fast_float_codes).get(dtype, -1)
    if c == -1:
        c = _fast_codes(dtype, name_of(dtype))[1 if ids else 0]
    return c


def _numpy_args(x: np.ndarray, ids: np.ndarray, w: np.ndarray):
    """((x code, ids int64 flag, w code), row strides in elements, data pointers) of three NumPy arrays
    with dtypes describe accepts and rows of unit stride, or None."""
    xc, i64, wc = (_code(x.dtype, False, _numpy_dtype_name), _code(ids.dtype, True, _numpy_dtype_name),
                   _code(w.dtype, False, _numpy_dtype_name))
    if xc is None or wc is None or i64 is None:
        return None
    rows = []
    for a in (x, ids, w):
        st, item = a.strides, a.itemsize
        if len(st) != 2 or st[1] != item or st[0] % item:
            return None
        rows.append(st[0] // item)
    return (xc, i64, wc), rows, [a.__array_interface__["data"][0] for a in (x, ids, w)]


def forward_cpu(wr, x: Any, ids: Any, w: Any):
    """forward() of the common call, in about half the Python time of submit + sync: three CPU torch
    tensors or three NumPy arrays of the dtypes and shapes describe accepts, rows of unit stride that
    do not overlap, no capture batch size. Returns None, having done nothing, for anything else
    (other kinds, devices, dtypes, shapes, layouts, empty batches, a pending submit): the full path
    then runs, and raises its errors. The torch case is written out here rather than through
    helpers: at a model's shape this code runs on caches the kernels have just flushed, and the
    helper calls cost 5-8 us per layer call (Qwen3-30B-A3B and DeepSeek-V2-Lite INT8, alternated)."""
    tx = type(x)
    if type(ids) is not tx or type(w) is not tx or not wr._loaded or wr._pending is not None:
        return None
    H, k = wr.hidden_size, wr.num_experts_per_tok
    xs = getattr(x, "shape", None)
    if xs is None or len(xs) != 2 or xs[1] != H:
        return None
    T = xs[0]
    if T == 0 or getattr(ids, "shape", None) != (T, k) or getattr(w, "shape", None) != (T, k) \
            or T in wr._capture_batch_sizes:
        return None
    if tx is np.ndarray:
        args = _numpy_args(x, ids, w)
        if args is None:
            return None
        (xc, i64, wc), (sx, si, sw), (px, pi, pw) = args
        y = np.empty((T, H), dtype=x.dtype)
        py = y.__array_interface__["data"][0]
    elif tx in _torch_types and x.is_cpu and ids.is_cpu and w.is_cpu:
        xc = _fast_float_codes.get(x.dtype, -1)
        if xc == -1:
            xc = _code(x.dtype, False, _torch_dtype_names.get)
        wc = _fast_float_codes.get(w.dtype, -1)
        if wc == -1:
            wc = _code(w.dtype, False, _torch_dtype_names.get)
        i64 = _fast_id_types.get(ids.dtype, -1)
        if i64 == -1:
            i64 = _code(ids.dtype, True, _torch_dtype_names.get)
        if xc is None or wc is None or i64 is None:
            return None
        try:
            stx, sti, stw = x.stride(), ids.stride(), w.stride()
        except RuntimeError:  # a sparse layout: describe names the argument
            return None
        if stx[1] != 1 or sti[1] != 1 or stw[1] != 1:
            return None
        sx, si, sw = stx[0], sti[0], stw[0]
        px, pi, pw = x.data_ptr(), ids.data_ptr(), w.data_ptr()
        y = x.new_empty((T, H))
        py = y.data_ptr()
    else:
        return None
    if T > 1 and (sx < H or si < k or sw < k):  # rows that overlap: describe's "rows" rule refuses them
        return None
    nat = _native(wr)
    counts = wr._expert_counts
    nat.forward(T, px, xc, sx, pi, i64, si, pw, wc, sw, wr._mask_ptr(), py, xc, H,
                int(wr.max_deferred_experts_per_token or 0), counts.ctypes.data if counts is not None else 0,
                False, False, 0, 0, True, 0, 0)
    return y


def sync(wr, hidden_states: Any, cuda_stream: int):
    nat = _current_native(wr)
    info = wr._pending
    if nat is None or not nat.pending or info is None:
        wr._pending = None
        raise RuntimeError(f"layer {wr.layer_idx}: sync_forward called without submit_forward")
    use_stream, y, x, T, persistent = info
    try:
        if use_stream:
            y = _output(wr, x, T, persistent, True)
            yi = describe(y, "output", dtypes=_FLOAT_DTYPES, ndim=2, shape=(T, wr.hidden_size), allow_cuda=True)
            nat.sync(yi.ptr, yi.row_stride)
        else:
            nat.sync(0, 0)
    finally:
        if not nat.pending:
            wr._pending = None
    return y


def drain(wr, caller: str) -> None:
    """Waits for every queued, running or stream-pending task of the wrapper's layer (its weights may then
    change); raises if a submit_forward is pending."""
    nat = _current_native(wr)
    if nat is None:
        return
    if nat.pending:
        raise RuntimeError(f"layer {wr.layer_idx}: {caller} called while a submit_forward is pending "
                           "(call sync_forward first)")
    nat.drain()
