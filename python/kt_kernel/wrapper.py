"""KTMoEWrapper: the class inference servers construct once per MoE layer.

The constructor's parameter names are the contract of INTERFACE.md (servers
introspect `inspect.signature(KTMoEWrapper.__new__)`), hence explicit
keywords and no **kwargs. The method name picks the weight format; which
instruction set computes it is chosen at run time by the native dispatcher.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Dict, List, Optional

import numpy as np

from . import _kt_kernel
from . import _async
from ._pool import get_pool
from ._tensors import FLOAT_CODES, data_ptr, describe, is_torch, torch_module

# Native scheme codes (kt::QuantScheme).
SCHEME_BF16, SCHEME_INT8, SCHEME_INT4_SYM, SCHEME_INT4_ASYM, SCHEME_INT8_GROUP, SCHEME_FP8 = 0, 1, 2, 3, 4, 5
FP8_GROUP = 128  # K per FP8 scale group (DeepSeek / Kimi 128x128 block scales, expanded per row)

# Method name -> scheme family. AMX* names are formats, not instruction sets:
# they run on AVX-512, AVX2 or scalar CPUs as well.
_INT8_METHODS = ("AMXINT8", "MOE_INT8")
_INT4_METHODS = ("AMXINT4", "MOE_INT4")
# FP8: e4m3 block-scaled checkpoints, loaded losslessly as e4m3 codes + per-row
# group-128 scales (kFP8Block, 1 byte per weight; e4m3 is decoded to bf16 inside
# the kernel); dense weights are quantised to e4m3 at load. RAWINT4: compressed-tensors int4, loaded
# losslessly as INT4 symmetric group 32 (see kt_kernel/weights/).
SUPPORTED_METHODS = ("BF16", "FP8", "RAWINT4") + _INT8_METHODS + _INT4_METHODS
_UPSTREAM_METHODS = ("FP8_PERCHANNEL", "GPTQ_INT4", "LLAMAFILE", "MXFP4", "MXFP8")
DEFAULT_INT4_GROUP = 128

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


def _check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    """value as a Python int in [minimum, maximum]. Python ints and NumPy integers are accepted; bool (an int
    subclass) and floats are not, so that True or 64.0 never pass for a size."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be <= {maximum}, got {value}")
    return value


def _check_real(name: str, value: Any) -> float:
    """A finite float >= 0 that float32 holds (the native activation parameters are float32)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not (0.0 <= v <= float(np.finfo(np.float32).max)):  # False for NaN and inf too
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return v


def _check_bool(name: str, value: Any) -> bool:
    """bool or NumPy bool, or the ints 0 and 1; a str such as "False" is refused rather than read as True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {value!r}")


_nodes_with_cpus: Optional[List[int]] = None


def _available_numa_nodes() -> List[int]:
    """NUMA nodes with CPUs this process may use (the machine does not change under a running process)."""
    global _nodes_with_cpus
    if _nodes_with_cpus is None:
        _nodes_with_cpus = sorted(n["node"] for n in _kt_kernel.cpu_info()["numa_nodes"] if n["cpus"])
    return _nodes_with_cpus


def _check_numa_nodes(numa_nodes: Any, pools: int) -> List[int]:
    """One existing NUMA node per sub-pool. None: the nodes with CPUs, in turn (threadpool_count=2 on a
    one-node machine gives two sub-pools on node 0: the same result, the intermediate split in two)."""
    available = _available_numa_nodes()
    if numa_nodes is None:
        return [available[i % len(available)] for i in range(pools)]
    if isinstance(numa_nodes, (str, bytes)) or not hasattr(numa_nodes, "__iter__"):
        raise TypeError(f"numa_nodes: expected a list of ints, got {type(numa_nodes).__name__}")
    nodes = [_check_int(f"numa_nodes[{i}]", n, 0, _INT32_MAX) for i, n in enumerate(list(numa_nodes))]
    if len(nodes) != pools:
        raise ValueError(f"numa_nodes has {len(nodes)} entries, threadpool_count is {pools}")
    for i, n in enumerate(nodes):
        if n not in available:
            raise ValueError(f"numa_nodes[{i}] = {n}: no such NUMA node with CPUs this process may use "
                             f"(available: {', '.join(map(str, available))})")
    return nodes


