"""The stand-in CUDA runtime (tests/fake_cudart/fake_cudart.c), built with the
system C compiler on first use and handed to kt_kernel through
KT_KERNEL_CUDART. "Device" memory is host memory; each stream is a thread that
runs copies and host functions in order and logs them."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile

import numpy as np

SRC = os.path.join(os.path.dirname(__file__), "..", "fake_cudart", "fake_cudart.c")

EV_CALL_MEMCPY, EV_CALL_HOSTFN, EV_RUN_MEMCPY, EV_HOSTFN_BEGIN, EV_HOSTFN_END, EV_ALLOC, EV_SYNC, EV_VIOLATION = \
    range(1, 9)
OP_MEMCPY, OP_HOSTFN = 1, 2


class Event(ctypes.Structure):
    _fields_ = [("seq", ctypes.c_int64), ("kind", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("stream", ctypes.c_uint64), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def build(out_dir: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build the stand-in CUDA runtime")
    path = os.path.join(out_dir, "libfake_cudart.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-pthread", "-o", path, SRC], check=True)
    return path


class FakeCuda:
    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path)
        L = self.lib
        L.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                        ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        for name in ("fake_hold",):
            getattr(L, name).argtypes = [ctypes.c_uint64, ctypes.c_int]
        for name in ("fake_wait_idle", "fake_begin_capture", "fake_replay"):
            getattr(L, name).argtypes = [ctypes.c_uint64]
        L.fake_end_capture.argtypes = [ctypes.c_uint64]
        L.fake_end_capture.restype = ctypes.c_int64
        L.fake_graph_op.argtypes = [ctypes.c_uint64, ctypes.c_int64]
        L.fake_log_size.restype = ctypes.c_int64
        L.fake_log_read.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        L.fake_log_read.restype = ctypes.c_int64
        L.fake_allocs.restype = ctypes.c_int64
        L.fake_violations.restype = ctypes.c_int64

    # A "kernel" on the stream: copies src (host array) into dst (a device stand-in), in stream order.
    def kernel_copy(self, stream: int, dst: np.ndarray, src: np.ndarray) -> None:
        assert dst.nbytes == src.nbytes and dst.flags.c_contiguous and src.flags.c_contiguous
        err = self.lib.cudaMemcpy2DAsync(dst.ctypes.data, dst.nbytes, src.ctypes.data, src.nbytes, src.nbytes, 1, 4,
                                         ctypes.c_void_p(stream))
        assert err == 0

    def hold(self, stream: int, on: bool) -> None:
        self.lib.fake_hold(stream, int(on))

    def wait_idle(self, stream: int) -> None:
        self.lib.fake_wait_idle(stream)

    def begin_capture(self, stream: int) -> None:
        self.lib.fake_begin_capture(stream)

    def end_capture(self, stream: int):
        n = self.lib.fake_end_capture(stream)
        return [self.lib.fake_graph_op(stream, i) for i in range(n)]

    def replay(self, stream: int) -> None:
        self.lib.fake_replay(stream)

    def log_size(self) -> int:
        return self.lib.fake_log_size()

    def events(self, first: int = 0):
        n = self.log_size() - first
        buf = (Event * max(n, 1))()
        got = self.lib.fake_log_read(first, n, ctypes.addressof(buf))
        return [(e.seq, e.kind, e.stream, e.a, e.b) for e in buf[:got]]

    @property
    def allocs(self) -> int:
        return self.lib.fake_allocs()

    @property
    def violations(self) -> int:
        return self.lib.fake_violations()


_fake = None


def get() -> FakeCuda:
    """Builds the stand-in once per process and points kt_kernel at it (before it loads a runtime)."""
    global _fake
    if _fake is None:
        path = build(tempfile.mkdtemp(prefix="kt_fake_cudart_"))
        os.environ["KT_KERNEL_CUDART"] = path
        _fake = FakeCuda(path)
    return _fake
