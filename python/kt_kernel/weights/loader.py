"""KTMoEWrapper.load_weights: from converted files, a Hugging Face checkpoint or a GGUF file.

The wrapper's method and weight_path decide:
  * a directory of converted files (kt_kernel_model.json / layer_*.safetensors):
    the canonical codes are packed per NUMA slice (a lossless shuffle) from a
    memory map, after checking the header against the wrapper (format and
    layout version, shapes, scheme, group size) and the CRC32 of every tensor
    it reads (a corrupt file raises ValueError naming the file, the tensor,
    its layer and expert). All checks run before the layer is touched.
    KT_KERNEL_SKIP_CRC=1 in the environment skips the CRC32 check (only the
    CRC; every other check stays; a UserWarning names the file) for callers
    who verify files another way;
  * a Hugging Face directory or a GGUF file ("native" methods, no
    conversion): BF16 from bf16/fp16/fp32 weights; FP8 e4m3 block-scaled
    weights losslessly as e4m3 codes + per-row group scales (the FP8 block
    format, decoded inside the kernel; no bf16 copy); RAWINT4 from compressed-tensors int4 (or GGUF
    Q4_0) losslessly; other methods quantise at load time.
Experts marked in gpu_experts_mask are not read at all; the
physical_to_logical_map picks which logical expert each slot holds.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import numpy as np

from .common import (BF16, CONVERTED_FORMAT, CONVERTED_FORMAT_VERSION, FP8, INT4_ASYM, INT4_SYM, INT8, INT8_GROUP,
                     SCHEME_BY_NAME, SCHEME_NAMES, WHICH)
from .convert import MANIFEST, layer_file, open_source, tensor_name, verify_tensors
from .safetensors_io import SafetensorsFile

# Environment switch for the one check load_weights can skip (see the module docstring).
SKIP_CRC_ENV = "KT_KERNEL_SKIP_CRC"


def crc_check_enabled() -> bool:
    return os.environ.get(SKIP_CRC_ENV, "").strip().lower() not in ("1", "true", "yes", "on")

_DENSE_CODES = {np.dtype("float32"): 0, np.dtype("float16"): 1}


def is_converted_dir(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, MANIFEST)) or
                                    any(f.startswith("layer_") and f.endswith(".safetensors") for f in os.listdir(path)))


def _ptr(a: Optional[np.ndarray]) -> int:
    return 0 if a is None else int(a.ctypes.data)


class ConvertedLayer:
    """One validated layer file of a converted directory."""

    def __init__(self, root: str, layer: int):
        path = layer_file(root, layer)
        if not os.path.exists(path):
            have = sorted(f for f in os.listdir(root) if f.startswith("layer_") and f.endswith(".safetensors"))
            hint = f" (present: {have[0]} .. {have[-1]})" if have else " (no layer files: conversion incomplete?)"
            raise ValueError(f"{path}: missing; layer {layer} was not converted{hint}")
        self.path, self.layer = path, layer
        self.file = SafetensorsFile(path)
        self.meta = self.file.metadata
        self.read: list = []  # names of the tensors matrices() handed out, for verify_read

    def verify_read(self, threads: int) -> None:
        """CRC32 of every tensor matrices() returned so far (ValueError naming file, tensor, layer, expert)."""
        def what(name: str) -> str:
            _, rest = name.split(".ffn_", 1)
            which, e, part = rest.split(".")
            return f"layer {self.layer}, expert {e}, {which.replace('_exps', '')} {part}"

        verify_tensors(self.file, self.read, threads, what)

    def check_against(self, wrapper, group_default: bool):
        from .. import PACKED_LAYOUT_VERSION

        m, p = self.meta, self.path
        if m.get("format") != CONVERTED_FORMAT:
            raise ValueError(f"{p}: not a kt_kernel converted file (format {m.get('format')!r})")
        if m.get("format_version") != str(CONVERTED_FORMAT_VERSION):
            raise ValueError(f"{p}: converted-file version {m.get('format_version')!r}, this kt_kernel reads "
                             f"{CONVERTED_FORMAT_VERSION}: convert again")
        if m.get("layout_version") != str(PACKED_LAYOUT_VERSION):
            raise ValueError(f"{p}: written for packed layout {m.get('layout_version')!r}, this kt_kernel has "
                             f"{PACKED_LAYOUT_VERSION}: convert again")
        for key, want in (("hidden_size", wrapper.hidden_size), ("moe_intermediate_size", wrapper.moe_intermediate_size)):
            if m.get(key) != str(want):
                raise ValueError(f"{p}: {key} is {m.get(key)} in the file but {want} in the wrapper")
        if m.get("layer") != str(self.layer):
            raise ValueError(f"{p}: holds layer {m.get('layer')}, expected {self.layer}")
        scheme = m.get("scheme")
        want = SCHEME_NAMES.get(wrapper.scheme)
        int8_family = (SCHEME_NAMES[INT8], SCHEME_NAMES[INT8_GROUP])
        if scheme != want and not (scheme in int8_family and want in int8_family):
            hint = " (construct the wrapper with zero_point=True)" if scheme == "int4_asym" else ""
            raise ValueError(f"{p}: holds {scheme} weights (converted with --method {m.get('method')}), but the "
                             f"wrapper's method {wrapper.method} reads {want}{hint}")
        try:
            group = int(m.get("group_size", ""))
            num_experts = int(m.get("num_experts", ""))
        except ValueError:
            raise ValueError(f"{p}: corrupt metadata (group_size / num_experts)") from None
        if wrapper.scheme in (INT4_SYM, INT4_ASYM) and group != wrapper.group_size and not group_default:
            raise ValueError(f"{p}: converted with group size {group}, the wrapper has group_size="
                             f"{wrapper.group_size}")
        return group, num_experts

    def matrices(self, e: int, scheme: int, group: int, H: int, I: int):
        out = []
        for which in WHICH:
            N, K = (H, I) if which == "down" else (I, H)
            groups = (K // group if group else 1)
            want = {"weight": ({BF16: "U16", INT8: "I8", INT8_GROUP: "I8"}.get(scheme, "U8"),
                               (N, K // 2) if scheme in (INT4_SYM, INT4_ASYM) else (N, K))}
            if scheme != BF16:
                want["scale"] = ("F32", (N, groups))
            if scheme == INT4_ASYM:
                want["min"] = ("F32", (N, groups))
            arrs = {}
            for part, (dt, shape) in want.items():
                name = tensor_name(self.layer, which, e, part)
                if name not in self.file:
                    raise ValueError(f"{self.path}: tensor {name} is missing")
                ent = self.file.entry(name)
                if ent.dtype != dt or tuple(ent.shape) != shape:
                    raise ValueError(f"{self.path}: tensor {name} is {ent.dtype} {list(ent.shape)}, expected {dt} "
                                     f"{list(shape)}")
                self.read.append(name)
                arrs[part] = self.file.get(name)
            out.append(arrs)
        return out


def _slot_plan(wrapper, physical_to_logical_map: Any, num_logical: int):
    from ..wrapper import _physical_to_logical, _to_numpy

    E = wrapper.num_experts
    if physical_to_logical_map is None:
        if num_logical < E:
            raise ValueError(f"the weights hold {num_logical} experts but num_experts is {E}; "
                             "pass physical_to_logical_map")
        logical = np.arange(E, dtype=np.int64)
    else:
        logical = _physical_to_logical(physical_to_logical_map, E, num_logical)
    mask = np.asarray(_to_numpy(wrapper.gpu_experts_mask), dtype=bool).reshape(-1)
    return logical, mask


def load_into(wrapper, physical_to_logical_map: Any = None) -> None:
    """Loads wrapper.weight_path into wrapper._layer (see the module docstring)."""
    path = wrapper.weight_path
    if not path:
        raise ValueError("weight_path is not set: pass weight_path= to KTMoEWrapper, or use load_weights_from_tensors")
    path = str(path)
    H, I, L = wrapper.hidden_size, wrapper.moe_intermediate_size, wrapper.layer_idx
    if is_converted_dir(path):
        layer = ConvertedLayer(path, L)
        group, num_logical = layer.check_against(wrapper, getattr(wrapper, "_group_size_default", False))
        file_scheme = SCHEME_BY_NAME[layer.meta["scheme"]]  # the wrapper's, or the INT8 form it adopts below
        logical, mask = _slot_plan(wrapper, physical_to_logical_map, num_logical)
        # Every tensor this load reads is found, shape-checked and CRC-checked before the layer is touched
        # (rebuilt or allocated), so a bad file leaves the layer as it was. GPU experts are neither read nor checked.
        plan = [(s, layer.matrices(int(logical[s]), file_scheme, group, H, I))
                for s in range(wrapper.num_experts) if not mask[s]]
        if crc_check_enabled():
            layer.verify_read(max(1, int(getattr(wrapper, "cpuinfer_threads", 1) or 1)))
        else:
            warnings.warn(f"{SKIP_CRC_ENV} is set: the CRC32s of {layer.path} were not checked", stacklevel=3)
        if wrapper.scheme in (INT8, INT8_GROUP) and (file_scheme, group) != (wrapper.scheme, wrapper.group_size):
            wrapper._rebuild_layer(group, file_scheme)  # INT8 wrappers adopt the file's per-channel / grouped INT8
        elif wrapper.scheme in (INT4_SYM, INT4_ASYM) and group != wrapper.group_size:
            wrapper._rebuild_layer(group)
        wrapper._layer.allocate()
        for s, mats in plan:
            refs = []
            for a in mats:
                sc, mn = a.get("scale"), a.get("min")
                refs.append((_ptr(a["weight"]), a["weight"].shape[1], _ptr(sc), _ptr(mn), 0 if sc is None else sc.shape[1]))
            wrapper._layer.load_expert_quantized(s, refs[0], refs[1], refs[2])
        return

    src = open_source(path)
    if (src.hidden, src.inter) != (H, I):
        raise ValueError(f"{path}: experts are H={src.hidden}, I={src.inter}; the wrapper has hidden_size={H}, "
                         f"moe_intermediate_size={I}")
    if L not in src.layers:
        raise ValueError(f"{path}: layer {L} has no routed experts (MoE layers: {src.layers[0]}-{src.layers[-1]})")
    if wrapper.method == "RAWINT4":
        probe = src.matrix(L, 0, "gate")
        if not (probe.kind == "quant" and probe.scheme == INT4_SYM and probe.group == 32):
            raise ValueError(f"{path}: RAWINT4 needs INT4 symmetric group-32 weights (compressed-tensors "
                             f"pack-quantized or GGUF Q4_0); this source is {src.describe()}")
    if wrapper.scheme in (INT8, INT8_GROUP):
        # INT8 wrappers adopt a grouped INT8 source (GGUF Q8_0) losslessly; anything else packs per channel.
        probe = src.matrix(L, 0, "gate")
        want = (INT8_GROUP, probe.group) if probe.kind == "quant" and probe.scheme == INT8_GROUP else (INT8, 0)
        if want != (wrapper.scheme, wrapper.group_size):
            wrapper._rebuild_layer(want[1], want[0])
    if wrapper.scheme == FP8:
        # FP8 wrappers adopt the checkpoint's scale group (its weight_block_size along K) to stay lossless.
        probe = src.matrix(L, 0, "gate")
        if probe.kind == "quant" and probe.scheme == FP8 and probe.group != wrapper.group_size:
            wrapper._rebuild_layer(probe.group)
    logical, mask = _slot_plan(wrapper, physical_to_logical_map, src.num_experts)
    wrapper._layer.allocate()
    for s in range(wrapper.num_experts):
        if mask[s]:
            continue
        e = int(logical[s])
        mats = [src.matrix(L, e, w) for w in WHICH]
        if all(m.kind == "quant" and m.scheme == wrapper.scheme and m.group == wrapper.group_size for m in mats):
            refs = [(_ptr(m.q), m.q.shape[1], _ptr(m.scales), _ptr(m.mins), m.scales.shape[1]) for m in mats]
            keep = mats  # noqa: F841 (alive during the call)
            wrapper._layer.load_expert_quantized(s, refs[0], refs[1], refs[2])
            continue
        vals, code = _dense_triplet(mats)
        wrapper._layer.load_expert_dense(s, _ptr(vals[0]), _ptr(vals[1]), _ptr(vals[2]), code)


def _dense_triplet(mats):
    """Three dense arrays of one dtype the native packer reads (bf16 bits stay bf16, zero copy)."""
    if all(m.kind == "dense" and m.bf16 for m in mats):
        return [np.ascontiguousarray(m.values) for m in mats], 2
    if all(m.kind == "dense" and not m.bf16 and np.asarray(m.values).dtype in _DENSE_CODES for m in mats):
        dts = {np.asarray(m.values).dtype for m in mats}
        if len(dts) == 1:
            dt = dts.pop()
            return [np.ascontiguousarray(m.values) for m in mats], _DENSE_CODES[dt]
    return [np.ascontiguousarray(m.to_f32()) for m in mats], 0
