"""The one process-wide worker pool, created by the first wrapper."""

from __future__ import annotations

import os
import threading
import warnings
from typing import List, Optional

from . import _kt_kernel

_lock = threading.Lock()
_pool = None


def get_pool(threads: int, numa_nodes: List[int]):
    """The shared pool; created on first use with these settings.

    Later wrappers share it whatever they ask for (a warning says so when the
    request differs), as servers create one wrapper per layer with the same
    settings.
    """
    global _pool
    with _lock:
        if _pool is None:
            pin = os.environ.get("KT_KERNEL_PIN", "1") not in ("0", "false", "no")
            _pool = _kt_kernel.ThreadPool(threads, list(numa_nodes), pin)
        elif _pool.num_threads != threads or list(_pool.numa_nodes) != list(numa_nodes):
            warnings.warn(
                f"kt_kernel: the worker pool already exists with {_pool.num_threads} threads on NUMA nodes "
                f"{list(_pool.numa_nodes)}; ignoring the request for {threads} threads on {list(numa_nodes)}",
                RuntimeWarning, stacklevel=3)
        return _pool


def reset_pool_for_tests() -> None:
    """Drops the shared pool (layers keep theirs alive); the next wrapper makes a new one."""
    global _pool
    with _lock:
        _pool = None


def current_pool() -> Optional[object]:
    return _pool
