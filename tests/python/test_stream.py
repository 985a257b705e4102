"""CUDA stream ordering (INTERFACE.md "Ordering with a CUDA stream"), proven
with a stand-in CUDA runtime (fake_cuda.py) whose streams are threads that run
copies and host functions in order and log them. "Device" tensors are host
arrays passed with a nonzero stream: the same code path as CUDA tensors, less
the torch glue.

What is shown: submit/sync return before any stream work runs; the CPU task
reads its inputs only after the copies that precede it on the stream (and not
the values a later kernel writes); the output is complete before the stream
moves past sync; a captured submit+sync allocates nothing, never synchronises,
and replays correctly with new inputs and a token count read at run time;
CPU-only use never loads a CUDA runtime."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fake_cuda
import kt_kernel
from conftest import make_inputs, make_weights, make_wrapper
from fake_cuda import (EV_HOSTFN_BEGIN, EV_HOSTFN_END, EV_RUN_MEMCPY, OP_HOSTFN, OP_MEMCPY)

E, K, H, I = 8, 2, 256, 512
T = 48


@pytest.fixture(scope="module")
def fake():
    f = fake_cuda.get()
    if kt_kernel._kt_kernel.cuda_runtime_loaded() and kt_kernel._kt_kernel.cuda_runtime_path() != f.path:
        pytest.skip("a real CUDA runtime was loaded earlier in this process")
    assert kt_kernel._kt_kernel.cuda_runtime_path() == f.path
    return f


@pytest.fixture(scope="module")
def weights():
    return make_weights(E, H, I, seed=3)


def _wrapper(weights, layer_idx=0, **kw):
    wr = make_wrapper(E, K, H, I, "AMXINT8", **kw)
    wr.layer_idx = layer_idx
    wr.load_weights_from_tensors(*weights)
    return wr


def _cpu_result(wr, x, ids, w):
    return np.array(wr.forward(x, ids, w, 0))


def _device_like(a, fill):
    d = np.empty_like(a)
    d[...] = fill
    return d


def test_cpu_only_use_loads_no_cuda_runtime():
    code = textwrap.dedent("""
        import sys; sys.path.insert(0, %r)
        from conftest import make_inputs, make_weights, make_wrapper
        import kt_kernel
        wr = make_wrapper(4, 2, 64, 64, "BF16")
        wr.load_weights_from_tensors(*make_weights(4, 64, 64))
        x, ids, w = make_inputs(3, 64, 4, 2)
        wr.submit_forward(x, ids, w, 0); wr.sync_forward(x, 0)
        maps = open("/proc/self/maps").read()
        assert not kt_kernel._kt_kernel.cuda_runtime_loaded()
        assert "cudart" not in maps, "a CUDA runtime was mapped"
        print("ok")
    """ % (__import__("os").path.dirname(__file__),))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_stream_order_inputs_read_after_copies_output_complete_before_stream_continues(fake, weights):
    S = 0x5101
    wr = _wrapper(weights)
    x, ids, w = make_inputs(T, H, E, K, seed=11)
    ids = ids.astype(np.int32)
    expect = _cpu_result(wr, x, ids, w)
    # Device stand-ins hold garbage until a producing kernel, queued on the
    # stream before submit, writes the real inputs.
    x_dev, ids_dev, w_dev = _device_like(x, np.nan), _device_like(ids, 0), _device_like(w, np.nan)
    garbage_ids = np.full_like(ids, E - 1)
    snap = np.full((T, H), np.nan, np.float32)
    fake.hold(S, True)
    first = fake.log_size()
    try:
        fake.kernel_copy(S, x_dev, x)
        fake.kernel_copy(S, ids_dev, ids)
        fake.kernel_copy(S, w_dev, w)
        wr.submit_forward(x_dev, ids_dev, w_dev, S)
        fake.kernel_copy(S, ids_dev, garbage_ids)  # the caller overwrites topk_ids right after submit
        y = wr.sync_forward(x_dev, S)
        y_ptr = y.ctypes.data
        fake.kernel_copy(S, snap, y)  # the next kernel on the stream reads the output
        # Both calls returned while the stream was held: nothing ran yet.
        assert not [e for e in fake.events(first) if e[1] in (EV_RUN_MEMCPY, EV_HOSTFN_BEGIN)]
    finally:
        fake.hold(S, False)
    fake.wait_idle(S)
    assert np.array_equal(snap, expect), "the stream saw an incomplete or wrong output"
    assert np.array_equal(y, expect)
    ev = [e for e in fake.events(first) if e[2] == S]
    runs = [(e[0], e[1], e[3], e[4]) for e in ev if e[1] in (EV_RUN_MEMCPY, EV_HOSTFN_BEGIN, EV_HOSTFN_END)]

    def seq_of(kind, a=None, b=None):
        hits = [s for s, k, ea, eb in runs if k == kind and (a is None or ea == a) and (b is None or eb == b)]
        assert len(hits) == 1, (kind, a, b, hits)
        return hits[0]

    staged = [seq_of(EV_RUN_MEMCPY, b=src.ctypes.data) for src in (x_dev, ids_dev, w_dev)]
    produced = [seq_of(EV_RUN_MEMCPY, a=d.ctypes.data, b=s.ctypes.data) for d, s in ((x_dev, x), (ids_dev, ids))]
    overwrite = seq_of(EV_RUN_MEMCPY, a=ids_dev.ctypes.data, b=garbage_ids.ctypes.data)
    hostfns = [(s, k) for s, k, _, _ in runs if k in (EV_HOSTFN_BEGIN, EV_HOSTFN_END)]
    # enqueue (begin, end), wait (begin, end); before them, possibly a wait for the deferred task of the
    # staging set's previous user (left by an earlier test)
    assert len(hostfns) in (4, 6), hostfns
    enqueue_begin, wait_end = hostfns[-4][0], hostfns[-1][0]
    out_copy = seq_of(EV_RUN_MEMCPY, a=y_ptr)
    snap_copy = seq_of(EV_RUN_MEMCPY, a=snap.ctypes.data)
    assert max(produced) < min(staged)          # staging copies follow the producing kernels
    assert max(staged) < enqueue_begin          # the task is queued only after its inputs are staged
    assert enqueue_begin < overwrite            # the later overwrite is ordered after staging
    assert wait_end < out_copy < snap_copy      # the stream waits for the task, then copies the output


def test_graph_capture_allocates_nothing_and_replays(fake, weights):
    S = 0x5202
    KT = kt_kernel.KTMoEWrapper
    KT.set_capture_batch_sizes([T])
    try:
        wr = _wrapper(weights)
        x, ids, w = make_inputs(T, H, E, K, seed=21)
        x_dev, ids_dev, w_dev = x.copy(), ids.copy(), w.copy()
        count_dev = np.array([T], np.int64)  # the token count, a device scalar in a real server
        # Warm-up (outside capture): staging and output buffers come into being here.
        wr.submit_forward(x_dev, ids_dev, w_dev, S, num_tokens=count_dev)
        y_warm = wr.sync_forward(x_dev, S)
        fake.wait_idle(S)
        allocs, violations = fake.allocs, fake.violations
        first = fake.log_size()
        fake.begin_capture(S)
        wr.submit_forward(x_dev, ids_dev, w_dev, S, num_tokens=count_dev)
        y = wr.sync_forward(x_dev, S)
        ops = fake.end_capture(S)
        assert fake.allocs == allocs and fake.violations == violations, "allocation or host sync during capture"
        assert y is y_warm and y.ctypes.data == y_warm.ctypes.data
        assert ops == [OP_MEMCPY] * 4 + [OP_HOSTFN, OP_HOSTFN, OP_MEMCPY], ops
        assert not [e for e in fake.events(first) if e[1] == EV_RUN_MEMCPY], "captured work ran during capture"
        for seed, n in ((31, T), (32, T), (33, 5)):
            xs, ids_s, ws = make_inputs(T, H, E, K, seed=seed)
            x_dev[...], ids_dev[...], w_dev[...] = xs, ids_s, ws
            count_dev[0] = n
            y[...] = np.nan
            fake.replay(S)
            fake.wait_idle(S)
            ref = _cpu_result(wr, xs[:n], ids_s[:n], ws[:n])
            assert np.array_equal(y[:n], ref), f"replay with {n} tokens"
            assert not y[n:].any(), "rows past the run-time token count must be zero"
        assert fake.allocs == allocs
    finally:
        KT.clear_buffer_cache()
        KT.set_capture_batch_sizes([])


def test_stream_mode_torch_cpu_tensors_keep_dtype(fake, weights):
    torch = pytest.importorskip("torch")
    S = 0x5303
    wr = _wrapper(weights)
    x, ids, w = make_inputs(7, H, E, K, seed=41)
    xt = torch.from_numpy(x).to(torch.bfloat16)
    ref = wr.forward(xt, torch.from_numpy(ids), torch.from_numpy(w), 0)
    y = wr.forward(xt, torch.from_numpy(ids), torch.from_numpy(w), S)
    fake.wait_idle(S)
    assert y.dtype == torch.bfloat16 and y.shape == (7, H)
    assert torch.equal(y, ref)


def test_many_layers_one_stream_in_order(fake, weights):
    """Ten layer calls (three layers, each called again before the stream ran its previous call) queued back to
    back on one stream, each reading the previous one's output (as a
    model does): the host never waits, the results equal the CPU path's."""
    S = 0x5404
    layers = [_wrapper(weights, layer_idx=i) for i in range(3)]
    x, ids, w = make_inputs(4, H, E, K, seed=51)
    cur, outs, keep = x.copy(), [], []  # keep: host stand-ins must outlive the stream work that uses them
    fake.hold(S, True)
    try:
        for i in range(10):
            wr = layers[i % 3]
            wr.submit_forward(cur, ids, w, S)
            y = wr.sync_forward(cur, S)
            nxt = np.empty_like(y)
            keep += [y, cur]
            fake.kernel_copy(S, nxt, y)  # the next layer's input is this layer's output
            outs.append(nxt)
            cur = nxt
    finally:
        fake.hold(S, False)
    fake.wait_idle(S)
    cur = x.copy()
    for i in range(10):
        cur = _cpu_result(layers[i % 3], cur, ids, w)
        assert np.array_equal(outs[i], cur), i


def test_staging_is_shared_by_layers(fake, weights):
    """Six layers, one capture size, called one after the other: one staging set (taken by each call and
    given back by its sync) plus a small token-count field per layer are allocated, not one set per layer;
    results stay exact."""
    S = 0x5505
    KT = kt_kernel.KTMoEWrapper
    KT.set_capture_batch_sizes([5])
    try:
        layers = [_wrapper(weights, layer_idx=i) for i in range(6)]
        x, ids, w = make_inputs(5, H, E, K, seed=61)
        before = fake.allocs
        ys = [l.forward(x, ids, w, S) for l in layers]
        fake.wait_idle(S)
        assert fake.allocs - before == 4 + 6, fake.allocs - before  # (x, ids, w, y) + 6 counts
        for l, y in zip(layers, ys):
            assert np.array_equal(y, _cpu_result(l, x, ids, w))
        before = fake.allocs
        for step in range(3):  # steady state: nothing more
            for l in layers:
                l.forward(x, ids, w, S)
        fake.wait_idle(S)
        assert fake.allocs == before
    finally:
        KT.clear_buffer_cache()
        KT.set_capture_batch_sizes([])
