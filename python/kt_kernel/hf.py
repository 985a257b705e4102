"""Hugging Face transformers integration: run a model's routed experts on kt_kernel.

    import transformers, kt_kernel.hf
    model = transformers.AutoModelForCausalLM.from_pretrained(...)
    kt_kernel.hf.offload_experts(model, method="AMXINT4")   # in place; returns the wrappers
    model.generate(...)

Needs transformers >= 5 (`pip install kt_kernel[hf]`), whose MoE blocks keep
their routed experts in one module (`block.experts`) with fused weights
`gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`, called as
`experts(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])`.
That module is replaced by `KTExperts`, which packs the weights into a
KTMoEWrapper (the original tensors are released) and forwards each call to
it. Routers, shared experts, attention and everything else stay in PyTorch.
Covered: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3 (its router
already applies routed_scaling_factor to the weights it passes).
"""

from __future__ import annotations

import re
from typing import Any, List, Optional

from .wrapper import KTMoEWrapper

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _torch():
    import torch

    return torch


def _make_module_class():
    torch = _torch()

    class KTExperts(torch.nn.Module):
        """Routed experts of one MoE block, computed by a KTMoEWrapper on the CPU."""

        def __init__(self, wrapper: KTMoEWrapper):
            super().__init__()
            self.wrapper = wrapper
            self.num_experts = wrapper.num_experts

        def forward(self, hidden_states, top_k_index, top_k_weights):
            x = hidden_states.contiguous()
            stream = 0
            if x.is_cuda:
                stream = torch.cuda.current_stream(x.device).cuda_stream
            y = self.wrapper.forward(x, top_k_index.contiguous(), top_k_weights.contiguous(), stream)
            # A persistent buffer (capture batch sizes) is reused by the next call: hand out a copy.
            return y.clone() if len(self.wrapper._out_cache) else y

        def extra_repr(self) -> str:
            w = self.wrapper
            return (f"layer={w.layer_idx}, experts={w.num_experts}, top_k={w.num_experts_per_tok}, "
                    f"hidden={w.hidden_size}, intermediate={w.moe_intermediate_size}, method={w.method}")

    return KTExperts


def _is_fused_experts(m: Any) -> bool:
    gu, d = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (gu is not None and d is not None and getattr(gu, "dim", lambda: 0)() == 3 and d.dim() == 3
            and not getattr(m, "is_transposed", False) and getattr(m, "is_concatenated", True)
            and not getattr(m, "has_bias", False))


def offload_experts(model: Any, method: str = "BF16", *, cpuinfer_threads: Optional[int] = None,
                    threadpool_count: int = 1, group_size: Optional[int] = None, zero_point: bool = False,
                    max_deferred_experts_per_token: Optional[int] = None) -> List[KTMoEWrapper]:
    """Replaces the routed experts of every MoE block of `model` (in place) by kt_kernel.

    method: a KTMoEWrapper method (BF16, AMXINT8, AMXINT4, ...). Returns the
    wrappers in layer order (e.g. for `enable_activation_counting`). Raises
    ValueError if the model has no supported MoE block or uses an activation
    other than SiLU.
    """
    torch = _torch()
    cls = _make_module_class()
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    act = getattr(text_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"offload_experts: experts use activation {act!r}; kt_kernel computes SiLU(gate) * up")
    top_k = getattr(text_config, "num_experts_per_tok", None)
    targets = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is not None and _is_fused_experts(experts):
            targets.append((name, module, experts))
    if not targets:
        raise ValueError("offload_experts: found no MoE block with fused routed experts (gate_up_proj/down_proj); "
                         "transformers >= 5 is needed")
    wrappers = []
    for n, (name, block, experts) in enumerate(targets):
        m = _LAYER.search(name)
        layer_idx = int(m.group(1)) if m else n
        E, I2, H = experts.gate_up_proj.shape
        inter = I2 // 2
        k = top_k or getattr(getattr(block, "gate", None), "top_k", None)
        if k is None:
            raise ValueError(f"offload_experts: cannot tell top-k for {name}")
        with torch.no_grad():
            gu = experts.gate_up_proj.detach().to("cpu")
            if gu.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                gu = gu.float()
            gate = gu[:, :inter, :].contiguous()
            up = gu[:, inter:, :].contiguous()
            down = experts.down_proj.detach().to("cpu").to(gu.dtype).contiguous()
        wr = KTMoEWrapper(layer_idx=layer_idx, num_experts=E, num_experts_per_tok=int(k), hidden_size=H,
                          moe_intermediate_size=inter, gpu_experts_mask=None, cpuinfer_threads=cpuinfer_threads,
                          threadpool_count=threadpool_count, weight_path=None, chunked_prefill_size=8192,
                          # deferred experts land in the next MoE layer's output: none after the last
                          max_deferred_experts_per_token=(max_deferred_experts_per_token if n < len(targets) - 1
                                                          else 0),
                          method=method,
                          group_size=group_size, zero_point=zero_point)
        wr.load_weights_from_tensors(gate, up, down)
        del gate, up, down, gu
        block.experts = cls(wr)
        wrappers.append(wr)
    return wrappers
