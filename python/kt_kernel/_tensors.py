"""Duck-typed access to torch tensors and NumPy arrays, without importing torch.

Every public entry point describes its tensor arguments through `describe`,
which checks dtype, shape, device and layout and raises a TypeError or
ValueError naming the argument, so that the native module only ever sees
addresses it can trust.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence, Tuple

import numpy as np

# Native dtype codes (kt::DType).
F32, F16, BF16, F64 = 0, 1, 2, 3

_TORCH_DTYPES = {
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.float64": "float64",
    "torch.int32": "int32",
    "torch.int64": "int64",
    "torch.bool": "bool",
    "torch.uint8": "uint8",
}
_NUMPY_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(np.float64): "float64",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.bool_): "bool",
    np.dtype(np.uint8): "uint8",
}
FLOAT_CODES = {"float32": F32, "float16": F16, "bfloat16": BF16, "float64": F64}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4, "int64": 8, "bool": 1, "uint8": 1}


_torch_types: set = set()  # types seen to be torch tensors (is_torch runs many times per layer call)


def is_torch(obj: Any) -> bool:
    tp = type(obj)
    if tp in _torch_types:
        return True
    if tp.__module__.startswith("torch") and hasattr(obj, "data_ptr"):
        _torch_types.add(tp)
        return True
    return False


class TensorInfo:
    """What describe found: the object, its dtype name, shape, strides (in elements), device and
    address. A plain class with slots: describe runs three times per layer call, and a dataclass
    instance cost a third of a microsecond more."""

    __slots__ = ("obj", "name", "dtype", "shape", "strides", "device", "ptr")

    def __init__(self, obj: Any, name: str, dtype: str, shape: Tuple[int, ...], strides: Tuple[int, ...],
                 device: str, ptr: int):
        self.obj, self.name, self.dtype, self.shape = obj, name, dtype, shape
        self.strides, self.device, self.ptr = strides, device, ptr

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def row_stride(self) -> int:
        return self.strides[0] if self.shape else 0


# torch dtype object -> name, filled on first sight (str(dtype) costs a microsecond per call, and
# describe runs three times per layer call).
_torch_dtype_names: dict = {}


def _torch_info(t: Any, name: str) -> TensorInfo:
    dtype = t.dtype
    dt = _torch_dtype_names.get(dtype)
    if dt is None:
        dt = _TORCH_DTYPES.get(str(dtype))
        if dt is None:
            raise TypeError(f"{name}: unsupported dtype {dtype}")
        _torch_dtype_names[dtype] = dt
    # torch.Size is a tuple of ints, stride() a tuple; is_cpu is 6x cheaper than device.type.
    try:
        strides, ptr = t.stride(), t.data_ptr()
    except RuntimeError as e:  # sparse layouts have no strides or no single data pointer
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout} ({e})") from None
    return TensorInfo(t, name, dt, t.shape, strides, "cpu" if t.is_cpu else t.device.type, ptr)


def data_ptr(obj: Any) -> int:
    """Address of the first element of a torch tensor or NumPy array."""
    return obj.data_ptr() if is_torch(obj) else int(obj.__array_interface__["data"][0])


def _numpy_info(a: np.ndarray, name: str) -> TensorInfo:
    dt = _NUMPY_DTYPES.get(a.dtype)
    if dt is None and a.dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        dt = "bfloat16"
    if dt is None:
        raise TypeError(f"{name}: unsupported dtype {a.dtype}")
    item = a.dtype.itemsize
    if any(s % item for s in a.strides):
        raise ValueError(f"{name}: strides {a.strides} are not multiples of the element size")
    return TensorInfo(a, name, dt, tuple(a.shape), tuple(s // item for s in a.strides), "cpu",
                      int(a.__array_interface__["data"][0]))


def describe(obj: Any, name: str, *, dtypes: Sequence[str], ndim: int,
             shape: Optional[Sequence[Optional[int]]] = None, contiguous: str = "rows",
             allow_cuda: bool = False) -> TensorInfo:
    """Validates a tensor argument.

    contiguous: "full" = C-contiguous; "rows" = last dimension contiguous, rows
    may be strided (a view of a larger buffer).
    """
    if is_torch(obj):
        info = _torch_info(obj, name)
    elif isinstance(obj, np.ndarray):
        info = _numpy_info(obj, name)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(obj).__name__}")
    if info.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {info.dtype} is not supported here (expected one of {', '.join(dtypes)})")
    if len(info.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim}-D, got shape {list(info.shape)}")
    if shape is not None:
        for i in range(ndim):
            want = shape[i]
            if want is not None and info.shape[i] != want:
                raise ValueError(f"{name}: dimension {i} is {info.shape[i]}, expected {want} "
                                 f"(shape {list(info.shape)})")
    if info.device != "cpu" and not (allow_cuda and info.device == "cuda"):
        raise ValueError(f"{name}: tensor on device '{info.device}', expected a CPU tensor")
    if 0 not in info.shape:
        if contiguous == "full":
            expect = 1
            for size, stride in zip(reversed(info.shape), reversed(info.strides)):
                if size != 1 and stride != expect:
                    raise ValueError(f"{name}: must be contiguous (shape {list(info.shape)}, strides {list(info.strides)})")
                expect *= size
        else:
            if info.shape[-1] != 1 and info.strides[-1] != 1:
                raise ValueError(f"{name}: the last dimension must be contiguous (strides {list(info.strides)})")
            if ndim == 2 and info.shape[0] > 1 and info.strides[0] < info.shape[1]:
                raise ValueError(f"{name}: rows overlap (strides {list(info.strides)})")
    return info


def torch_module():
    """torch if the process has already imported it; never imports it."""
    return sys.modules.get("torch")


def empty_like_rows(template: Any, rows: int, cols: int):
    """An uninitialised [rows, cols] CPU array of the template's kind and dtype."""
    if is_torch(template):
        return template.new_empty((rows, cols)) if template.is_cpu else template.new_empty((rows, cols), device="cpu")
    return np.empty((rows, cols), dtype=template.dtype)
