"""Hostile configurations: every sub-pool count and NUMA choice gives the right
answer or a clear error, sizes are checked before any arithmetic, every
integer argument is range-checked under its own name, and the default
gpu_experts_mask is a torch tensor whenever torch is installed.

Constructor cases that could spawn billions of threads or allocate a wrapped
size run in a child process with a timeout, so a regression fails a test
rather than the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kt_kernel
from conftest import make_inputs, make_weights
from reference import (moe_reference, quant_aware_intermediate, quant_aware_output, rel_fro_err, rel_max_err,
                       unpack_layer)

PY_DIR = os.path.dirname(os.path.dirname(kt_kernel.__file__))
QUANT_AWARE_TOL = 1e-5  # as test_accuracy.py: float32 rounding only
BUDGET = {"BF16": 0.02, "AMXINT8": 0.06, "AMXINT4": 0.30}
SLICE_ALIGN = 128  # moe_layer.cpp kSliceAlign


def _child(code: str, block_torch: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter importing this checkout's kt_kernel."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PY_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KT_KERNEL_BACKEND", None)
    prelude = "import sys\nsys.modules['torch'] = None\n" if block_torch else ""
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _wrapper(E, k, H, I, method, threads, pools, numa_nodes="same", **kw):
    nodes = {} if numa_nodes is None else {"numa_nodes": [0] * pools if numa_nodes == "same" else numa_nodes}
    return kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                                  moe_intermediate_size=I, cpuinfer_threads=threads, threadpool_count=pools,
                                  method=method, **nodes, **kw)


# ---------------------------------------------------------------- case 1: slices
# Widths around the 128-column slice unit: one unit (every extra sub-pool would
# get no columns), two, three, and widths that end inside a unit.
SLICE_WIDTHS = [128, 256, 384, 160, 40]
SLICE_FORMATS = [
    pytest.param("BF16", {}, id="bf16"),
    pytest.param("AMXINT8", {}, id="int8"),
    pytest.param("AMXINT4", {"group_size": 32}, id="int4-g32"),
]


@pytest.mark.parametrize("method,kw", SLICE_FORMATS)
@pytest.mark.parametrize("I", SLICE_WIDTHS)
@pytest.mark.parametrize("pools", [1, 2, 3])
def test_any_subpool_count_gives_the_reference_result(backend, fresh_pool, method, kw, I, pools):
    if kw.get("group_size") and I % kw["group_size"]:
        pytest.skip("width not a multiple of the INT4 group")
    E, k, H, T = 5, 2, 64, 9
    g, u, d = make_weights(E, H, I, seed=I + 7)
    x, ids, w = make_inputs(T, H, E, k, invalid_ids=True)
    wr = _wrapper(E, k, H, I, method, threads=max(2, pools), pools=pools, **kw)
    wr.load_weights_from_tensors(g, u, d)
    layer = wr._layer

    # Dirty the shared scratch with another call, poison the output: every element must be written.
    layer.set_capture(True)
    wr.forward(x[::-1].copy() * 3, ids, w)
    kt_kernel.KTMoEWrapper.set_capture_batch_sizes([T])
    try:
        wr.forward(x, ids, w)[:] = np.nan
        y = np.array(wr.forward(x, ids, w))
    finally:
        kt_kernel.KTMoEWrapper.set_capture_batch_sizes([])
    assert kt_kernel.last_used_backend() == backend
    assert np.isfinite(y).all()
    assert rel_fro_err(y, moe_reference(x, ids, w, g, u, d)) <= BUDGET[method]
    weights = unpack_layer(layer, E)
    h = layer.captured_intermediate()
    h_ref = quant_aware_intermediate(x, ids, layer, wr.scheme, E, weights)
    valid = ~np.isnan(h_ref)
    assert np.array_equal(np.isnan(h), ~valid)
    assert rel_max_err(h[valid], h_ref[valid]) <= QUANT_AWARE_TOL
    assert rel_max_err(y, quant_aware_output(h, ids, w, wr.scheme, E, weights)) <= QUANT_AWARE_TOL

    # The plan: no slice without columns, the slices tile [0, I) in 128-column units.
    units = -(-I // SLICE_ALIGN)
    assert layer.num_slices == min(pools, units)
    ranges = [layer.slice_range(s) for s in range(layer.num_slices)]
    assert ranges[0][0] == 0 and ranges[-1][1] == I
    assert all(b < e for b, e in ranges) and all(ranges[s][1] == ranges[s + 1][0] for s in range(len(ranges) - 1))
    assert all(b % SLICE_ALIGN == 0 for b, _ in ranges)
    with pytest.raises(IndexError):
        layer.slice_range(layer.num_slices)


def test_default_numa_nodes_are_existing_nodes(fresh_pool):
    """threadpool_count=2 without numa_nodes on a machine with fewer nodes: sub-pools on the existing
    nodes in turn (two on node 0 on one node), not on a node that does not exist."""
    available = sorted(n["node"] for n in kt_kernel.cpu_info()["numa_nodes"] if n["cpus"])
    wr = _wrapper(4, 2, 64, 256, "BF16", threads=2, pools=2, numa_nodes=None)
    assert wr.numa_nodes == [available[i % len(available)] for i in range(2)]
    assert list(wr._pool.numa_nodes) == wr.numa_nodes


def test_readme_example_shape_two_subpools(fresh_pool):
    """The README's constructor (threadpool_count=2, cpuinfer_threads=32, no numa_nodes, AMXINT4,
    H=2048, I=768) with fewer experts: within the INT4 budget of the float64 MoE, and equal to the
    quantisation-aware reference to float32 rounding."""
    E, k, H, I, T = 4, 4, 2048, 768, 3
    g, u, d = make_weights(E, H, I, seed=11)
    x, ids, w = make_inputs(T, H, E, k)
    wr = kt_kernel.KTMoEWrapper(layer_idx=3, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                                moe_intermediate_size=I, gpu_experts_mask=None, cpuinfer_threads=32,
                                threadpool_count=2, weight_path=None, chunked_prefill_size=8192, method="AMXINT4")
    wr.load_weights_from_tensors(g, u, d)
    assert wr._layer.num_slices == 2
    wr._layer.set_capture(True)
    y = np.array(wr.forward(x, ids, w))
    assert np.isfinite(y).all()
    assert rel_fro_err(y, moe_reference(x, ids, w, g, u, d)) <= BUDGET["AMXINT4"]
    h = wr._layer.captured_intermediate()
    assert rel_max_err(y, quant_aware_output(h, ids, w, wr.scheme, E, unpack_layer(wr._layer, E))) <= QUANT_AWARE_TOL


@pytest.mark.parametrize("nodes,match", [
    ([0, 7], r"numa_nodes\[1\] = 7: no such NUMA node with CPUs .*\(available: 0\b"),
    ([9], r"numa_nodes\[0\] = 9: no such NUMA node"),
])
def test_absent_numa_node_is_a_clear_error(fresh_pool, nodes, match):
    present = [n["node"] for n in kt_kernel.cpu_info()["numa_nodes"] if n["cpus"]]
    if 0 not in present or 7 in present or 9 in present:
        pytest.skip("needs node 0 present and nodes 7 and 9 absent")
    with pytest.raises(ValueError, match=match):
        _wrapper(4, 2, 64, 256, "BF16", threads=2, pools=len(nodes), numa_nodes=nodes)
    with pytest.raises(ValueError, match=match):  # the native pool checks as well
        kt_kernel._kt_kernel.ThreadPool(2, nodes, False)


# ---------------------------------------------------------- cases 2 and 3: sizes
_E, _K, _H, _I = 4, 2, 64, 128
_BASE = dict(layer_idx=0, num_experts=_E, num_experts_per_tok=_K, hidden_size=_H, moe_intermediate_size=_I,
             cpuinfer_threads=2, threadpool_count=1, method="BF16")

# (case id, constructor overrides as Python source, expected exception, message pattern)
CTOR_CASES = [
    # sizes whose products or paddings would wrap
    ("hidden-2^32-1", "hidden_size=2**32-1", "ValueError", "hidden_size"),
    ("inter-2^32-1", "moe_intermediate_size=2**32-1", "ValueError", "moe_intermediate_size"),
    ("product-too-big", "hidden_size=2**16, moe_intermediate_size=2**15", "ValueError",
     r"hidden_size x moe_intermediate_size"),
    # huge integers
    ("hidden-2^32", "hidden_size=2**32", "ValueError", "hidden_size"),
    ("experts-2^32+8", "num_experts=2**32+8", "ValueError", "num_experts"),
    ("experts-2^20", "num_experts=2**20", "ValueError", "num_experts: must be <= 65536"),
    ("topk-2^40", "num_experts_per_tok=2**40", "ValueError", "num_experts_per_tok"),
    ("threads-2^31", "cpuinfer_threads=2**31", "ValueError", "cpuinfer_threads"),
    ("threads-10^5", "cpuinfer_threads=10**5", "ValueError", "cpuinfer_threads: must be <= 4096"),
    ("layer-2^63", "layer_idx=2**63", "ValueError", "layer_idx"),
    ("layer-2^31", "layer_idx=2**31", "ValueError", "layer_idx"),
    ("numa-2^31", "numa_nodes=[2**31]", "ValueError", r"numa_nodes\[0\]"),
    ("group-2^32", "method='AMXINT4', group_size=2**32", "ValueError", "group_size"),
    ("prefill-2^64", "chunked_prefill_size=2**64", "ValueError", "chunked_prefill_size"),
    ("deferred-2^64", "max_deferred_experts_per_token=2**64", "ValueError", "max_deferred_experts_per_token"),
    ("gpu-experts-2^64", "num_gpu_experts=2**64", "ValueError", "num_gpu_experts"),
    # negative values
    ("layer-negative", "layer_idx=-1", "ValueError", "layer_idx"),
    ("threads-negative", "cpuinfer_threads=-2", "ValueError", "cpuinfer_threads"),
    ("pools-zero", "threadpool_count=0", "ValueError", "threadpool_count"),
    ("numa-negative", "numa_nodes=[-1]", "ValueError", r"numa_nodes\[0\]"),
    # bool and float where an int is meant
    ("hidden-bool", "hidden_size=True", "TypeError", "hidden_size"),
    ("layer-bool", "layer_idx=False", "TypeError", "layer_idx"),
    ("experts-np-bool", "num_experts=np.bool_(True)", "TypeError", "num_experts"),
    ("experts-float", "num_experts=8.0", "TypeError", "num_experts"),
    ("threads-float", "cpuinfer_threads=2.0", "TypeError", "cpuinfer_threads"),
    ("numa-float", "numa_nodes=[0.0]", "TypeError", r"numa_nodes\[0\]"),
    ("numa-str", "numa_nodes='0'", "TypeError", "numa_nodes"),
    ("group-float", "method='AMXINT4', group_size=32.0", "TypeError", "group_size"),
    # the other arguments
    ("limit-bool", "swiglu_limit=True, swiglu_alpha=1.0", "TypeError", "swiglu_limit"),
    ("alpha-inf", "swiglu_limit=1.0, swiglu_alpha=float('inf')", "ValueError", "swiglu_alpha"),
    ("limit-str", "swiglu_limit='1'", "TypeError", "swiglu_limit"),
    ("cpu-save-str", "cpu_save='no'", "TypeError", "cpu_save"),
    ("zero-point-str", "method='AMXINT4', group_size=32, zero_point='yes'", "TypeError", "zero_point"),
    ("weight-path-int", "weight_path=3", "TypeError", "weight_path"),
]

# The native constructors, called directly (kt_kernel._kt_kernel is importable).
NATIVE_CASES = [
    ("native-layer-experts-2^32+8", "N.MoeLayer(pool, 2**32+8, 2, 64, 128, 0, 0, 0.0, 0.0)", "ValueError",
     "num_experts"),
    ("native-layer-hidden-2^32-1", "N.MoeLayer(pool, 4, 2, 2**32-1, 128, 0, 0, 0.0, 0.0)", "ValueError",
     r"hidden_size x moe_intermediate_size"),
    ("native-layer-inter-2^32-1", "N.MoeLayer(pool, 4, 2, 64, 2**32-1, 0, 0, 0.0, 0.0)", "ValueError",
     r"hidden_size x moe_intermediate_size"),
    ("native-layer-experts-2^17", "N.MoeLayer(pool, 2**17, 2, 64, 128, 0, 0, 0.0, 0.0)", "ValueError",
     "num_experts must be at most 65536"),
    ("native-layer-bool", "N.MoeLayer(pool, True, 2, 64, 128, 0, 0, 0.0, 0.0)", "TypeError", "num_experts"),
    ("native-layer-float", "N.MoeLayer(pool, 4, 2, 64.0, 128, 0, 0, 0.0, 0.0)", "TypeError", "hidden_size"),
    ("native-layer-group-2^32", "N.MoeLayer(pool, 4, 2, 64, 128, 2, 2**32, 0.0, 0.0)", "ValueError", "group_size"),
    ("native-layer-scheme", "N.MoeLayer(pool, 4, 2, 64, 128, 99, 0, 0.0, 0.0)", "ValueError", "scheme"),
    ("native-pool-threads-2^31", "N.ThreadPool(2**31, [0], False)", "ValueError", "cpuinfer_threads"),
    ("native-pool-threads-bool", "N.ThreadPool(True, [0], False)", "TypeError", "cpuinfer_threads"),
    ("native-pool-node-2^31", "N.ThreadPool(2, [2**31], False)", "ValueError", r"numa_nodes\[0\]"),
    ("native-pool-node-float", "N.ThreadPool(2, [0.5], False)", "TypeError", r"numa_nodes\[0\]"),
    ("native-geometry-wraps", "N.packed_geometry(0, 2**32-1, 64, 0)", "ValueError", "invalid geometry"),
]

_CHILD_CODE = """
import json, re
import numpy as np
import kt_kernel
from kt_kernel import _kt_kernel as N
base = {base!r}
pool = N.ThreadPool(1, [0], False)
out = {{}}
for name, src, in_ctor in {cases!r}:
    try:
        if in_ctor:
            kw = dict(base)
            kw.update(eval("dict(" + src + ")"))
            kt_kernel.KTMoEWrapper(**kw)
        else:
            eval(src)
        out[name] = ["no error", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print("RESULTS" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hostile_results():
    """Every constructor case, each caught separately, in one child process (a crash or a hang there
    fails these tests instead of the test run)."""
    cases = [(n, s, True) for n, s, _, _ in CTOR_CASES] + [(n, s, False) for n, s, _, _ in NATIVE_CASES]
    r = _child(_CHILD_CODE.format(base=_BASE, cases=cases))
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


@pytest.mark.parametrize("name,src,exc,match", [pytest.param(*c, id=c[0]) for c in CTOR_CASES + NATIVE_CASES])
def test_hostile_integer_is_named(hostile_results, name, src, exc, match):
    import re

    got_exc, msg = hostile_results[name]
    assert got_exc == exc, f"{src}: {got_exc}: {msg}"
    assert re.search(match, msg), f"{src}: {msg!r} does not match {match!r}"
    assert "incompatible" not in msg and len(msg) < 400  # not pybind11's overload list


def test_numpy_integers_are_accepted(fresh_pool):
    wr = kt_kernel.KTMoEWrapper(layer_idx=np.int64(3), num_experts=np.uint16(_E), num_experts_per_tok=np.int32(_K),
                                hidden_size=np.int64(_H), moe_intermediate_size=np.uint64(_I),
                                cpuinfer_threads=np.int8(2), threadpool_count=np.int64(1),
                                numa_nodes=np.array([0]), chunked_prefill_size=np.int64(512),
                                num_gpu_experts=np.int64(1), max_deferred_experts_per_token=np.int64(1),
                                method="AMXINT4", group_size=np.int64(32), swiglu_limit=np.float32(0.0))
    for v in (wr.layer_idx, wr.num_experts, wr.hidden_size, wr.moe_intermediate_size, wr.group_size,
              wr.max_deferred_experts_per_token, *wr.numa_nodes):
        assert type(v) is int
    assert wr.layer_idx == 3 and wr.num_experts == _E and wr.numa_nodes == [0]


def test_huge_cuda_stream_is_named():
    wr = _wrapper(_E, _K, _H, _I, "BF16", threads=2, pools=1)
    wr.load_weights_from_tensors(*make_weights(_E, _H, _I))
    x, ids, w = make_inputs(2, _H, _E, _K)
    for call in (lambda: wr.forward(x, ids, w, cuda_stream=2**64),
                 lambda: wr.submit_forward(x, ids, w, cuda_stream=2**64)):
        with pytest.raises(ValueError, match="cuda_stream"):
            call()
    np.testing.assert_array_equal(wr.forward(x, ids, w), wr.forward(x, ids, w))  # still usable


def test_sizes_are_checked_before_the_mask_is_made():
    """num_experts is bounded before gpu_experts_mask (num_experts entries) is allocated."""
    r = _child("""
        import kt_kernel
        try:
            kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=2**40, num_experts_per_tok=2, hidden_size=64,
                                   moe_intermediate_size=64, cpuinfer_threads=1, method='BF16')
        except ValueError as e:
            print('ERR', e)
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ERR num_experts: must be <=")


# ---------------------------------------------------------------- case 4: mask
_MASK_CODE = """
import sys
import numpy as np
import kt_kernel
assert "torch" not in sys.modules, "import kt_kernel imported torch"
E, k, H, I = 6, 2, 64, 128
make = lambda **kw: kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                                           moe_intermediate_size=I, cpuinfer_threads=2, method='BF16', **kw)
wr = make()
wr2 = make(num_gpu_experts=2)
import torch  # the server imports torch only now
for w_ in (wr, wr2):
    assert isinstance(w_.gpu_experts_mask, torch.Tensor), type(w_.gpu_experts_mask)
    assert w_.gpu_experts_mask.dtype == torch.bool and w_.gpu_experts_mask.shape == (E,)
assert wr2.gpu_experts_mask.tolist() == [True, True, False, False, False, False]
rng = np.random.default_rng(0)
g, u, d = (torch.from_numpy(rng.standard_normal(s, dtype=np.float32) / 8) for s in [(E, I, H), (E, I, H), (E, H, I)])
wr.load_weights_from_tensors(g, u, d)
x = torch.from_numpy(rng.standard_normal((5, H), dtype=np.float32))
ids = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5], [1, 2]])
w = torch.rand(5, 2)

