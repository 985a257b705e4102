"""kt_kernel.hf.offload_experts on tiny random Hugging Face MoE models (built
from configs, nothing downloaded): logits match the unmodified model within
the format's budget, and BF16 greedy generation matches the BF16 model.

On the greedy check: tiny random models can have near-ties between the top
two logits, where any summation-order difference may flip the argmax. So the
test teacher-forces both models on the reference sequence, requires the
logits to agree within the budget at every step, and requires the argmax to
agree at every step whose reference top-2 margin exceeds twice the largest
logit difference seen; it also runs generate() and requires identical tokens
up to the first such near-tie (in practice: all 16).

The logits check runs both models with the reference's router decisions
(hooks), because one flipped top-k choice on a near-tie in a random tiny
router moves the logits by more than any format's budget (seen: Mixtral,
BF16, 0.03 free running against 0.004 per block); free running is checked
against twice the budget."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kt_kernel  # noqa: E402
import kt_kernel.hf  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False)


def _configs():
    t = transformers
    out = {
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=64,
                                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
        "mixtral": lambda: t.MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=8,
                                           num_experts_per_tok=2),
        "deepseek_v3": lambda: t.DeepseekV3Config(**COMMON, intermediate_size=128, moe_intermediate_size=64,
                                                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                                  n_group=2, topk_group=1, first_k_dense_replace=0,
                                                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=64,
                                              shared_expert_intermediate_size=64, num_experts=8,
                                              num_experts_per_tok=2),
        "olmoe": lambda: t.OlmoeConfig(**COMMON, intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    }
    return out


MODELS = list(_configs())
BUDGET = {"BF16": 0.02, "AMXINT8": 0.06}


def _model(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = _configs()[name]()
    m = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    return m


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _same_routing(ref, ours):
    """Forward hooks that make `ours` reuse the router decisions `ref` made (call by call), so that a
    near-tie in a random tiny router cannot flip an expert choice and amplify a rounding difference."""
    seen = []
    hooks = []
    mods = dict(ours.named_modules())
    for n, m in ref.named_modules():
        if n.endswith("mlp.gate"):
            m2 = mods[n]
            hooks.append(m.register_forward_hook(lambda mod, inp, out: seen.append(out)))
            hooks.append(m2.register_forward_hook(lambda mod, inp, out: seen.pop(0)))
    assert len(hooks) == 4
    return hooks


@pytest.mark.parametrize("method", ["BF16", "AMXINT8"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_within_budget(name, method):
    ref = _model(name)
    ours = copy.deepcopy(ref)
    originals = [copy.deepcopy(l.mlp.experts) for l in ref.model.layers]
    wrappers = kt_kernel.hf.offload_experts(ours, method=method, cpuinfer_threads=2)
    assert len(wrappers) == 2 and [w.layer_idx for w in wrappers] == [0, 1]
    assert not any(n.endswith("gate_up_proj") for n, _ in ours.named_parameters())
    # Each MoE block's experts, on the same inputs: the format's budget.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 64, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(20)])
    w = torch.rand(20, 2, generator=g)
    with torch.no_grad():
        for layer, orig in zip(ours.model.layers, originals):
            assert _rel(layer.mlp.experts(x, idx, w), orig(x, idx, w)) < BUDGET[method]
    # End to end, same routing decisions: the logits within the format's budget.
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    hooks = _same_routing(ref, ours)
    with torch.no_grad():
        b, a = ref(ids).logits, ours(ids).logits
    for h in hooks:
        h.remove()
    err = _rel(a, b)
    assert 0 < err < BUDGET[method], err
    # Free running (a router may flip on a near-tie): within twice the budget.
    with torch.no_grad():
        assert _rel(ours(ids).logits, b) < 2 * BUDGET[method]


@pytest.mark.parametrize("name", MODELS)
def test_bf16_greedy_generation_matches(name):
    ref = _model(name, torch.bfloat16, seed=3)
    ours = copy.deepcopy(ref)
    kt_kernel.hf.offload_experts(ours, method="BF16", cpuinfer_threads=2)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=16)
    with torch.no_grad():
        seq_ref = ref.generate(prompt, **kw)
        seq_ours = ours.generate(prompt, **kw)
        la = ref(seq_ref).logits[0, prompt.shape[1] - 1:-1].float()
        lb = ours(seq_ref).logits[0, prompt.shape[1] - 1:-1].float()
    assert _rel(lb, la) < BUDGET["BF16"]
    bound = float((la - lb).abs().max())
    top2 = la.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    decided = margin > 2 * bound
    assert torch.equal(la.argmax(-1)[decided], lb.argmax(-1)[decided])
    gen_ref, gen_ours = seq_ref[0, prompt.shape[1]:], seq_ours[0, prompt.shape[1]:]
    n_safe = int(decided.long().cumprod(0).sum())  # steps before the first near-tie
    assert torch.equal(gen_ref[:n_safe], gen_ours[:n_safe])
    if n_safe == 16:
        assert torch.equal(gen_ref, gen_ours)


def test_rejects_models_without_moe_blocks():
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()}, intermediate_size=64)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="no MoE block"):
        kt_kernel.hf.offload_experts(m)
