"""A small, strict safetensors reader and a streaming writer.

kt_kernel reads checkpoints and its own converted files without the
`safetensors` package. A file is: 8 bytes little-endian header length N,
N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}, then the data region; offsets are relative to
the data region. Every entry is checked against the file size before any
byte is read (a truncated or corrupt file raises ValueError naming the file
and the tensor, never crashes), and tensors are numpy views of one
read-only memory map. As in the reference implementation, the tensors must
tile the data region exactly (no overlap, no hole, nothing after the last),
so a CRC over the tensors covers every data byte.

Weight files are opened with open_regular: a FIFO, socket or device where a
file should be is refused instead of blocking the process in open() or
read() forever.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

# safetensors dtype name -> (numpy dtype used for the raw view, item size).
# BF16 and F8 have no numpy type: they are viewed as uint16 / uint8 codes.
DTYPES: Dict[str, Tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F8_E4M3": (np.dtype("u1"), 1),
    "F8_E5M2": (np.dtype("u1"), 1),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U64": (np.dtype("<u8"), 8),
    "U32": (np.dtype("<u4"), 4),
    "U16": (np.dtype("<u2"), 2),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
NUMPY_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
               np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("<u8"): "U64",
               np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


def open_regular(path: str):
    """Opens path for binary reading if it is a regular file (symlinks followed); ValueError otherwise.

    O_NONBLOCK makes open() return at once on a FIFO with no writer (it would
    block forever otherwise); the type is then read from the open descriptor,
    so nothing can be swapped in between the check and the read. The flag is
    cleared again (it means nothing for regular files, but a reader expects a
    blocking descriptor).
    """
    path = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ValueError(f"{path}: cannot open ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "another kind of file")
            raise ValueError(f"{path}: not a regular file ({kind}); weight files must be regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class TensorEntry:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: str, shape: Tuple[int, ...], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_header(blob: bytes, file_size: int, path: str = "<buffer>") -> Tuple[Dict[str, TensorEntry], Dict[str, str], int]:
    """Validates a safetensors header against a file of file_size bytes.

    blob: at least the first 8 + N bytes of the file. Returns (entries,
    metadata, data_start). Raises ValueError with the file (and tensor) named.
    """
    def bad(msg: str) -> ValueError:
        return ValueError(f"{path}: not a valid safetensors file: {msg}")

    if file_size < 8 or len(blob) < 8:
        raise bad(f"{file_size} bytes is too short for the 8-byte header length")
    n = int.from_bytes(blob[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} is out of range")
    if 8 + n > file_size:
        raise bad(f"header of {n} bytes runs past the end of the file ({file_size} bytes): truncated?")
    if len(blob) < 8 + n:
        raise bad("header is incomplete")
    try:
        header = json.loads(bytes(blob[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_start = 8 + n
    data_size = file_size - data_start
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()):
        raise bad("__metadata__ must map strings to strings")
    entries: Dict[str, TensorEntry] = {}
    spans: List[Tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {name!r}: entry is not an object")
        dt = info.get("dtype")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if dt not in DTYPES:
            raise bad(f"tensor {name!r}: unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > 8 or
                not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 48 for d in shape)):
            raise bad(f"tensor {name!r}: invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise bad(f"tensor {name!r}: invalid data_offsets {offs!r}")
        b, e = offs
        count = 1
        for d in shape:
            count *= d
        if not 0 <= b <= e:
            raise bad(f"tensor {name!r}: data_offsets [{b}, {e}] must satisfy 0 <= begin <= end")
        if e > data_size:
            raise bad(f"tensor {name!r}: data_offsets [{b}, {e}] are outside the data region of {data_size} bytes "
                      "(truncated file?)")
        if e - b != count * DTYPES[dt][1]:
            raise bad(f"tensor {name!r}: {e - b} bytes for shape {shape} of {dt} (expected {count * DTYPES[dt][1]})")
        entries[name] = TensorEntry(name, dt, tuple(shape), b, e)
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(f"tensors {n0!r} and {n1!r} overlap (data_offsets [{b0}, {e0}] and [{b1}, {e1}])")
    # Tensors must tile the data region: bytes outside every tensor would escape any per-tensor check.
    end = 0
    for b, e, name in spans:
        if b != end:
            raise bad(f"data region bytes [{end}, {b}) are not covered by any tensor (next: {name!r})")
        end = e
    if end != data_size:
        raise bad(f"data region bytes [{end}, {data_size}) after the last tensor are not covered by any tensor")
    return entries, dict(meta_raw), data_start


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `get(name)` returns a read-only numpy view."""

    def __init__(self, path: str):
        self.path = str(path)
        with open_regular(self.path) as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            n = int.from_bytes(first, "little") if len(first) == 8 else 0
            blob = first + (f.read(n) if 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size else b"")
            self.entries, self.metadata, self.data_start = parse_header(blob, size, self.path)
            self.size = size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> List[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self.entries[name]

    def get(self, name: str) -> np.ndarray:
        """Raw view: BF16 as uint16 codes, F8 as uint8 codes."""
        e = self.entry(name)
        dt = DTYPES[e.dtype][0]
        count = e.nbytes // dt.itemsize
        arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self.data_start + e.begin) if count else \
            np.zeros(0, dtype=dt)
        return arr.reshape(e.shape)

    def close(self) -> None:
        self._mm = None  # views keep the map alive until they are dropped


