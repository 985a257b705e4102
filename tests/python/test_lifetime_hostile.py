"""Calls in flight, object lifetimes, interrupts and reloads (issue 23): two layers in flight never share
staging, a deferred part never lands in an unrelated call, a wrapper deleted with work pending waits for it,
a KeyboardInterrupt anywhere leaves the layer usable, and a reload is ordered against in-flight work.

Cases that could crash or hang the process run in a subprocess with a timeout, so a crash fails one test."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper

E, K, H, I = 8, 2, 128, 256
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def weights():
    return [make_weights(E, H, I, seed=s) for s in (11, 12, 13)]


def _layer(weights, idx, d=0, which=None, method="AMXINT8"):
    wr = make_wrapper(E, K, H, I, method, max_deferred_experts_per_token=d)
    wr.layer_idx = idx
    wr.load_weights_from_tensors(*weights[idx % 3 if which is None else which])
    return wr


def _ref(wr, x, ids, w):
    return np.array(wr.forward(x, ids, w))


def _run(code: str, timeout: int = 120, stream: bool = False):
    """Runs code in a fresh interpreter (tests/python on sys.path); returns the CompletedProcess."""
    env = dict(os.environ)
    prelude = f"import sys; sys.path.insert(0, {HERE!r})\n"
    if stream:
        prelude += "import fake_cuda; FAKE = fake_cuda.get()\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _assert_clean(out, marker="ok"):
    assert out.returncode == 0, f"rc={out.returncode}\nstdout:{out.stdout[-2000:]}\nstderr:{out.stderr[-4000:]}"
    assert marker in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    for bad in ("terminate called", "Abort", "Segmentation", "corrupted", "AddressSanitizer"):
        assert bad not in out.stderr, out.stderr[-4000:]


def _fake_or_skip():
    import fake_cuda

    f = fake_cuda.get()
    if kt_kernel._kt_kernel.cuda_runtime_loaded() and kt_kernel._kt_kernel.cuda_runtime_path() != f.path:
        pytest.skip("a real CUDA runtime was loaded earlier in this process")
    return f


# ------------------------------------------------------------------ staging of calls in flight
@pytest.mark.parametrize("stream", [0, 0x7101])
def test_two_layers_of_one_parity_in_flight_keep_their_inputs(weights, stream):
    """submit(layer 0), submit(layer 2), sync(layer 0): each result is its own layer on its own inputs
    (layers of one layer_idx parity shared one staging set before)."""
    fake = _fake_or_skip() if stream else None
    l0, l2 = _layer(weights, 0), _layer(weights, 2)
    bad = 0
    for rep in range(20):
        a, b = make_inputs(9, H, E, K, seed=100 + rep), make_inputs(9, H, E, K, seed=200 + rep)
        r0, r2 = _ref(l0, *a), _ref(l2, *b)
        l0.submit_forward(*a, stream)
        l2.submit_forward(*b, stream)
        y0 = l0.sync_forward(a[0], stream)
        y2 = l2.sync_forward(b[0], stream)
        if stream:
            fake.wait_idle(stream)
        bad += int(not np.array_equal(np.array(y0), r0)) + int(not np.array_equal(np.array(y2), r2))
    assert bad == 0, f"{bad} of 40 results wrong"


def test_forward_of_another_layer_between_submit_and_sync(weights):
    la, lb = _layer(weights, 0), _layer(weights, 2)
    a, b = make_inputs(7, H, E, K, seed=1), make_inputs(7, H, E, K, seed=2)
    ra, rb = _ref(la, *a), _ref(lb, *b)
    for _ in range(5):
        la.submit_forward(*a)
        yb = np.array(lb.forward(*b))
        ya = np.array(la.sync_forward(a[0]))
        assert np.array_equal(ya, ra) and np.array_equal(yb, rb)


def test_many_calls_in_flight_then_synced_in_reverse(weights):
    layers = [_layer(weights, i) for i in range(6)]
    ins = [make_inputs(5, H, E, K, seed=300 + i) for i in range(6)]
    refs = [_ref(l, *x) for l, x in zip(layers, ins)]
    for l, x in zip(layers, ins):
        l.submit_forward(*x)
    outs = [np.array(l.sync_forward(x[0])) for l, x in reversed(list(zip(layers, ins)))][::-1]
    for got, ref in zip(outs, refs):
        assert np.array_equal(got, ref)


def test_sequential_layers_reuse_one_staging_set(weights):
    """One set serves any number of layers called one after the other; calls in flight take more, and
    those come back to the pool."""
    layers = [_layer(weights, i) for i in range(5)]
    x = make_inputs(4, H, E, K, seed=3)
    for l in layers:
        l.forward(*x)
    n0 = kt_kernel._kt_kernel.AsyncLayer.num_staging_sets()
    for _ in range(3):
        for l in layers:
            l.forward(*x)
    assert kt_kernel._kt_kernel.AsyncLayer.num_staging_sets() == n0
    for l in layers:
        l.submit_forward(*x)
    for l in layers:
        l.sync_forward(x[0])
    n1 = kt_kernel._kt_kernel.AsyncLayer.num_staging_sets()
    for _ in range(3):
        for l in layers:
            l.submit_forward(*x)
        for l in layers:
            l.sync_forward(x[0])
    assert kt_kernel._kt_kernel.AsyncLayer.num_staging_sets() == n1  # reused, not grown per round


# ------------------------------------------------------------------ deferral never leaks
def test_deferral_on_the_last_layer_does_not_leak_into_the_next_call(weights):
    """A deferring layer with no later consumer: the next, unrelated call raises naming both layers and
    leaves nothing behind; it is never silently changed."""
    l5 = _layer(weights, 5, d=1)
    x = make_inputs(6, H, E, K, seed=4)
    x2 = make_inputs(6, H, E, K, seed=5)
    other = _layer(weights, 0)
    ref_other = _ref(other, *x2)
    l5.forward(*x)  # defers its lowest expert per token; nothing consumes it
    with pytest.raises(RuntimeError, match=r"deferred experts of layer 5.*layer 0 is not after layer 5"):
        other.forward(*x2)
    assert np.array_equal(_ref(other, *x2), ref_other)  # the next call is clean
    l5.forward(*x)
    with pytest.raises(RuntimeError, match="layer 5 is not after layer 5"):
        l5.forward(*x)  # a repeated call of the same layer is not its consumer either
    assert np.array_equal(_ref(other, *x2), ref_other)


def test_deferral_consumer_with_another_token_count_is_refused_at_submit(weights):
    l0, l1 = _layer(weights, 0, d=1), _layer(weights, 1)
    a, b = make_inputs(6, H, E, K, seed=6), make_inputs(4, H, E, K, seed=7)
    ref1 = _ref(_layer(weights, 1), *b)
    l0.forward(*a)
    with pytest.raises(RuntimeError, match="layer 1 runs 4 tokens, layer 0 ran 6"):
        l1.submit_forward(*b)
    assert not l1._async.pending  # nothing was queued
    assert np.array_equal(np.array(l1.forward(*b)), ref1)


def test_deferral_chain_over_non_consecutive_layers_is_conserved(weights):
    """MoE layers 1, 4, 9 (dense layers between them): each consumer is the next MoE layer submitted."""
    x = make_inputs(8, H, E, K, seed=8)
    ds = (2, 1, 0)
    deferring = [_layer(weights, i, d=d, which=j) for j, (i, d) in enumerate(zip((1, 4, 9), ds))]
    plain = [_layer(weights, i, which=j) for j, i in enumerate((1, 4, 9))]
    got = sum(np.array(l.forward(*x)) for l in deferring)
    ref = sum(_ref(p, *x) for p in plain)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ lifetimes
_DELETE_PENDING = """
    import gc
    import numpy as np
    from conftest import make_inputs, make_weights, make_wrapper
    E, K, H, I = 8, 2, 128, 256
    S = {stream}
    W = [make_weights(E, H, I, seed=s) for s in (1, 2)]
    x = make_inputs(6, H, E, K, seed=3)

    def layer(idx, d):
        wr = make_wrapper(E, K, H, I, "AMXINT8", max_deferred_experts_per_token=d)
        wr.layer_idx = idx
        wr.load_weights_from_tensors(*W[idx % 2])
        return wr

    keeper = layer(1, 0)
    ref = np.array(keeper.forward(*x))
    keep = []
    for rep in range(40):
        wr = layer(0, rep % 2)
        wr.submit_forward(*x, S)
        del wr  # deleted between submit and sync: its destructor waits for the work
        gc.collect()
        try:
            keep.append(keeper.forward(*x, S))  # consumes the deferred part of the deleted layer, if any
            if S:
                FAKE.wait_idle(S)
        except RuntimeError as e:
            raise SystemExit("unexpected: %s" % e)
        for tmp in [layer(0, 0) for _ in range(2)]:  # later submits reuse the freed staging
            keep.append(tmp.forward(*x, S))  # a stream-mode output is written when the stream gets there
            del tmp
    if S:
        FAKE.wait_idle(S)
    assert np.array_equal(np.array(keeper.forward(*x)), ref)
    print("ok")