def expect(skip):
    y = wr.forward(x, ids, w)
    ref = torch.zeros(5, H, dtype=torch.float64)
    for t in range(5):
        for j in range(k):
            e = int(ids[t, j])
            if not skip[e]:
                h = torch.nn.functional.silu(g[e].double() @ x[t].double()) * (u[e].double() @ x[t].double())
                ref[t] += float(w[t, j]) * (d[e].double() @ h)
    err = float((y.double() - ref).abs().max() / max(float(ref.abs().max()), 1e-30))
    assert err < 0.02, (skip, err)

m = wr.gpu_experts_mask
expect([False] * E)
m.copy_(torch.tensor([True, False, False, True, False, False]))      # SGLang's update_kt_wrapper_masks
expect(m.tolist())
m.resize_(E)                                                          # resize_ to its own size
m[:] = False
m[2] = True                                                           # in-place item writes
expect(m.tolist())
m.set_(torch.tensor([False, True, False, False, False, True]))        # set_ swaps the storage
assert wr.gpu_experts_mask is m
expect(m.tolist())
m.fill_(True)
assert float(wr.forward(x, ids, w).abs().max()) == 0.0
print("OK")
"""


def test_default_mask_is_a_torch_tensor_when_torch_is_imported_late():
    r = _child(_MASK_CODE, block_torch=False, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")


def test_default_mask_without_torch_is_numpy():
    r = _child("""
        import numpy as np, kt_kernel
        wr = kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=4, num_experts_per_tok=2, hidden_size=64,
                                    moe_intermediate_size=64, cpuinfer_threads=1, num_gpu_experts=1, method='BF16')
        assert isinstance(wr.gpu_experts_mask, np.ndarray), type(wr.gpu_experts_mask)
        assert wr.gpu_experts_mask.tolist() == [True, False, False, False]
        wr.load_weights_from_tensors(*(np.ones(s, np.float32) for s in [(4, 64, 64)] * 3))
        y = wr.forward(np.ones((2, 64), np.float32), np.array([[0, 1], [2, 3]]), np.ones((2, 2), np.float32))
        assert y.shape == (2, 64) and np.isfinite(y).all()
        print("OK")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "OK"
