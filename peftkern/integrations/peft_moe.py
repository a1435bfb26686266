"""PEFT's `target_parameters` LoRA on mixture-of-experts weights, through `ops.moe`.

PEFT wraps each targeted expert parameter in a `ParamWrapper` (nested when several parameters of
one experts module are targeted) and, on every forward, parametrizes it to `W + s·B·A` for every
expert before the experts module runs. The fused route keeps the parameters as they are and runs
the experts module's forward with the LoRA factors applied per expert group instead
(`ops.moe.experts_forward`). It takes transformers' experts modules
(`use_experts_implementation`: `gate_up_proj` / `up_proj` and `down_proj`, 3-D).
"""
from __future__ import annotations

from peft.tuners.lora import layer as lora_layer

from ..ops import moe

PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def chain(layer):
    """`(wrappers, experts)`: the nested ParamWrappers from `layer` inward and the module they
    wrap."""
    wrappers = []
    while isinstance(layer, lora_layer.ParamWrapper):
        wrappers.append(layer)
        layer = layer.base_layer
    return wrappers, layer


def static_reason(layer) -> str | None:
    """Why the expert LoRA of this outermost ParamWrapper cannot run fused, or None."""
    wrappers, experts = chain(layer)
    if not all(hasattr(experts, a) for a in ("num_experts", "has_gate", "down_proj")) or \
            not hasattr(experts, "_apply_gate" if experts.has_gate else "act_fn"):
        return f"target_parameters on {type(experts).__name__} (not a transformers experts module)"
    for w in wrappers:
        if w.parameter_name not in PROJECTIONS or w.get_param().dim() != 3:
            return f"target_parameters {w.parameter_name!r} (not a 3-D expert projection)"
        if w.lora_variant:
            return "target_parameters with a LoRA variant"
    return None


def call_reason(layer, args, kwargs) -> str | None:
    """Why this call goes to PEFT, or None."""
    wrappers, experts = chain(layer)
    if kwargs or len(args) != 2:
        return "experts called with other arguments than (top_k_index, top_k_weights)"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism"
    for w in wrappers:
        if w.disable_adapters or w.merged:
            return "adapters disabled or merged"
        if len([a for a in w.active_adapters if a in w.lora_A]) > 1:
            return "several active adapters on expert weights"
    return None


def factors(wrapper):
    """`{parameter name: (A [E, r, K], B [E, N, r], scaling)}` of the wrapper's active adapter
    (views of PEFT's `lora_A [r·E, K]` and `lora_B [N, r·E]`, as its `get_delta_factors`)."""
    names = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not names:
        return {}
    E = wrapper.num_experts
    A = wrapper.lora_A[names[0]].weight
    B = wrapper.lora_B[names[0]].weight
    return {wrapper.parameter_name: (A.reshape(E, -1, A.shape[-1]),
                                     B.reshape(B.shape[0], -1, E).permute(2, 0, 1),
                                     wrapper.scaling[names[0]])}


def forward(layer, hidden_states, top_k_index, top_k_weights):
    wrappers, experts = chain(layer)
    loras = {}
    for w in wrappers:
        loras.update(factors(w))
    return moe.experts_forward(experts, loras, hidden_states, top_k_index, top_k_weights)