"""


@pytest.mark.parametrize("stream", [0, 0x7202])
def test_wrapper_deleted_between_submit_and_sync(stream):
    _assert_clean(_run(_DELETE_PENDING.format(stream=stream), stream=bool(stream)))


def test_wrapper_deleted_while_its_deferred_part_waits_for_a_consumer(weights):
    l0 = _layer(weights, 0, d=1)
    l1 = _layer(weights, 1)
    x = make_inputs(5, H, E, K, seed=9)
    plain0, plain1 = _layer(weights, 0), _layer(weights, 1)
    total = _ref(plain0, *x) + _ref(plain1, *x)
    y0 = np.array(l0.forward(*x))
    del l0
    import gc

    gc.collect()
    y1 = np.array(l1.forward(*x))  # still gets layer 0's deferred part: it lives in the staging set
    np.testing.assert_allclose(y0 + y1, total, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ interrupts
def test_interrupt_between_native_submit_and_record_leaves_the_layer_usable(weights, monkeypatch):
    """A KeyboardInterrupt right after the native submit returned (before Python recorded it): sync still
    returns the result, and the layer keeps working."""
    wr = _layer(weights, 0)
    x = make_inputs(5, H, E, K, seed=10)
    ref = _ref(wr, *x)
    nat = kt_kernel._async._native(wr)

    class Interrupting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def submit(self, *a):
            self.inner.submit(*a)
            raise KeyboardInterrupt

    wr._async = Interrupting(nat)
    with pytest.raises(KeyboardInterrupt):
        wr.submit_forward(*x)
    wr._async = nat
    assert nat.pending
    assert np.array_equal(np.array(wr.sync_forward(x[0])), ref)
    assert np.array_equal(np.array(wr.forward(*x)), ref)
    wr.submit_forward(*x)
    assert np.array_equal(np.array(wr.sync_forward(x[0])), ref)


def test_interrupted_forward_leaves_nothing_pending(weights):
    """forward() is one native call (submit + sync): an interrupt before or after it leaves no submit
    pending, so the next call works (before: every later call raised 'called twice')."""
    wr = _layer(weights, 0)
    x = make_inputs(5, H, E, K, seed=11)
    ref = _ref(wr, *x)
    orig = wr._mask_ptr

    def interrupt():
        raise KeyboardInterrupt

    wr._mask_ptr = interrupt
    with pytest.raises(KeyboardInterrupt):
        wr.forward(*x)
    wr._mask_ptr = orig
    assert not wr._async.pending
    assert np.array_equal(np.array(wr.forward(*x)), ref)


_SIGINT_STORM = """
    import signal, threading, time
    import numpy as np
    from conftest import make_inputs, make_weights, make_wrapper
    E, K, H, I = 8, 2, 64, 128
    W = [make_weights(E, H, I, seed=s) for s in (0, 1)]
    x = make_inputs(3, H, E, K, seed=2)
    refs = []
    for j in (0, 1):
        p = make_wrapper(E, K, H, I, "AMXINT8")
        p.load_weights_from_tensors(*W[j])
        refs.append(np.array(p.forward(*x)))
    wrs = []
    for idx, d in ((0, 1), (1, 0)):
        wr = make_wrapper(E, K, H, I, "AMXINT8", max_deferred_experts_per_token=d)
        wr.layer_idx = idx
        wr.load_weights_from_tensors(*W[idx])
        wrs.append(wr)
    stop = False
    main = threading.main_thread().ident
    armed = False

    def on_sigint(sig, frame):
        # Raises at any bytecode of the library calls below (armed), once per arming, so the handlers of
        # this script are never interrupted themselves.
        global armed
        if armed:
            armed = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    def storm():
        while not stop:
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.0002)

    t = threading.Thread(target=storm, daemon=True)
    t.start()
    interrupts = refused = 0
    for i in range(3000):
        wr = wrs[i % 2]
        try:
            armed = True
            if wr._async is not None and wr._async.pending:
                wr.sync_forward(x[0])  # a pair interrupted between its submit and its sync: finish it
            if i % 3 == 0:
                wr.forward(*x)
            else:
                wr.submit_forward(*x)
                wr.sync_forward(x[0])
            armed = False
        except KeyboardInterrupt:
            interrupts += 1
        except RuntimeError as e:
            armed = False
            if "deferred experts" not in str(e):  # the only refusal allowed: a deferral left unconsumed
                raise
            refused += 1
    stop = True
    t.join()
    for wr in wrs:
        if wr._async.pending:
            wr.sync_forward(x[0])
        wr.max_deferred_experts_per_token = 0
    try:
        wrs[0].forward(*x)
    except RuntimeError as e:  # layer 0's last deferred part, if its consumer was interrupted
        assert "deferred experts of layer 0" in str(e), e
    for wr, ref in zip(wrs, refs):
        assert np.array_equal(np.array(wr.forward(*x)), ref)
    assert interrupts > 0
    print("ok", interrupts, refused)
