"""What a server does to the process around the library: fork (os.fork, multiprocessing's fork start
method) after layers ran, and interpreter exit with work in flight. Each case runs in its own
interpreter with a timeout (the process group is killed on timeout, forked children included), so a
hang or an abort fails the test instead of the run.

Fork rule (docs/DESIGN_NOTES.md, "Fork and exit"): fork waits for library calls in progress on other
threads and for queued layer work; the child starts with an idle queue and pool, starts its own
threads on first use, and every wrapper works there. A wrapper that another thread was inside at the
moment of the fork has that call's state dropped in the child (the call belongs to a thread the child
does not have).
Exit rule: exit waits (bounded) for calls in progress and queued work; other threads that enter or
leave the library afterwards are parked; exit code 0, nothing on stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import kt_kernel

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(kt_kernel.__file__)))

# Small layers (the cases are about threads, not numbers), a 2-thread pool; every child arms an alarm
# so a hung grandchild cannot outlive the test.
PRELUDE = r'''
import os, signal, sys, threading, time
import numpy as np
import kt_kernel
from kt_kernel import _pool

E, K, H, I = 8, 2, 64, 128

def weights(seed):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) / 8).astype(np.float32) for s in ((E, I, H), (E, I, H), (E, H, I))]

def inputs(T=5, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, K)).astype(np.float32)
    return x, ids, w

def layer(idx=0, d=None, threads=2, seed=None, load=True):
    wr = kt_kernel.KTMoEWrapper(layer_idx=idx, num_experts=E, num_experts_per_tok=K, hidden_size=H,
                                moe_intermediate_size=I, cpuinfer_threads=threads, threadpool_count=1,
                                numa_nodes=[0], method="AMXINT8", max_deferred_experts_per_token=d,
                                gpu_experts_mask=np.zeros(E, bool))  # a NumPy mask: no torch import (2 s)
    if load:
        wr.load_weights_from_tensors(*weights(idx if seed is None else seed))
    return wr

def in_child(fn):
    """Forks; the child runs fn() and leaves through a normal interpreter exit (atexit, finalization,
    static destructors) with 0 if fn() returned True. Returns the child's exit code."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        ok = False
        try:
            ok = bool(fn())
        except Exception as e:  # a SystemExit (a nested in_child) goes through
            print("child:", type(e).__name__, e, file=sys.stderr)
        sys.stdout.flush()
        sys.exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
