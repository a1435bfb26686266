"""Hugging Face PEFT backend: PEFT's LoRA layers compute through peftkern's fused ops.

Two routes, same math:
- `enable(model)` switches the LoRA layers, and AdaLoRA's SVD layers, of an existing `PeftModel`
  (over `nn.Linear` and `bnb.nn.Linear4bit`) in place: modules, parameters, names and checkpoints stay PEFT's;
  `disable(model)` undoes it. Use it for models you already have (loaded adapters, QLoRA models).
- `custom_modules()` is a mapping for `LoraConfig._register_custom_module`, so that
  `get_peft_model` builds peftkern-backed layers directly. PEFT marks that hook experimental.
A layer that uses something peftkern does not fuse (DoRA and other LoRA variants, lora_bias,
fan_in_fan_out, custom dropout, other base layers) keeps PEFT's own forward: `enable` logs one
line naming those layers and why. At call time, anything PEFT handles specially (adapters
disabled, merged weights, several active adapters, `adapter_names` batches) also goes to PEFT.
"""
from __future__ import annotations

import logging
import types

import torch
from peft.tuners.lora import layer as lora_layer
from torch import nn

from .. import ops
from ..format import QuantizedWeight

log = logging.getLogger("peftkern")
_ORIG = "_peftkern_orig_forward"


def _linear4bit_type():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def unsupported_reason(layer) -> str | None:
    """Why `layer` (a PEFT LoRA layer) cannot run fused, or None when it can."""
    base = layer.get_base_layer()
    l4 = _linear4bit_type()
    if not (type(base) is nn.Linear or (l4 is not None and isinstance(base, l4))):
        return f"base layer {type(base).__name__} is not nn.Linear or bnb Linear4bit"
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(names) != 1:
        return f"{len(names)} active LoRA adapters (peftkern fuses exactly one)"
    name = names[0]
    if name in getattr(layer, "lora_variant", {}):
        return f"LoRA variant {type(layer.lora_variant[name]).__name__} (e.g. DoRA)"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def fused_forward(layer, x: torch.Tensor, peft_forward, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA forward through peftkern; `peft_forward` handles every case it does not fuse."""
    if args or kwargs or layer.disable_adapters or layer.merged or unsupported_reason(layer):
        return peft_forward(x, *args, **kwargs)
    name = next(a for a in layer.active_adapters if a in layer.lora_A)
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    A, B, s = _low_rank_factors(layer, name)
    base = layer.get_base_layer()
    if type(base) is nn.Linear:
        if x.dtype != base.weight.dtype:  # PEFT would fail or autocast here: let it decide
            return peft_forward(x, *args, **kwargs)
        return ops.lora_linear(x, base.weight, base.bias, A.to(x.dtype), B.to(x.dtype), s, p)
    # bnb Linear4bit: compute in its compute_dtype, return in the input's dtype, as bnb does.
    q = QuantizedWeight.from_bnb(base.weight, check=False)
    cd = base.compute_dtype or x.dtype
    bias = None if base.bias is None else base.bias.to(cd)
    return ops.qlora_linear(x.to(cd), q, bias, A.to(cd), B.to(cd), s, p).to(x.dtype)


def _low_rank_factors(layer, name):
    """`(A, B, scaling)` with `y += s·(x·Aᵀ)·Bᵀ`: LoRA's weights, or AdaLoRA's `A⊙E` and
    `s / (ranknum + 1e-5)` (PEFT's SVDLinear)."""
    if hasattr(layer, "lora_E"):
        ranknum = float(layer.ranknum[name])
        return (layer.lora_A[name] * layer.lora_E[name], layer.lora_B[name],
                layer.scaling[name] / (ranknum + 1e-5))
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def _is_lora_layer(m) -> bool:
    # PEFT's LoRA layers and AdaLoRA's SVD layers (which AdaLoRA's custom-module hook ignores)
    from peft.tuners.adalora.layer import AdaLoraLayer
    return (isinstance(m, (lora_layer.LoraLayer, AdaLoraLayer)) and isinstance(m, nn.Module)
            and hasattr(m, "lora_A"))


def _check_peft_model(model) -> None:
    from peft import PeftModel
    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a peft.PeftModel (from get_peft_model or "
                        f"PeftModel.from_pretrained), got {type(model).__name__}")


def enable(model) -> int:
    """Make every fusable PEFT LoRA layer of `model` compute through peftkern; returns how many.

    Modules and parameters are untouched (only their forward changes), so `save_pretrained`,
    optimizers and state dicts behave exactly as before.
    """
    _check_peft_model(model)
    switched, skipped = 0, []
    for name, m in model.named_modules():
        if not _is_lora_layer(m) or _ORIG in m.__dict__:
            continue
        reason = unsupported_reason(m)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
            continue
        peft_forward = m.forward
        setattr(m, _ORIG, peft_forward)
        m.forward = types.MethodType(lambda self, x, *a, _pf=peft_forward, **k:
                                     fused_forward(self, x, _pf, *a, **k), m)
        switched += 1
    if skipped:
        log.warning("peftkern: %d LoRA layer(s) keep PEFT's forward: %s", len(skipped), "; ".join(skipped))
    return switched


def disable(model) -> int:
    """Undo `enable`: every switched layer gets PEFT's forward back; returns how many."""
    _check_peft_model(model)
    restored = 0
    for m in model.modules():
        if _ORIG in m.__dict__:
            del m.forward
            delattr(m, _ORIG)
            restored += 1
    return restored


# ---- the PEFT-native route: LoraConfig._register_custom_module ------------------------------------


class LoraLinear(lora_layer.Linear):
    """PEFT's LoRA `Linear`, computing through peftkern (for `_register_custom_module`)."""

    def forward(self, x, *args, **kwargs):
        return fused_forward(self, x, super().forward, *args, **kwargs)


def custom_modules() -> dict:
    """`{nn.Linear: ..., bnb.nn.Linear4bit: ...}` for `LoraConfig._register_custom_module`."""
    mapping = {nn.Linear: LoraLinear}
    if _linear4bit_type() is not None:
        from peft.tuners.lora import bnb as lora_bnb

        class LoraLinear4bit(lora_bnb.Linear4bit):
            """PEFT's LoRA `Linear4bit`, computing through peftkern."""

            def forward(self, x, *args, **kwargs):
                return fused_forward(self, x, super().forward, *args, **kwargs)

        mapping[_linear4bit_type()] = LoraLinear4bit
    return mapping