class StreamingWriter:
    """Writes a safetensors file whose tensor list is known up front, tensor by tensor, in any order.

    The header (with room reserved for metadata filled in at the end) is
    written first; `write(name, array)` puts each tensor at its offset; `close`
    rewrites the header with the final metadata. The file is written as
    `path + ".partial"` and renamed on close only after `verify` (if given)
    accepted what is on disk, so a complete file name always means a complete,
    checked file; `abort`, and a failed verification, remove the partial file.
    """

    def __init__(self, path: str, specs: Iterable[Tuple[str, str, Tuple[int, ...]]], metadata: Dict[str, str],
                 reserve: int = 4096):
        self.path = str(path)
        self.tmp = self.path + ".partial"
        self.specs: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        off = 0
        for name, dt, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt][1]
            self.specs[name] = (dt, tuple(int(d) for d in shape), off, off + nbytes)
            off += nbytes
        self.data_size = off
        self.reserve = reserve
        head = self._header(metadata, pad_to=None)
        self.header_len = len(head) + reserve
        self.header_len += (-self.header_len) % 8
        self.fd = -1
        try:  # whatever an interrupted run (or anyone) left there, a fresh regular file replaces it
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.written = set()
        try:
            os.ftruncate(self.fd, 8 + self.header_len + self.data_size)
            self._write_header(metadata)
        except BaseException:
            self.abort()
            raise

    def _header(self, metadata: Dict[str, str], pad_to: Optional[int]) -> bytes:
        h = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        for name, (dt, shape, b, e) in self.specs.items():
            h[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [b, e]}
        raw = json.dumps(h, separators=(",", ":")).encode()
        if pad_to is not None:
            if len(raw) > pad_to:
                raise ValueError(f"{self.path}: final metadata does not fit the reserved header space")
            raw += b" " * (pad_to - len(raw))
        return raw

    def _write_header(self, metadata: Dict[str, str]) -> None:
        raw = self._header(metadata, self.header_len)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)

    def write(self, name: str, array: np.ndarray) -> None:
        dt, shape, b, e = self.specs[name]
        a = np.ascontiguousarray(array)
        if tuple(a.shape) != shape or a.nbytes != e - b:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {a.shape} ({a.nbytes} bytes), "
                             f"declared {shape} ({e - b} bytes)")
        mv = memoryview(a.reshape(-1).view(np.uint8))
        pos, done = 8 + self.header_len + b, 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], pos + done)
        self.written.add(name)

    def close(self, metadata: Dict[str, str], verify: Optional[Callable[[str], None]] = None) -> None:
        """Writes the final header, flushes to disk, runs verify(partial_path) (which raises on a bad file),
        then renames the file into place. On any error the partial file is removed and the error raised."""
        try:
            missing = [n for n in self.specs if n not in self.written]
            if missing:
                raise ValueError(f"{self.path}: {len(missing)} tensors were never written (first: {missing[0]})")
            self._write_header(metadata)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if verify is not None:
                verify(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Closes and removes the partial file (safe to call more than once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def read_metadata(path: str) -> Dict[str, str]:
    return SafetensorsFile(path).metadata