'''

_BAD_STDERR = ("terminate called", "Abort", "Fatal Python error", "corrupted", "Segmentation", "Traceback",
               "child:", "kt_kernel: ")


def run(code: str, timeout: float = 90):
    env = dict(os.environ)
    env["PYTHONPATH"] = _PKG_DIR + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang)\nstdout:\n{out}\nstderr:\n{err}")
    return p.returncode, out, err


def assert_clean(rc, out, err, expect_out=None):
    assert rc == 0, f"exit code {rc}\nstdout:\n{out}\nstderr:\n{err}"
    for bad in _BAD_STDERR:
        assert bad not in err, f"{bad!r} on stderr:\n{err}"
    if expect_out is not None:
        assert out.split() == expect_out.split(), out


# ------------------------------------------------------------------- fork
def test_fork_child_that_does_nothing_exits():
    # The parent ran layers inline and through the queue (its executor thread exists) and has a submit of a
    # deferring layer pending; the child only exits, through finalization and static destructors.
    assert_clean(*run('''
        l0, l1 = layer(0, d=1), layer(1)
        x, ids, w = inputs()
        ref = l1.forward(x, ids, w)
        l1.submit_forward(x, ids, w); l1.sync_forward(x)
        l0.submit_forward(x, ids, w)
        codes = [in_child(lambda: True) for _ in range(3)]
        l0.sync_forward(x)
        l1.forward(x, ids, w)                    # takes l0's deferred experts
        print(codes, np.array_equal(l1.forward(x, ids, w), ref))
    '''), expect_out="[0, 0, 0] True")


def test_fork_child_forwards_on_an_existing_wrapper():
    assert_clean(*run('''
        wr = layer(0)
        x, ids, w = inputs(T=9)
        ref = wr.forward(x, ids, w)
        def child():
            pool = _pool.current_pool()
            absent = pool.live_workers            # the parent's worker is not in the child
            same = all(np.array_equal(wr.forward(x, ids, w), ref) for _ in range(3))
            grandchild = in_child(lambda: np.array_equal(wr.forward(x, ids, w), ref))
            return absent == 0 and pool.live_workers == 1 and same and grandchild == 0
        print(in_child(child), kt_kernel._kt_kernel._fork_generation(), np.array_equal(wr.forward(x, ids, w), ref))
    '''), expect_out="0 0 True")


def test_fork_child_submits_and_syncs():
    # Deferral on: layer 0's deferred experts land in layer 1's output, in the parent as in the child; a
    # submit pending at the moment of the fork is synced on both sides.
    assert_clean(*run('''
        l0, l1 = layer(0, d=1), layer(1)
        x, ids, w = inputs(T=7)
        def step():
            l0.submit_forward(x, ids, w); a = l0.sync_forward(x)
            l1.submit_forward(a, ids, w); return a, l1.sync_forward(x)
        ref = step()
        l0.submit_forward(x, ids, w)             # pending across the fork
        def child():
            a = l0.sync_forward(x)
            l1.submit_forward(a, ids, w); b = l1.sync_forward(x)
            again = step()
            return np.array_equal(a, ref[0]) and np.array_equal(b, ref[1]) and all(
                np.array_equal(u, v) for u, v in zip(again, ref))
        code = in_child(child)
        a = l0.sync_forward(x); l1.submit_forward(a, ids, w); b = l1.sync_forward(x)
        print(code, np.array_equal(a, ref[0]) and np.array_equal(b, ref[1]))
    '''), expect_out="0 True")


def test_fork_child_creates_new_wrappers_and_pools():
    assert_clean(*run('''
        wr = layer(0)
        x, ids, w = inputs(T=6)
        ref = wr.forward(x, ids, w)
        def child():
            same = np.array_equal(layer(0).forward(x, ids, w), ref)     # the inherited pool
            _pool.reset_pool_for_tests()
            fresh = np.array_equal(layer(0, threads=3).forward(x, ids, w), ref)  # a pool made in the child
            return same and fresh and _pool.current_pool().live_workers == 2
        print(in_child(child))
    '''), expect_out="0")


def test_multiprocessing_pool_with_the_fork_start_method():
    assert_clean(*run('''
        import multiprocessing as mp
        wr = layer(0)
        def fwd(seed):
            signal.alarm(60)
            x, ids, w = inputs(T=4, seed=seed)
            return wr.forward(x, ids, w)
        seeds = [1, 2, 3, 4, 5, 6]
        refs = [fwd(s) for s in seeds]
        with mp.get_context("fork").Pool(2) as p:
            got = p.map(fwd, seeds)
        print(all(np.array_equal(a, b) for a, b in zip(got, refs)), np.array_equal(fwd(1), refs[0]))
    '''), expect_out="True True")


def test_fork_while_another_thread_forwards():
    # A thread forwards without pause while the main thread forks: each fork lands at some point of its
    # calls (between them, in the Python part, inside the native part); the child uses that same
    # wrapper, and another one; the parent's thread never sees a wrong result.
    assert_clean(*run('''
        busy, other = layer(0), layer(1)
        x, ids, w = inputs(T=16)
        ref_busy, ref_other = busy.forward(x, ids, w), other.forward(x, ids, w)
        stop, wrong, calls = threading.Event(), [], [0]
        def loop():
            while not stop.is_set():
                if not np.array_equal(busy.forward(x, ids, w), ref_busy):
                    wrong.append(1)
                calls[0] += 1
        t = threading.Thread(target=loop); t.start()
        def child():
            return (np.array_equal(busy.forward(x, ids, w), ref_busy)
                    and np.array_equal(other.forward(x, ids, w), ref_other))
        codes = []
        for i in range(8):
            while calls[0] < i + 1:
                time.sleep(0.0005)
            codes.append(in_child(child))
        stop.set(); t.join()
        print(codes, len(wrong))
    '''), expect_out="[0, 0, 0, 0, 0, 0, 0, 0] 0")


def test_fork_while_another_thread_holds_a_wrapper_call():
    # The rule, made deterministic: a thread of the parent is inside a call of the wrapper (holds its
    # lock) at the fork. In the child that thread does not exist; the wrapper still works there.
    assert_clean(*run('''
        wr = layer(0)
        x, ids, w = inputs()
        ref = wr.forward(x, ids, w)
        wr.submit_forward(x, ids, w)             # its call state: a submit the thread would sync
        inside, leave = threading.Event(), threading.Event()
        def holder():
            with wr._lock:
                inside.set(); leave.wait()
        t = threading.Thread(target=holder); t.start(); inside.wait()
        code = in_child(lambda: np.array_equal(wr.forward(x, ids, w), ref)
                        and np.array_equal(wr.forward(x, ids, w), ref))
        leave.set(); t.join()
        print(code, np.array_equal(wr.sync_forward(x), ref), np.array_equal(wr.forward(x, ids, w), ref))
    '''), expect_out="0 True True")


def test_fork_child_forwards_torch_tensors():
    # A server's shape: torch tensors, torch ops in the parent. (torch's own CPU ops in such a child hang
    # in its OpenMP pool, with or without kt_kernel: PyTorch's limitation, not exercised here.)
    pytest.importorskip("torch")
    assert_clean(*run('''
        import torch
        wr = layer(0)
        wr.gpu_experts_mask = torch.zeros(E, dtype=torch.bool)  # what a server's wrapper holds
        x, ids, w = (torch.from_numpy(a) for a in inputs(T=8))
        ref = wr.forward(x, ids, w)
        torch.mm(torch.randn(128, 128), torch.randn(128, 128))
        print(in_child(lambda: torch.equal(wr.forward(x, ids, w), ref) and torch.equal(wr.forward(x, ids, w), ref)))
    '''), expect_out="0")


# ------------------------------------------------------------------- exit
@pytest.mark.parametrize("case", ["one_pending", "consumer_pending", "two_pending"])
def test_exit_with_submits_pending(case):
    rc, out, err = run(f'''
        case = {case!r}
        l0, l1 = layer(0, d=1), layer(1)
        x, ids, w = inputs(T=32)
        l0.submit_forward(x, ids, w)
        if case != "one_pending":
            if case == "consumer_pending":
                l0.sync_forward(x)
            l1.submit_forward(x, ids, w)
        print("exiting")
    ''')
    assert_clean(rc, out, err, expect_out="exiting")


@pytest.mark.parametrize("mode", ["forward", "forward_deferred", "submit_sync_deferred"])
def test_exit_while_a_daemon_thread_is_inside_the_library(mode):
    rc, out, err = run(f'''
        mode = {mode!r}
        # Deferral on: layer 0's deferred experts go to layer 1, which must come next, so one thread.
        d = None if mode == "forward" else 1
        l0, l1 = layer(0, d=d), layer(1)
        x, ids, w = inputs(T=48)
        running = threading.Event()
        def loop():
            while True:
                if mode.startswith("forward"):
                    a = l0.forward(x, ids, w)
                    if d:
                        l1.forward(a, ids, w)
                else:
                    l0.submit_forward(x, ids, w); a = l0.sync_forward(x)
                    l1.submit_forward(a, ids, w); l1.sync_forward(x)
                running.set()
        for _ in range(2 if d is None else 1):
            threading.Thread(target=loop, daemon=True).start()
        running.wait()
        print("exiting")
    ''')
    assert_clean(rc, out, err, expect_out="exiting")


@pytest.mark.parametrize("load", [False, True])
def test_exit_right_after_creating_a_wrapper(load):
    assert_clean(*run(f'''
        wr = layer(0, load={load})
        print("exiting")
    '''), expect_out="exiting")


def test_sys_exit_from_a_thread_while_forward_runs():
    # sys.exit in a thread ends that thread only; then the main thread exits while a daemon thread is
    # still forwarding, and a last one calls sys.exit from inside its loop.
    assert_clean(*run('''
        wr = layer(0)
        x, ids, w = inputs(T=32)
        running = threading.Event()
        def loop():
            while True:
                wr.forward(x, ids, w); running.set()
        def leaver():
            wr.forward(x, ids, w)
            sys.exit(5)
        threading.Thread(target=loop, daemon=True).start()
        running.wait()
        t = threading.Thread(target=leaver); t.start(); t.join()
        threading.Thread(target=lambda: [wr.forward(x, ids, w) for _ in range(3)] and sys.exit(1), daemon=True).start()
        print("exiting")
        sys.exit(0)
    '''), expect_out="exiting")


def test_exit_drain_reports_done():
    # The atexit function's native half waits for queued work and says so; other threads that would enter
    # the library after it are parked, the thread that called it is not.
    assert_clean(*run('''
        l0, l1 = layer(0, d=1), layer(1)
        x, ids, w = inputs()
        l0.submit_forward(x, ids, w)
        print(kt_kernel._kt_kernel._prepare_exit(5.0))
        a = l0.sync_forward(x)
        print(l1.forward(a, ids, w).shape == a.shape)
    '''), expect_out="True True")


def test_bindings_release_the_gil_only_through_gil_release():
    # py::gil_scoped_release would bring back the abort at exit (its destructor is where CPython's
    # pthread_exit of a daemon thread unwinds from); src/bindings/gil_release.h says why.
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src", "bindings")
    if not os.path.isdir(src):
        pytest.skip("source tree not available")
    offenders = []
    for name in sorted(os.listdir(src)):
        if name.endswith((".cpp", ".h")) and name != "gil_release.h":
            with open(os.path.join(src, name)) as f:
                if "gil_scoped_release" in f.read():
                    offenders.append(name)
    assert not offenders, f"use kt::GilRelease instead of py::gil_scoped_release in {offenders}"
