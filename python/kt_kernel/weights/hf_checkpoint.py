"""Hugging Face checkpoints as a source of expert matrices.

A directory with config.json and *.safetensors (sharded through
model.safetensors.index.json, or not). Expert weights are found by name:
  {P}layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.*          (DeepSeek, Kimi, Qwen-MoE, GLM-4-MoE)
  {P}layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.*      (Mixtral: w1 gate, w3 up, w2 down)
  {P}layers.{L}.mlp.experts.gate_up_proj [E, H, 2I] + down_proj [E, I, H]   (fused; GPT-OSS interleaves gate/up)
with P one of "", "model.", "language_model.model.", "model.language_model.". Per matrix:
  .weight in BF16 / F16 / F32                                 -> dense
  .weight F8_E4M3 + .weight_scale_inv [N/128, K/128]            -> dense (exact e4m3 table x block scale)
  .weight_packed int32 [N, K/8] + .weight_scale [N, K/g]        -> INT4 symmetric group g, lossless
    (compressed-tensors "pack-quantized": signed int4 stored as value + 8 in
    eight 4-bit fields of each int32, element i of a word at bits 4i; the
    int32 words' little-endian bytes are then exactly our canonical nibble
    pairs, low nibble = even k; value = scale * (code - 8)).
The MoE shape (E, H, I, top-k) is read from config.json (or its text_config)
and checked against the tensors. Every error about a tensor is a ValueError
naming the shard file and the tensor (a missing one by the name it should
have); files are opened only if they are regular files (open_regular).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from .common import FP8, INT4_SYM, Matrix, dequant_fp8_block, fp8_block_scales_per_row
from .safetensors_io import SafetensorsFile, open_regular

_KEY = re.compile(
    r"^(?P<prefix>(?:model\.|language_model\.model\.|model\.language_model\.)?)layers\.(?P<L>\d+)\."
    r"(?P<block>mlp|block_sparse_moe)\.experts\.(?:(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\."
    r"(?P<suffix>weight|weight_scale_inv|weight_packed|weight_scale|weight_shape|weight_zero_point)"
    r"|(?P<fused>gate_up_proj|down_proj)(?P<fsuffix>_bias|_blocks|_scales)?)$")
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def _first(cfg: dict, *names, default=None):
    for n in names:
        if isinstance(cfg.get(n), (int, float)) and not isinstance(cfg.get(n), bool):
            return int(cfg[n])
    return default


def moe_shape_from_config(cfg: dict, path: str = "config.json") -> Dict[str, int]:
    """E, H, I, top-k of DeepSeek-V2/V3, Kimi-K2, Qwen2/3-MoE, Mixtral, GLM-4-MoE and GPT-OSS configs."""
    c = dict(cfg)
    if isinstance(cfg.get("text_config"), dict):
        c.update(cfg["text_config"])
    E = _first(c, "n_routed_experts", "num_experts", "num_local_experts")
    H = _first(c, "hidden_size")
    I = _first(c, "moe_intermediate_size")
    if I is None and ("num_local_experts" in c or c.get("model_type") in ("mixtral", "gpt_oss")):
        I = _first(c, "intermediate_size")
    k = _first(c, "num_experts_per_tok", "experts_per_token", "num_experts_per_token")
    missing = [n for n, v in (("number of experts", E), ("hidden_size", H), ("moe_intermediate_size", I),
                              ("num_experts_per_tok", k)) if v is None]
    if missing:
        raise ValueError(f"{path}: not a MoE config kt_kernel understands (missing {', '.join(missing)}; "
                         f"model_type={str(c.get('model_type'))[:40]!r})")
    for n, v in (("number of experts", E), ("hidden_size", H), ("moe_intermediate_size", I),
                 ("num_experts_per_tok", k)):
        if not 0 < v < 2 ** 31:
            raise ValueError(f"{path}: {n} = {v} is out of range")
    return {"num_experts": E, "hidden_size": H, "moe_intermediate_size": I, "num_experts_per_tok": k,
            "model_type": str(c.get("model_type", ""))}


def parse_weight_map(raw: bytes, path: str = "model.safetensors.index.json") -> Dict[str, str]:
    """The weight_map of a sharded checkpoint's index: tensor name -> shard file name (no directories)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError(f"{path}: weight_map must map tensor names to file names")
    for v in set(wm.values()):
        if not v or os.path.basename(v) != v or v in (".", ".."):
            raise ValueError(f"{path}: shard name {v!r} is not a plain file name")
    return wm


