"""Training-step cases: one AdaLoRA layer with its allocator, one DoRA layer (dense or bnb 4-bit
base) against LoRA and PEFT, one MoE experts block with LoRA on its expert weights, and a small
random Llama.

A step is forward, backward (into `.grad`, as an optimizer needs) and, for AdaLoRA, the rank
allocator's `update_and_allocate`; no optimizer update, which costs the same for every contender.
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
from torch import nn

from ..adalora import AdaLoRALinear, RankAllocator
from ..integrations.bitsandbytes import to_bnb
from ..ops import quantize_4bit
from ..nn import LoRALinear
from .cases import (BLOCKSIZE, Case, Impl, _call, _linear, _peft, _peft_lora, _randomize_B,
                    forced, has)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOTAL_STEP = 10**6  # a long schedule: every timed step updates sensitivities and re-masks


class _Probe(nn.Module):
    """`loss = <proj(x), gy>`, returned with a `.loss` field so that PEFT AdaLoRA adds its own
    orthogonal regularizer exactly as it does for a transformers model."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x, gy):
        return SimpleNamespace(loss=(self.proj(x) * gy).sum())


def _zero_grads(module, *inputs):
    for p in [*module.parameters(), *inputs]:
        p.grad = None


def adalora_step(N, K, M, r, dtype, device) -> Case:
    case = Case("adalora_step", N, K, M, r, dtype, device,
                flops=4 * M * N * K + 6 * M * r * (K + N), bytes=2 * N * K * torch.finfo(dtype).bits // 8)
    x = torch.randn(M, K, dtype=dtype, device=device).requires_grad_()  # a hidden layer: dX too
    gy = torch.randn(M, N, dtype=dtype, device=device)

    def ours(backend):
        probe = _Probe(AdaLoRALinear.from_linear(_linear(N, K, dtype, device), r=r))
        alloc = RankAllocator(probe, init_r=r, target_r=max(1, r * 2 // 3), total_step=TOTAL_STEP)
        steps = itertools.count()

        def step():
            with forced(backend):
                (probe(x, gy).loss + alloc.orth_reg()).backward()
                alloc.update_and_allocate(next(steps))
            _zero_grads(probe, x)
        return step, 0

    def lora():
        probe = _Probe(LoRALinear.from_linear(_linear(N, K, dtype, device), r=r, lora_alpha=2 * r))

        def step():
            probe(x, gy).loss.backward()
            _zero_grads(probe, x)
        return step, 0

    case.impls = [Impl("peftkern", lambda: ours(None)), Impl("peftkern-lora", lora),
                  Impl("torch-ref", lambda: ours("reference"))]
    if has("peft"):
        case.impls.append(Impl("peft-adalora", lambda: (_peft_adalora_step(N, K, r, x, gy), 0)))
    return case


def _peft_adalora_step(N, K, r, x, gy):
    from peft import AdaLoraConfig
    model = _peft(_Probe(_linear(N, K, x.dtype, x.device)),
                  AdaLoraConfig(init_r=r, target_r=max(1, r * 2 // 3), tinit=0, tfinal=0,
                                total_step=TOTAL_STEP, deltaT=1, target_modules=["proj"]))
    steps = itertools.count()

    def step():
        model.base_model(x, gy).loss.backward()   # AdaLoraModel.forward adds the orth reg
        model.base_model.update_and_allocate(next(steps))
        _zero_grads(model, x)
    return step


# ---- one DoRA layer: fused vs PEFT, and vs LoRA on the same layer ------------------------------


def _dora_layer_case(op, N, K, M, r, dtype, device, four_bit) -> Case:
    """fwd + bwd (dX, dA, dB, dm) of one PEFT layer with `use_dora=True`: through `pk.enable`
    ("peftkern") and PEFT itself, and the same layer as plain LoRA both ways (DoRA's overhead)."""
    case = Case(op, N, K, M, r, dtype, device, flops=6 * M * N * K)
    x = torch.randn(M, K, dtype=dtype, device=device)

    def build(dora, enable):
        from peft import LoraConfig
        lin = _linear(N, K, dtype, device)
        base = nn.Sequential(_bnb_4bit(lin, dtype) if four_bit else lin)
        model = _randomize_B(_peft(base, LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r,
                                                    use_dora=dora)))
        if enable:
            from ..integrations import peft as pk
            pk.enable(model)
        return _call(model, x, "fwd_bwd", N), 0

    if has("peft") and (has("bitsandbytes") or not four_bit):
        case.impls = [Impl("peftkern", lambda: build(True, True)),
                      Impl("peftkern-lora", lambda: build(False, True)),
                      Impl("peft-dora", lambda: build(True, False)),
                      Impl("peft-lora", lambda: build(False, False))]
    return case


def dora_step(N, K, M, r, dtype, device) -> Case:
    return _dora_layer_case("dora_step", N, K, M, r, dtype, device, four_bit=False)


def qdora_step(N, K, M, r, dtype, device) -> Case:
    return _dora_layer_case("qdora_step", N, K, M, r, dtype, device, four_bit=True)


# ---- LoRA on MoE expert weights (PEFT target_parameters) --------------------------------------

MOE_EXPERTS, MOE_TOP_K = 8, 2


class _MoEBlock(nn.Module):
    """transformers' Qwen2-MoE experts (gate_up [E, 2N, K], down [E, K, N]) on fixed routing."""

    def __init__(self, N, K, dtype, device):
        import transformers
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
        cfg = transformers.Qwen2MoeConfig(hidden_size=K, moe_intermediate_size=N,
                                          num_experts=MOE_EXPERTS)
        cfg._experts_implementation = "grouped_mm"
        super().__init__()
        self.experts = Qwen2MoeExperts(cfg).to(device=device, dtype=dtype)
        with torch.no_grad():
            for p in self.experts.parameters():
                p.normal_(std=K ** -0.5)
        self.experts.requires_grad_(False)

    def forward(self, x, index, weights):
        return self.experts(x, index, weights)


def moe_step(N, K, M, r, dtype, device) -> Case:
    """fwd + bwd of an experts block (8 experts, top-2, M tokens) with LoRA on both expert
    projections: through `pk.enable` and PEFT (`target_parameters`), and without LoRA."""
    flops = 2 * 3 * M * MOE_TOP_K * 3 * N * K  # gate_up (2N) + down (N), fwd + 2 bwd
    case = Case("moe_step", N, K, M, r, dtype, device, flops=flops)
    x = torch.randn(M, K, dtype=dtype, device=device).requires_grad_()
    g = torch.Generator(device="cpu").manual_seed(0)
    index = torch.stack([torch.randperm(MOE_EXPERTS, generator=g)[:MOE_TOP_K]
                         for _ in range(M)]).to(device)
    weights = torch.rand(M, MOE_TOP_K, generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(M, K, dtype=dtype, device=device)

    def build(lora, enable):
        block = _MoEBlock(N, K, dtype, device)
        if lora:
            from peft import LoraConfig
            block = _randomize_B(_peft(block, LoraConfig(
                target_modules=[], r=r, lora_alpha=2 * r,
                target_parameters=["experts.gate_up_proj", "experts.down_proj"])))
        if enable:
            from ..integrations import peft as pk
            pk.enable(block)
        params = [p for p in block.parameters() if p.requires_grad]

        def step():
            torch.autograd.grad((block(x, index, weights) * gy).sum(), [x, *params])
        return step, 0

    if has("peft") and has("transformers"):
        case.impls = [Impl("peftkern", lambda: build(True, True)),
                      Impl("peft", lambda: build(True, False)),
                      Impl("no-lora", lambda: build(False, False))]
    return case


# ---- a small random Llama --------------------------------------------------------------------


def _llama(hidden, intermediate, dtype, device):
    import transformers
    heads = max(1, hidden // 64)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=2 if device == "cpu" else 4,
                                   num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                                   vocab_size=4096 if device == "cpu" else 32000,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _bnb_4bit(lin, dtype):
    """A bnb `Linear4bit` (NF4, double quant) holding `lin`'s weight, as
    `BitsAndBytesConfig(load_in_4bit=True)` would build it, without a round trip through disk."""
    import bitsandbytes as bnb
    b4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                           compute_dtype=dtype, quant_type="nf4", device=lin.weight.device)
    b4.weight = to_bnb(quantize_4bit(lin.weight.detach(), "nf4", BLOCKSIZE, True))
    return b4


def _to_bnb_4bit(model, dtype):
    """Swap the decoder's `nn.Linear`s for bnb `Linear4bit`s (`_bnb_4bit`)."""
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child,
                        _bnb_4bit(lin, dtype))
    return model


def model_step(N, K, M, r, dtype, device) -> Case:
    """N x K = intermediate x hidden of the Llama; M tokens per step (sequences of <= 512)."""
    seq = min(M, 512)
    ids = torch.randint(0, 4096, (max(1, M // seq), seq), device=device)
    base = _llama(K, N, dtype, device)
    n_linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear))
    del base
    case = Case("model_step", N, K, M, r, dtype, device, flops=4 * ids.numel() * n_linear)

    def build(four_bit, enable):
        model = _llama(K, N, dtype, device)
        model = _peft_lora(_to_bnb_4bit(model, dtype) if four_bit else model, r, LLAMA_TARGETS)
        if enable:
            from ..integrations import peft as pk
            pk.enable(model)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            _zero_grads(model)
        return step, 0

    if has("peft") and has("transformers") and has("bitsandbytes"):
        case.impls = [Impl("peftkern", lambda: build(True, True)),
                      Impl("peft+bnb", lambda: build(True, False)),
                      Impl("dense-lora", lambda: build(False, False))]
    return case