"""


def test_sigint_storm_over_submit_sync_pairs():
    out = _run(_SIGINT_STORM, timeout=300)
    _assert_clean(out)


# ------------------------------------------------------------------ reloads
def test_reload_with_a_submit_pending_is_refused_and_loses_nothing(weights):
    wr = _layer(weights, 0)
    x = make_inputs(5, H, E, K, seed=12)
    ref = _ref(wr, *x)
    wr.submit_forward(*x)
    with pytest.raises(RuntimeError, match="load_weights_from_tensors called while a submit_forward is pending"):
        wr.load_weights_from_tensors(*weights[1])
    assert np.array_equal(np.array(wr.sync_forward(x[0])), ref)  # the pending call is intact
    wr.load_weights_from_tensors(*weights[1])
    assert np.array_equal(np.array(wr.forward(*x)), _ref(_layer(weights, 0, which=1), *x))


def test_reload_waits_for_stream_work_still_queued(weights):
    """Stream mode: sync_forward returned but the stream has not run the task yet; a reload waits for it,
    so that call computes on the old weights."""
    fake = _fake_or_skip()
    S = 0x7303
    wr = _layer(weights, 0)
    x = make_inputs(5, H, E, K, seed=13)
    ref_old = _ref(wr, *x)
    busy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: time.sleep(0.3))  # the GPU is still busy
    launch = fake.lib.cudaLaunchHostFunc
    launch.argtypes, launch.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    assert launch(S, ctypes.cast(busy, ctypes.c_void_p), None) == 0
    wr.submit_forward(*x, S)
    y = wr.sync_forward(x[0], S)
    wr.load_weights_from_tensors(*weights[1])  # drains the layer first: that call runs on the old weights
    fake.wait_idle(S)
    assert np.array_equal(np.array(y), ref_old)
    y_new = wr.forward(*x, S)
    fake.wait_idle(S)
    assert np.array_equal(np.array(y_new), _ref(_layer(weights, 0, which=1), *x))


def test_reload_concurrent_with_forward_on_another_thread(weights):
    """One thread forwards in a loop while another reloads between two weight sets: every result is
    exactly one of the two layers' (never a mix), and nothing raises."""
    wr = _layer(weights, 0)
    x = make_inputs(6, H, E, K, seed=14)
    refs = [_ref(_layer(weights, 0, which=j), *x) for j in (0, 1)]
    errors, outs, done = [], [], threading.Event()

    def forwarder():
        try:
            while not done.is_set():
                outs.append(np.array(wr.forward(*x)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=forwarder)
    t.start()
    try:
        for i in range(12):
            wr.load_weights_from_tensors(*weights[(i + 1) % 2])
    finally:
        done.set()
        t.join(60)
    assert not errors, errors
    assert outs
    mixed = [o for o in outs if not any(np.array_equal(o, r) for r in refs)]
    assert not mixed, f"{len(mixed)} of {len(outs)} results match neither weight set"


def _hold_stream_busy(fake, S, seconds=0.3):
    """Queues a host function that sleeps on stream S (the GPU still busy with earlier work); returns the
    callback object, which must stay alive until the stream has run it."""
    busy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: time.sleep(seconds))
    launch = fake.lib.cudaLaunchHostFunc
    launch.argtypes, launch.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    assert launch(S, ctypes.cast(busy, ctypes.c_void_p), None) == 0
    return busy


@pytest.mark.parametrize("what", ["mask", "counts"])
def test_replacing_what_queued_work_reads_waits_for_it(weights, what):
    """Assigning another gpu_experts_mask, or turning activation counting off, while a stream-mode call
    has not run yet: the assignment waits for the call (which reads the old object through its address),
    so the call completes before the old object can be freed."""
    fake = _fake_or_skip()
    S = 0x7404
    wr = _layer(weights, 0)
    wr.enable_activation_counting(True)
    x = make_inputs(5, H, E, K, seed=15)
    ref = _ref(wr, *x)
    busy = _hold_stream_busy(fake, S)
    wr.submit_forward(*x, S)
    y = wr.sync_forward(x[0], S)
    if what == "mask":
        new = wr.gpu_experts_mask.clone() if hasattr(wr.gpu_experts_mask, "clone") else wr.gpu_experts_mask.copy()
        new[:] = True
        wr.gpu_experts_mask = new
    else:
        wr.enable_activation_counting(False)
    assert np.array_equal(np.array(y), ref), "the assignment returned before the queued call ran"
    fake.wait_idle(S)
    del busy