_torch_missing = False


def _import_torch():
    """torch, imported now if it is installed and not yet imported (a server may import it after creating
    the wrappers, and its mask code needs a tensor); None where it cannot be imported."""
    global _torch_missing
    torch = torch_module()
    if torch is not None or _torch_missing:
        return torch
    try:
        import torch  # noqa: F811 (lazily: `import kt_kernel` never imports torch)
    except ImportError:
        _torch_missing = True
        return None
    return torch


def _scheme_for(method: str, group_size: Optional[int], zero_point: bool, hidden: int, inter: int):
    if not isinstance(method, str):
        raise TypeError(f"method: expected a str, got {type(method).__name__}")
    # group_size only shapes INT4 formats; servers pass it for every method, so
    # the other formats ignore it.
    if method == "BF16":
        return SCHEME_BF16, 0
    if method == "FP8":
        if hidden % FP8_GROUP or inter % FP8_GROUP:
            raise ValueError(f"method FP8 needs hidden_size and moe_intermediate_size multiples of {FP8_GROUP} (its "
                             f"scale group), got hidden_size={hidden}, moe_intermediate_size={inter}")
        return SCHEME_FP8, FP8_GROUP
    if method == "RAWINT4":
        if group_size not in (None, 32) or zero_point:
            raise ValueError(f"method RAWINT4 is INT4 symmetric with group 32, got group_size={group_size}, "
                             f"zero_point={zero_point}")
        if hidden % 32 or inter % 32:
            raise ValueError("method RAWINT4 needs hidden_size and moe_intermediate_size multiples of 32")
        return SCHEME_INT4_SYM, 32
    if method in _INT8_METHODS:
        return SCHEME_INT8, 0
    if method in _INT4_METHODS:
        if group_size is None:
            group = DEFAULT_INT4_GROUP
            if hidden % group or inter % group:
                raise ValueError(
                    f"method {method}: the default group size {group} does not divide hidden_size={hidden} and "
                    f"moe_intermediate_size={inter}; pass group_size=32 or 64, or group_size=0 for per-channel scales")
        else:
            group = _check_int("group_size", group_size, 0, _UINT32_MAX)
        return (SCHEME_INT4_ASYM if zero_point else SCHEME_INT4_SYM), group
    if method in _UPSTREAM_METHODS:
        raise ValueError(f"method '{method}' is not supported by this build of kt_kernel yet "
                         f"(supported: {', '.join(SUPPORTED_METHODS)})")
    raise ValueError(f"unknown method '{method}' (supported: {', '.join(SUPPORTED_METHODS)})")


