"""Small checkpoints in every input format the converter reads, written with
the `safetensors` and `gguf` packages (test-only dependencies), plus the
exact float64 expert weights each one holds (the reference's weights).

Each writer returns (path, gate [L][E, I, H], up [L][E, I, H], down [L][E, H, I])
as float64 dequantised source values.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from kt_kernel.weights.common import FP8_E4M3


def _rand(rng, shape, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def dense_experts(num_layers, E, H, I, seed=0):
    rng = np.random.default_rng(seed)
    return ([_rand(rng, (E, I, H), H) for _ in range(num_layers)],
            [_rand(rng, (E, I, H), H) for _ in range(num_layers)],
            [_rand(rng, (E, H, I), I) for _ in range(num_layers)])


def _config(style, E, H, I, k, extra=None):
    if style == "mixtral":
        c = {"model_type": "mixtral", "num_local_experts": E, "hidden_size": H, "intermediate_size": I,
             "num_experts_per_tok": k}
    elif style == "qwen3_moe":
        c = {"model_type": "qwen3_moe", "num_experts": E, "hidden_size": H, "moe_intermediate_size": I,
             "intermediate_size": 4 * I, "num_experts_per_tok": k}
    elif style == "gpt_oss":
        c = {"model_type": "gpt_oss", "num_local_experts": E, "hidden_size": H, "intermediate_size": I,
             "num_experts_per_tok": k}
    elif style == "qwen3_vl_moe":
        c = {"model_type": "qwen3_vl_moe", "text_config": {"num_experts": E, "hidden_size": H,
                                                            "moe_intermediate_size": I, "num_experts_per_tok": k}}
    else:  # deepseek_v3 / kimi_k2 / glm4_moe style
        c = {"model_type": "deepseek_v3", "n_routed_experts": E, "hidden_size": H, "moe_intermediate_size": I,
             "intermediate_size": 4 * I, "num_experts_per_tok": k, "first_k_dense_replace": 0}
    c.update(extra or {})
    return c


def _to_torch(a, dtype):
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.to(dtype)


def _as_f64(t):
    return t.to(torch.float64).numpy()


def write_hf(root, style="deepseek", dtype=torch.bfloat16, num_layers=2, E=4, H=128, I=256, k=2, seed=0,
             prefix="model.", shards=2):
    """A Hugging Face checkpoint with per-expert or fused expert tensors."""
    os.makedirs(root, exist_ok=True)
    g, u, d = dense_experts(num_layers, E, H, I, seed)
    tensors, G, U, D = {}, [], [], []
    for L in range(num_layers):
        gt, ut, dt = _to_torch(g[L], dtype), _to_torch(u[L], dtype), _to_torch(d[L], dtype)
        G.append(_as_f64(gt)), U.append(_as_f64(ut)), D.append(_as_f64(dt))
        if style in ("gpt_oss", "qwen3_vl_moe"):
            if style == "gpt_oss":
                gu = torch.empty((E, H, 2 * I), dtype=dtype)
                gu[:, :, 0::2] = gt.transpose(1, 2)
                gu[:, :, 1::2] = ut.transpose(1, 2)
            else:
                gu = torch.cat([gt.transpose(1, 2), ut.transpose(1, 2)], dim=2)
            tensors[f"{prefix}layers.{L}.mlp.experts.gate_up_proj"] = gu.contiguous()
            tensors[f"{prefix}layers.{L}.mlp.experts.down_proj"] = dt.transpose(1, 2).contiguous()
            if style == "gpt_oss":
                tensors[f"{prefix}layers.{L}.mlp.experts.gate_up_proj_bias"] = torch.zeros((E, 2 * I), dtype=dtype)
            continue
        names = ("w1", "w3", "w2") if style == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        block = "block_sparse_moe" if style == "mixtral" else "mlp"
        for e in range(E):
            for n, t in zip(names, (gt[e], ut[e], dt[e])):
                tensors[f"{prefix}layers.{L}.{block}.experts.{e}.{n}.weight"] = t.contiguous()
        tensors[f"{prefix}layers.{L}.self_attn.q_proj.weight"] = torch.zeros((8, H), dtype=dtype)
    _save_sharded(root, tensors, shards)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(_config(style, E, H, I, k), f)
    return root, G, U, D


def _save_sharded(root, tensors, shards):
    keys = sorted(tensors)
    if shards <= 1:
        save_file(tensors, os.path.join(root, "model.safetensors"))
        return
    wm = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, os.path.join(root, fn))
        wm.update({k: fn for k in part})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)


def write_hf_fp8(root, num_layers=2, E=4, H=256, I=256, k=2, seed=0):
    """DeepSeek-style FP8 e4m3 weights with weight_scale_inv 128x128 block scales."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors, G, U, D = {}, [], [], []
    for L in range(num_layers):
        mats = {}
        for which, (N, K) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            codes = rng.integers(0, 256, size=(E, N, K), dtype=np.uint8)
            codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaN codes
            scale = (rng.random((E, -(-N // 128), -(-K // 128))) * 0.01 + 0.001).astype(np.float32)
            vals = FP8_E4M3[codes].astype(np.float64) * np.repeat(np.repeat(scale, 128, 1)[:, :N], 128, 2)[:, :, :K]
            mats[which] = vals
            for e in range(E):
                base = f"model.layers.{L}.mlp.experts.{e}.{which}_proj"
                tensors[base + ".weight"] = torch.from_numpy(codes[e].copy()).view(torch.float8_e4m3fn)
                tensors[base + ".weight_scale_inv"] = torch.from_numpy(scale[e].copy())
        G.append(mats["gate"]), U.append(mats["up"]), D.append(mats["down"])
    _save_sharded(root, tensors, 1)
    cfg = _config("deepseek", E, H, I, k, {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                   "weight_block_size": [128, 128]}})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(cfg, f)
    return root, G, U, D


def ct_pack_int4(values_signed: np.ndarray) -> np.ndarray:
    """compressed-tensors pack_to_int32: int4 values in [-8, 7] stored as value + 8, eight per int32,
    element i of each word at bits 4i (packed along the last dim)."""
    u = (values_signed.astype(np.int64) + 8).astype(np.uint32)
    N, K = u.shape
    u = u.reshape(N, K // 8, 8)
    word = np.zeros((N, K // 8), dtype=np.uint32)
    for i in range(8):
        word |= u[:, :, i] << np.uint32(4 * i)
    return word.view(np.int32)


def write_hf_ct_int4(root, num_layers=2, E=4, H=128, I=256, k=2, group=32, seed=0):
    """compressed-tensors pack-quantized int4 (Kimi-K2-Thinking style): weight_packed, weight_scale, weight_shape."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors, G, U, D = {}, [], [], []
    for L in range(num_layers):
        mats = {}
        for which, (N, K) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            vals = rng.integers(-8, 8, size=(E, N, K))
            scale = torch.from_numpy((rng.random((E, N, K // group)) * 0.02 + 0.005).astype(np.float32)).to(torch.bfloat16)
            s64 = scale.to(torch.float64).numpy()
            mats[which] = vals * np.repeat(s64, group, axis=2)
            for e in range(E):
                base = f"model.layers.{L}.mlp.experts.{e}.{which}_proj"
                tensors[base + ".weight_packed"] = torch.from_numpy(ct_pack_int4(vals[e]))
                tensors[base + ".weight_scale"] = scale[e].contiguous()
                tensors[base + ".weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
        G.append(mats["gate"]), U.append(mats["up"]), D.append(mats["down"])
    _save_sharded(root, tensors, 2)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"weights": {"num_bits": 4, "symmetric": True, "group_size": group,
                                                    "strategy": "group", "type": "int"}, "targets": ["Linear"]}}}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(_config("deepseek", E, H, I, k, {"quantization_config": qc}), f)
    return root, G, U, D


def _craft_kquant(rng, qtype, rows, cols):
    """Random but valid K-quant blocks (the gguf package cannot quantise K-quants): random bytes with
    small finite fp16 super-block scales."""
    import gguf

    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // bs
    b = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    d = np.full((nb,), 0.002, dtype=np.float16).view(np.uint8).reshape(nb, 2)
    dmin = np.full((nb,), 0.001, dtype=np.float16).view(np.uint8).reshape(nb, 2)
    Q = gguf.GGMLQuantizationType
    if qtype == Q.Q6_K:
        b[:, ts - 2:] = d
    else:  # Q4_K, Q5_K: d, dmin first
        b[:, 0:2] = d
        b[:, 2:4] = dmin
    return b.reshape(rows, cols // bs * ts)


def write_gguf(path, qtype_name, num_layers=2, E=4, H=256, I=256, k=2, seed=0):
    """blk.{L}.ffn_{gate,up,down}_exps.weight in one ggml type; returns the dequantised values."""
    import gguf
    from gguf import quants

    Q = gguf.GGMLQuantizationType
    qt = getattr(Q, qtype_name)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    w.add_embedding_length(H)
    w.add_expert_feed_forward_length(I)
    G, U, D = [], [], []
    for L in range(num_layers):
        mats = {}
        for which, (N, K) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            if qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
                raw = np.stack([_craft_kquant(rng, qt, N, K) for _ in range(E)])
            else:
                dense = _rand(rng, (E, N, K), K)
                raw = quants.quantize(dense, qt) if qt != Q.F32 else dense
            vals = quants.dequantize(raw, qt).astype(np.float64).reshape(E, N, K)
            mats[which] = vals
            w.add_tensor(f"blk.{L}.ffn_{which}_exps.weight", raw, raw_dtype=qt)
        G.append(mats["gate"]), U.append(mats["up"]), D.append(mats["down"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, G, U, D