def parse_config(raw: bytes, path: str = "config.json") -> dict:
    """config.json -> the dict (ValueError when it is not a JSON object)."""
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    return cfg


def fp8_block_from_config(cfg: dict, path: str = "config.json") -> Tuple[int, int]:
    """quantization_config.weight_block_size of FP8 checkpoints (default 128 x 128)."""
    qc = cfg.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: quantization_config is not an object")
    b = qc.get("weight_block_size") or [128, 128]
    if (not isinstance(b, (list, tuple)) or len(b) != 2 or
            not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < 2 ** 20 for x in b)):
        raise ValueError(f"{path}: weight_block_size {str(b)[:40]} is not two positive integers")
    return int(b[0]), int(b[1])


class HFCheckpoint:
    kind = "hf"

    def __init__(self, path: str):
        self.path = str(path)
        cfg_path = os.path.join(self.path, "config.json")
        try:
            with open_regular(cfg_path) as f:
                self.config = parse_config(f.read(), cfg_path)
        except OSError as e:
            raise ValueError(f"{cfg_path}: cannot read ({e.strerror})") from None
        shape = moe_shape_from_config(self.config, cfg_path)
        self.num_experts = shape["num_experts"]
        self.hidden = shape["hidden_size"]
        self.inter = shape["moe_intermediate_size"]
        self.top_k = shape["num_experts_per_tok"]
        self.model_type = shape["model_type"]
        self.fp8_block = fp8_block_from_config(self.config, cfg_path)
        self._files: Dict[str, SafetensorsFile] = {}
        self.weight_map = self._weight_map()
        self._index_experts()

    # ------------------------------------------------------------ the index
    def _weight_map(self) -> Dict[str, str]:
        idx = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.lexists(idx):
            try:
                with open_regular(idx) as f:
                    raw = f.read()
            except OSError as e:
                raise ValueError(f"{idx}: cannot read ({e.strerror})") from None
            wm = parse_weight_map(raw, idx)
            for v in set(wm.values()):
                if not os.path.exists(os.path.join(self.path, v)):
                    raise ValueError(f"{idx}: shard {v!r} is missing from {self.path}")
            return wm
        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{self.path}: no *.safetensors files")
        wm = {}
        for fn in files:
            for k in self._file(fn).keys():
                wm[k] = fn
        return wm

    def _file(self, fn: str) -> SafetensorsFile:
        f = self._files.get(fn)
        if f is None:
            f = self._files[fn] = SafetensorsFile(os.path.join(self.path, fn))
        return f

    def _index_experts(self) -> None:
        self.per_expert: Dict[int, Dict[int, Dict[str, Dict[str, str]]]] = {}
        self.fused: Dict[int, Dict[str, str]] = {}
        for key in self.weight_map:
            m = _KEY.match(key)
            if not m:
                continue
            L = int(m.group("L"))
            if m.group("e") is not None:
                e = int(m.group("e"))
                which = _PROJ[m.group("proj")]
                self.per_expert.setdefault(L, {}).setdefault(e, {}).setdefault(which, {})[m.group("suffix")] = key
            else:
                self.fused.setdefault(L, {})[m.group("fused") + (m.group("fsuffix") or "")] = key
        self.layers: List[int] = sorted(set(self.per_expert) | set(self.fused))
        if not self.layers:
            raise ValueError(f"{self.path}: no routed-expert tensors found (looked for "
                             "model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.* and the Mixtral/fused names)")

    def _at(self, key: str) -> str:
        """'<shard file>: tensor <key>', the prefix of every message about one tensor."""
        return f"{os.path.join(self.path, self.weight_map.get(key, '?'))}: tensor {key}"

    def tensor(self, key: str) -> Tuple[np.ndarray, str]:
        f = self._file(self.weight_map[key])
        if key not in f:
            raise ValueError(f"{self._at(key)} is missing: model.safetensors.index.json puts it in this shard, "
                             "which does not hold it")
        return f.get(key), f.entry(key).dtype

    def _expected_name(self, L: int, e: int, which: str) -> str:
        """The tensor name a missing expert matrix would have, following the names of the layer's other experts."""
        for mats in self.per_expert.get(L, {}).values():
            for names in mats.values():
                m = _KEY.match(next(iter(names.values())))
                mixtral = m.group("proj") in ("w1", "w2", "w3")
                proj = {"gate": "w1", "up": "w3", "down": "w2"}[which] if mixtral else f"{which}_proj"
                suffix = "weight_packed" if "weight_packed" in names else "weight"
                return f"{m.group('prefix')}layers.{L}.{m.group('block')}.experts.{e}.{proj}.{suffix}"
        return f"layers.{L}.mlp.experts.{e}.{which}_proj.weight"

    def _shard_of_layer(self, L: int) -> str:
        """A shard file holding some of layer L's experts (for messages about tensors that are not there)."""
        keys = [k for mats in self.per_expert.get(L, {}).values() for names in mats.values() for k in names.values()]
        keys += list(self.fused.get(L, {}).values())
        return os.path.join(self.path, self.weight_map[keys[0]]) if keys else self.path

    def describe(self) -> str:
        L = self.layers[0]
        if L in self.per_expert:
            names = self.per_expert[L][min(self.per_expert[L])].get("gate", {})
            if "weight_packed" in names:
                return "hf:compressed-tensors-int4"
            return "hf:" + (self.tensor(names["weight"])[1].lower() if "weight" in names else "?")
        key = self.fused[L].get("gate_up_proj")
        return "hf:fused:" + (self.tensor(key)[1].lower() if key else "?")

    # ------------------------------------------------------------ matrices
    def matrix(self, L: int, e: int, which: str) -> Matrix:
        rows, cols = (self.hidden, self.inter) if which == "down" else (self.inter, self.hidden)
        if L in self.per_expert:
            names = self.per_expert[L].get(e, {}).get(which)
            if not names:
                raise ValueError(f"{self._shard_of_layer(L)}: tensor {self._expected_name(L, e, which)} is missing "
                                 f"(layer {L} expert {e} has no {which} projection in {self.path})")
            return self._per_expert_matrix(names, rows, cols, f"layer {L} expert {e} {which}")
        if L in self.fused:
            return self._fused_matrix(L, e, which, rows, cols)
        raise ValueError(f"{self.path}: layer {L} has no routed experts")

    def _check(self, a: np.ndarray, shape, what: str, key: str) -> None:
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{self._at(key)} ({what}) has shape {tuple(a.shape)}, expected {tuple(shape)} "
                             f"from config.json (E={self.num_experts}, H={self.hidden}, I={self.inter})")

    def _per_expert_matrix(self, names: Dict[str, str], rows: int, cols: int, what: str) -> Matrix:
        if "weight_packed" in names:
            if "weight_zero_point" in names:
                raise ValueError(f"{self._at(names['weight_zero_point'])} ({what}): asymmetric compressed-tensors "
                                 "int4 (weight_zero_point) "
                                 "is not supported")
            packed, dt = self.tensor(names["weight_packed"])
            if dt not in ("I32", "U32"):
                raise ValueError(f"{self._at(names['weight_packed'])} must be int32, got {dt}")
            self._check(packed, (rows, cols // 8), what, names["weight_packed"])
            if "weight_scale" not in names:
                raise ValueError(f"{self._at(names['weight_packed'])} ({what}): weight_packed without weight_scale")
            sc, sdt = self.tensor(names["weight_scale"])
            scales = self._to_f32(sc, sdt, names["weight_scale"])
            if scales.ndim != 2 or scales.shape[0] != rows or scales.shape[1] == 0 or cols % scales.shape[1]:
                raise ValueError(f"{self._at(names['weight_scale'])} has shape {tuple(scales.shape)}, "
                                 f"which is no grouping of [{rows}, {cols}]")
            group = cols // scales.shape[1]
            q = np.ascontiguousarray(packed).view(np.uint8).reshape(rows, cols // 2)
            return Matrix("quant", rows, cols, scheme=INT4_SYM, group=group, q=q,
                          scales=np.ascontiguousarray(scales))
        if "weight" not in names:
            key = next(iter(names.values()))  # a sibling (e.g. weight_scale_inv): its shard is the likely one
            raise ValueError(f"{os.path.join(self.path, self.weight_map[key])}: tensor {key.rsplit('.', 1)[0]}.weight "
                             f"is missing ({what}: no weight tensor)")
        w, dt = self.tensor(names["weight"])
        self._check(w, (rows, cols), what, names["weight"])
        if dt == "F8_E4M3":
            if "weight_scale_inv" not in names:
                raise ValueError(f"{self._at(names['weight'])} ({what}): FP8 weight without weight_scale_inv")
            s, sdt = self.tensor(names["weight_scale_inv"])
            bk = self.fp8_block[1]
            if bk in (32, 64, 128) and cols % bk == 0:  # the FP8 block scheme's form: codes + per-row scales, lossless
                scales = fp8_block_scales_per_row(self._to_f32(s, sdt, names["weight_scale_inv"]), rows, cols,
                                                  self.fp8_block, self._at(names['weight_scale_inv']))
                return Matrix("quant", rows, cols, scheme=FP8, group=bk, q=np.ascontiguousarray(w).view(np.uint8),
                              scales=scales)
            vals = dequant_fp8_block(w, self._to_f32(s, sdt, names["weight_scale_inv"]), self.fp8_block,
                                     self._at(names['weight_scale_inv']))
            return Matrix("dense", rows, cols, values=vals)
        if dt == "BF16":
            return Matrix("dense", rows, cols, values=w, bf16=True)
        if dt in ("F16", "F32", "F64"):
            return Matrix("dense", rows, cols, values=w)
        raise ValueError(f"{self._at(names['weight'])} ({what}) has unsupported dtype {dt} (expert weights are "
                         "BF16, F16, F32, F64 or F8_E4M3, or int32 weight_packed)")

    def _to_f32(self, a: np.ndarray, dt: str, key: str) -> np.ndarray:
        if dt == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if dt in ("F16", "F32", "F64"):
            return a.astype(np.float32)
        raise ValueError(f"{self._at(key)} has unsupported scale dtype {dt}")

    def _fused_matrix(self, L: int, e: int, which: str, rows: int, cols: int) -> Matrix:
        names = self.fused[L]
        for k in names:
            if k.endswith("_blocks") or k.endswith("_scales"):
                raise ValueError(f"{self._at(names[k])}: layer {L}: MXFP4 expert blocks are not supported; "
                                 "use a bf16 checkpoint")
            if k.endswith("_bias"):
                b, _ = self.tensor(names[k])
                if np.any(b != 0):
                    raise ValueError(f"{self._at(names[k])}: layer {L}: expert biases are not supported by kt_kernel")
        E, H, I = self.num_experts, self.hidden, self.inter
        for part in ("gate_up_proj", "down_proj"):
            if part not in names:
                other = next(iter(names.values()))
                want = f"{other[:other.rindex('.experts.')]}.experts.{part}"
                raise ValueError(f"{self._shard_of_layer(L)}: tensor {want} is missing (layer {L} has fused experts "
                                 f"without {part})")
        if which == "down":
            d, dt = self.tensor(names["down_proj"])
            self._check(d, (E, I, H), f"layer {L} fused down", names["down_proj"])
            return self._dense(d[e].T, dt, rows, cols, names["down_proj"])
        gu, dt = self.tensor(names["gate_up_proj"])
        self._check(gu, (E, H, 2 * I), f"layer {L} fused gate_up", names["gate_up_proj"])
        if self.model_type == "gpt_oss":  # interleaved columns: gate 0::2, up 1::2
            part = gu[e][:, 0::2] if which == "gate" else gu[e][:, 1::2]
        else:
            part = gu[e][:, :I] if which == "gate" else gu[e][:, I:]
        return self._dense(part.T, dt, rows, cols, names["gate_up_proj"])

    def _dense(self, a: np.ndarray, dt: str, rows: int, cols: int, key: str) -> Matrix:
        if dt not in ("BF16", "F16", "F32", "F64"):
            raise ValueError(f"{self._at(key)}: fused experts of dtype {dt} are not supported (BF16, F16, F32, F64)")
        a = np.ascontiguousarray(a)
        if dt == "BF16":
            return Matrix("dense", rows, cols, values=a, bf16=True)
        return Matrix("dense", rows, cols, values=a)
