"""The one process-wide worker pool, created by the first wrapper; and what the
process does around it at fork and at interpreter exit.

Fork (os.fork, multiprocessing's fork start method): the native fork handler
waits until no call of the library is in progress on another thread and the
layer queue is idle (up to 20 s), so the child inherits no lock held and no
half-done task; the child then starts its own worker threads on first use.
Python-side state held by a thread that the child does not have is reset
here: this module's lock, and the lock and call state of a wrapper that such
a thread was inside at the moment of the fork (in the child that call never
happened; a submit it had made but not synced is dropped).

Exit: an atexit function parks any other thread that enters or leaves the
library from then on and waits (up to 20 s) for calls in progress and queued
layer work, before the interpreter starts freeing objects (see
src/bindings/gil_release.h for why a daemon thread would otherwise abort the
process).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import warnings
from typing import List, Optional

from . import _kt_kernel

_lock = threading.Lock()
_pool = None

# Bound on the exit drain; the same as the native fork handler's.
EXIT_WAIT_S = 20.0


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


def _after_fork_in_child() -> None:
    global _lock
    # A lock held by a thread of the parent stays held forever here.
    _lock = threading.Lock()
    wrapper = sys.modules.get(__package__ + ".wrapper")
    if wrapper is None:
        return
    for w in list(wrapper.KTMoEWrapper._instances):
        lock = getattr(w, "_lock", None)
        if lock is not None and lock.locked():
            # Held by a thread that was inside a call of this wrapper when the parent forked (the thread
            # calling fork holds no wrapper lock): the call is not finished in this process. Its native
            # work is (the fork handler waited for it); drop the call's state, so the wrapper serves the
            # child from a clean slate.
            w._lock = threading.Lock()
            w._pending = None
            w._async = None
            w._async_owner = None


def _prepare_exit() -> None:
    if not _kt_kernel._prepare_exit(EXIT_WAIT_S):
        print(f"kt_kernel: interpreter exit went ahead after {EXIT_WAIT_S:g} s with library calls or layer "
              "work still running", file=sys.stderr)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_prepare_exit)