class KTMoEWrapper:
    """Routed experts of one MoE layer computed on the CPU.

    forward(x, ids, w) returns, for each token t, the sum over its CPU experts
    j of w[t, j] * down(silu(gate(x[t])) * up(x[t])). Expert ids that are
    negative, >= num_experts, or True in `gpu_experts_mask` are skipped.
    """

    _capture_batch_sizes: List[int] = []
    _instances: "weakref.WeakSet[KTMoEWrapper]" = weakref.WeakSet()

    def __new__(
        cls,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        gpu_experts_mask: Any = None,
        cpuinfer_threads: Optional[int] = None,
        threadpool_count: int = 1,
        weight_path: Optional[str] = None,
        chunked_prefill_size: int = 8192,
        cpu_save: bool = False,
        max_deferred_experts_per_token: Optional[int] = None,
        method: str = "AMXINT4",
        num_gpu_experts: int = 0,
        numa_nodes: Optional[List[int]] = None,
        mode: str = "inference",
        lora_rank: int = 0,
        lora_alpha: float = 0.0,
        lora_dropout: float = 0.0,
        max_cache_depth: int = 1,
        group_size: Optional[int] = None,
        zero_point: bool = False,
        full_weight_grad: bool = False,
        swiglu_limit: float = 0.0,
        swiglu_alpha: float = 0.0,
    ):
        if mode != "inference":
            if mode == "sft":
                raise NotImplementedError("mode='sft' (fine-tuning) is not available in this build of kt_kernel yet")
            raise ValueError(f"mode: expected 'inference' or 'sft', got {mode!r}")
        self = super().__new__(cls)
        self._init(layer_idx, num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size,
                   gpu_experts_mask, cpuinfer_threads, threadpool_count, weight_path, chunked_prefill_size,
                   cpu_save, max_deferred_experts_per_token, method, num_gpu_experts, numa_nodes,
                   group_size, zero_point, swiglu_limit, swiglu_alpha)
        return self

    def __init__(self, *args, **kwargs):  # everything happens in __new__ (servers introspect it)
        pass

    def __del__(self):
        # Queued work writes this wrapper's output arrays and reads its mask and counts: it must be done
        # before they are freed, and they go before the native layer when the instance dict is cleared.
        a = self.__dict__.get("_async")
        if a is not None:
            try:
                a.wait_idle()
            except Exception:  # noqa: BLE001 (a finalizer must not raise; the native destructor waits too)
                pass

    # ------------------------------------------------------------------ set-up
    def _init(self, layer_idx, num_experts, top_k, hidden, inter, gpu_experts_mask, cpuinfer_threads,
              threadpool_count, weight_path, chunked_prefill_size, cpu_save, max_deferred, method,
              num_gpu_experts, numa_nodes, group_size, zero_point, swiglu_limit, swiglu_alpha):
        # Every integer is range-checked here, before anything is sized by it, against the native
        # types and the layer's limits (moe_layer.h), so that the error names the argument.
        lim = _kt_kernel.LIMITS
        self.layer_idx = _check_int("layer_idx", layer_idx, 0, _INT32_MAX)
        self.num_experts = _check_int("num_experts", num_experts, 1, lim["max_experts"])
        self.num_experts_per_tok = _check_int("num_experts_per_tok", top_k, 1, lim["max_top_k"])
        top_k = self.num_experts_per_tok
        self.hidden_size = _check_int("hidden_size", hidden, 1, lim["max_matrix_elements"])
        self.moe_intermediate_size = _check_int("moe_intermediate_size", inter, 1, lim["max_matrix_elements"])
        if self.hidden_size * self.moe_intermediate_size > lim["max_matrix_elements"]:
            raise ValueError(f"hidden_size x moe_intermediate_size must be at most {lim['max_matrix_elements']} "
                             f"weights per expert matrix, got {self.hidden_size} x {self.moe_intermediate_size}")
        self.chunked_prefill_size = _check_int("chunked_prefill_size", chunked_prefill_size, 1, _INT32_MAX)
        threads = (min(os.cpu_count() or 1, lim["max_threads"]) if cpuinfer_threads is None
                   else _check_int("cpuinfer_threads", cpuinfer_threads, 1, lim["max_threads"]))
        pools = _check_int("threadpool_count", threadpool_count, 1)
        if pools > threads:
            raise ValueError(f"threadpool_count ({pools}) exceeds cpuinfer_threads ({threads})")
        numa_nodes = _check_numa_nodes(numa_nodes, pools)
        if max_deferred is not None:
            max_deferred = _check_int("max_deferred_experts_per_token", max_deferred, 0)
            if max_deferred > top_k:
                raise ValueError(f"max_deferred_experts_per_token ({max_deferred}) exceeds num_experts_per_tok "
                                 f"({top_k})")
        swiglu_limit = _check_real("swiglu_limit", swiglu_limit)
        swiglu_alpha = _check_real("swiglu_alpha", swiglu_alpha)
        if swiglu_limit > 0 and swiglu_alpha <= 0:
            raise ValueError("swiglu_alpha must be > 0 when swiglu_limit is set")
        if weight_path is not None and not isinstance(weight_path, (str, os.PathLike)):
            raise TypeError(f"weight_path: expected a str or os.PathLike, got {type(weight_path).__name__}")
        self.method = method
        self.weight_path = weight_path
        self.cpu_save = _check_bool("cpu_save", cpu_save)
        zero_point = _check_bool("zero_point", zero_point)
        self.max_deferred_experts_per_token = max_deferred
        self.scheme, self.group_size = _scheme_for(method, group_size, zero_point, self.hidden_size,
                                                   self.moe_intermediate_size)
        self.cpuinfer_threads = threads
        self.threadpool_count = pools
        self.numa_nodes = numa_nodes
        self.gpu_experts_mask = self._make_mask(gpu_experts_mask, num_gpu_experts)
        pool = get_pool(threads, numa_nodes)
        self._group_size_default = group_size is None  # load_weights may adopt a converted file's group
        self._activation = (float(swiglu_limit), float(swiglu_alpha))
        self._pool = pool
        self._layer = _kt_kernel.MoeLayer(pool, self.num_experts, self.num_experts_per_tok, self.hidden_size,
                                          self.moe_intermediate_size, self.scheme, self.group_size,
                                          float(swiglu_limit), float(swiglu_alpha))
        self._loaded = False
        self._lock = threading.Lock()
        self._pending: Optional[Any] = None
        self._out_cache: Dict[Any, Any] = {}
        self._async = None  # native AsyncLayer, made on first submit (_async.py)
        self._async_owner = None
        self._expert_counts: Optional[np.ndarray] = None
        self._mask_checked: Optional[tuple] = None  # _mask_ptr's last validated mask
        KTMoEWrapper._instances.add(self)

    def _make_mask(self, mask: Any, num_gpu_experts: int):
        E = self.num_experts
        if mask is not None:
            info = describe(mask, "gpu_experts_mask", dtypes=("bool",), ndim=1, shape=(E,), contiguous="full")
            return info.obj
        n = _check_int("num_gpu_experts", num_gpu_experts, 0)
        if n > E:
            raise ValueError(f"num_gpu_experts ({n}) exceeds num_experts ({E})")
        # A torch tensor whenever torch is installed, even if not imported yet: servers update the mask
        # with torch methods (copy_, resize_, set_) and may import torch after creating the wrappers.
        torch = _import_torch()
        if torch is not None:
            m = torch.zeros(E, dtype=torch.bool)
        else:
            m = np.zeros(E, dtype=bool)
        m[:n] = True
        return m

    # ----------------------------------------------------------------- weights
    def load_weights_from_tensors(self, gate_proj: Any, up_proj: Any, down_proj: Any,
                                  physical_to_logical_map: Any = None) -> None:
        """Quantises and packs all experts from dense bf16/fp16/fp32 weights.

        gate_proj, up_proj: [E_logical, I, H]; down_proj: [E_logical, H, I].
        physical_to_logical_map: int64 [num_experts] (a longer map, an EPLB table
        with redundant slots, gives its first num_experts entries); slot s
        computes logical expert map[s]. None = identity (then E_logical ==
        num_experts).
        """
        I, H = self.moe_intermediate_size, self.hidden_size
        g = describe(gate_proj, "gate_proj", dtypes=_FLOAT_DTYPES, ndim=3, shape=(None, I, H), contiguous="full")
        u = describe(up_proj, "up_proj", dtypes=_FLOAT_DTYPES, ndim=3, shape=(g.shape[0], I, H), contiguous="full")
        d = describe(down_proj, "down_proj", dtypes=_FLOAT_DTYPES, ndim=3, shape=(g.shape[0], H, I), contiguous="full")
        if not (g.dtype == u.dtype == d.dtype):
            raise TypeError(f"gate_proj, up_proj and down_proj must share a dtype, got {g.dtype}, {u.dtype}, {d.dtype}")
        n_logical = g.shape[0]
        if n_logical == 0:
            raise ValueError("gate_proj: no experts")
        map_ptr, keep = 0, None
        if physical_to_logical_map is not None:
            keep = _physical_to_logical(physical_to_logical_map, self.num_experts, n_logical)
            map_ptr = keep.ctypes.data
        elif n_logical != self.num_experts:
            raise ValueError(f"gate_proj has {n_logical} experts but num_experts is {self.num_experts}; "
                             "pass physical_to_logical_map")
        with self._lock:
            _async.drain(self, "load_weights_from_tensors")
            self._loaded = False
            self._layer.load_dense(g.ptr, u.ptr, d.ptr, FLOAT_CODES[g.dtype], n_logical, map_ptr, 0)
            self._loaded = True

    def load_weights(self, physical_to_logical_map: Any = None) -> None:
        """Loads this layer's experts from weight_path: converted files (`kt-kernel convert`), a Hugging Face
        checkpoint or a GGUF file (see kt_kernel/weights/loader.py). Blocks until resident (and, first, until
        this layer's queued work is done; raises if a submit_forward is pending). Experts marked in
        gpu_experts_mask are not loaded; physical_to_logical_map (int64 [num_experts]) picks each slot's expert."""
        from .weights.loader import load_into

        # Under the lock, after this layer's in-flight work: a forward on another thread waits for the
        # load, and no queued task reads weights while they change.
        with self._lock:
            _async.drain(self, "load_weights")
            self._loaded = False
            load_into(self, physical_to_logical_map)
            self._loaded = True

    def _rebuild_layer(self, group_size: int, scheme: Optional[int] = None) -> None:
        """Recreates the native layer with another INT4 group size (a converted file's, when none was given),
        or, for the INT8 methods, as per-channel (SCHEME_INT8, 0) or grouped INT8 (SCHEME_INT8_GROUP, group):
        load_weights adopts the weights' own INT8 form (GGUF Q8_0 is grouped INT8, group 32). Called by
        load_weights, under the lock and after the old layer's work has drained."""
        layer = _kt_kernel.MoeLayer(self._pool, self.num_experts,
                                    self.num_experts_per_tok, self.hidden_size, self.moe_intermediate_size,
                                    self.scheme if scheme is None else scheme, group_size, *self._activation)
        self._layer = layer
        self.group_size = group_size
        if scheme is not None:
            self.scheme = scheme

    # ------------------------------------------------- objects queued work reads
    @property
    def gpu_experts_mask(self):
        """bool [num_experts], True = the expert runs on the GPU (skipped here). Read by every call when its
        work runs: update it in place (`copy_`, `[:] =`); assigning another object first waits for this
        layer's queued work, which may still read the old one."""
        return self._gpu_experts_mask

    @gpu_experts_mask.setter
    def gpu_experts_mask(self, mask) -> None:
        self._replace_read_by_work("_gpu_experts_mask", mask)

    def _replace_read_by_work(self, name: str, value) -> None:
        """Sets an attribute that queued tasks read through a raw address, after they are done (under the
        lock, so no call in between takes the old address)."""
        lock = self.__dict__.get("_lock")
        if lock is None:  # still in _init: nothing has run
            setattr(self, name, value)
            return
        with lock:
            a = self.__dict__.get("_async")
            if a is not None:
                a.wait_idle()
            setattr(self, name, value)

    # ----------------------------------------------------------------- forward
    def _mask_ptr(self) -> int:
        """Address of gpu_experts_mask, validated again whenever the attribute holds another
        object, or the same one with another dtype, shape, strides or address (a full describe
        costs a microsecond per call, and the mask rarely changes)."""
        m = self._gpu_experts_mask
        if is_torch(m):
            key = (m, m.dtype, m.shape, m.stride(), m.data_ptr())
        else:
            key = (m, getattr(m, "dtype", None), getattr(m, "shape", None), getattr(m, "strides", None),
                   data_ptr(m) if isinstance(m, np.ndarray) else None)
        checked = self._mask_checked
        if checked is not None and checked[0] is m and checked[1:] == key[1:]:
            return key[4]
        info = describe(m, "gpu_experts_mask", dtypes=("bool",), ndim=1, shape=(self.num_experts,),
                        contiguous="full")
        self._mask_checked = key
        return info.ptr

    def forward(self, hidden_states: Any, topk_ids: Any, topk_weights: Any, cuda_stream: int = 0):
        """submit_forward then sync_forward (in CPU mode the work runs on this thread when no other
        layer's task is queued, saving two thread hand-offs; three CPU torch tensors or NumPy arrays
        take a short path past the argument descriptions, _async.forward_cpu)."""
        if not cuda_stream:
            self._pool.wake()  # the workers' wake-up overlaps the argument checks below
        with self._lock:
            if type(cuda_stream) is int and cuda_stream == 0:
                y = _async.forward_cpu(self, hidden_states, topk_ids, topk_weights)
                if y is not None:
                    return y
            return _async.forward(self, hidden_states, topk_ids, topk_weights, cuda_stream)

    def submit_forward(self, hidden_states: Any, topk_ids: Any, topk_weights: Any, cuda_stream: int = 0,
                       num_tokens: Any = None) -> None:
        """Queues the layer and returns; every read of the inputs is ordered before the return.

        cuda_stream == 0 with CPU tensors: the inputs are copied now (the caller
        may overwrite them at once) and the work runs on the ordered queue.
        A nonzero cuda_stream (or device inputs): copies and the CPU task are
        enqueued on that stream; nothing here waits or allocates once the batch
        size's buffers exist (CUDA-graph capturable). num_tokens (stream mode,
        optional): an int64 [1] tensor whose value, read in stream order when
        the work runs, is the number of leading rows to compute (the rest of
        the output is zero).
        """
        if not cuda_stream:
            self._pool.wake()
        with self._lock:
            _async.submit(self, hidden_states, topk_ids, topk_weights, cuda_stream, num_tokens)

    def sync_forward(self, hidden_states: Any, cuda_stream: int = 0):
        """The result of the last submit_forward: [T, H] in the input's dtype, on its device.

        CPU mode: waits for the work. Stream mode: enqueues the wait and the
        copy of the output on the stream and returns the output tensor at once.
        With expert deferral the layer's deferred experts are still running; the
        next layer's output includes them.
        """
        with self._lock:
            return _async.sync(self, hidden_states, cuda_stream)

    # ------------------------------------------------------- expert placement
    def enable_activation_counting(self, on: bool = True) -> None:
        """Counts, per expert, the (token, k) pairs routed to it (valid ids, GPU-resident experts
        included), from now on; cheap (done by the layer task). See kt_kernel.placement."""
        self._replace_read_by_work("_expert_counts", np.zeros(self.num_experts, np.int64) if on else None)

    def activation_counts(self) -> np.ndarray:
        """int64 [num_experts] counts since enable_activation_counting (zeros if off). In stream mode
        they are complete once the stream has passed this layer's sync."""
        c = self._expert_counts
        return np.zeros(self.num_experts, np.int64) if c is None else c.copy()

    def reset_activation_counts(self) -> None:
        if self._expert_counts is not None:
            self._expert_counts[:] = 0

    # --------------------------------------------------------- buffer policy
    @staticmethod
    def set_capture_batch_sizes(sizes: List[int]) -> None:
        """Batch sizes whose output buffers persist across calls (CUDA-graph capture)."""
        KTMoEWrapper._capture_batch_sizes = sorted({_check_int("batch size", s, 1) for s in sizes})

    @staticmethod
    def get_capture_batch_sizes() -> List[int]:
        return list(KTMoEWrapper._capture_batch_sizes)

    @staticmethod
    def clear_buffer_cache() -> None:
        """Frees the persistent output buffers of every wrapper (the sizes stay)."""
        for w in list(KTMoEWrapper._instances):
            w._out_cache.clear()
            if w._async is not None:
                w._async.clear_persistent()
        _kt_kernel.release_async_staging()

    # ------------------------------------------------------------ inspection
    @property
    def packed_bytes(self) -> int:
        """Bytes of packed expert weights held in RAM by this layer."""
        return int(self._layer.packed_bytes)


def _physical_to_logical(obj: Any, num_slots: int, num_logical: int) -> np.ndarray:
    """The logical expert of each of num_slots slots, as contiguous int64. A map longer than num_slots (an
    EPLB table with redundant slots) gives its first num_slots entries, as kt-kernel reads it."""
    m = describe(obj, "physical_to_logical_map", dtypes=("int64", "int32"), ndim=1, contiguous="full")
    if m.shape[0] < num_slots:
        raise ValueError(f"physical_to_logical_map has {m.shape[0]} entries, fewer than num_experts ({num_slots})")
    logical = np.ascontiguousarray(np.asarray(_to_numpy(m.obj), dtype=np.int64)[:num_slots])
    bad = (logical < 0) | (logical >= num_logical)
    if bad.any():
        s = int(np.argmax(bad))
        raise ValueError(f"physical_to_logical_map[{s}] = {int(logical[s])} is outside [0, {num_logical})")
    return logical


def _to_numpy(obj: Any) -> np.ndarray:
    if is_torch(obj):
        return obj.detach().to("cpu").numpy()
    return np.asarray(obj)
