"""LoRA-branch arithmetic every backend shares (the same operations, so results agree).

The LoRA branch runs in the adapters' dtype on the layer's own input (PEFT casts x to it); the
base result and the LoRA term are added in the widest dtype involved and rounded once.
"""
from __future__ import annotations

import torch

from ... import codes


def dropped(x, mask):
    return x if mask is None else x * mask


def lora_input(x, lora_A, mask):
    """`drop(x)` in the LoRA dtype (PEFT casts x to the adapter's dtype)."""
    return dropped(x if x.dtype == lora_A.dtype else x.to(lora_A.dtype), mask)


def lora_xa(x, lora_A, mask):
    """The small first LoRA product `drop(x)·Aᵀ` [M, r], saved for the backward."""
    return lora_input(x, lora_A, mask) @ lora_A.t()


def add_lora(y, L, R2, scaling, mask=None, out_dtype=None):
    """`y + s·(L·R2) [⊙ mask]`, added in the widest dtype involved and rounded once to `out_dtype`
    (default y's). `y` must be a fresh result the caller owns (it may be updated in place). `L`,
    `R2` are in the LoRA dtype: fp32 adapters on a 16-bit base stay fp32."""
    out_dtype = out_dtype or y.dtype
    if mask is None and y.dtype == L.dtype == out_dtype:  # one op, one rounding
        if torch.is_grad_enabled() and (y.requires_grad or L.requires_grad or R2.requires_grad):
            return torch.addmm(y, L, R2, alpha=scaling)  # out of place: a cheaper backward
        return y.addmm_(L, R2, alpha=scaling)  # y is the caller's fresh result: no new buffer
    wide = torch.promote_types(torch.promote_types(y.dtype, L.dtype), out_dtype)
    return (y.to(wide) + dropped(scaling * (L @ R2), mask).to(wide)).to(out_dtype)


def scaled_output(z, scale, bias, out_dtype):
    """DoRA's epilogue: `z ⊙ scale + bias` (scale per output feature), computed in the widest
    dtype involved and rounded once to `out_dtype`. Differentiable (the training path uses it)."""
    wide = torch.promote_types(z.dtype, scale.dtype)
    y = z.to(wide) * scale.to(wide)
    return (y if bias is None else y + bias.to(wide)).to(out_dtype)


def add_scaled_lora(y, xa, lora_B, scaling, scale, bias, out_dtype):
    """`(y + s·xa·Bᵀ) ⊙ scale + bias` for a fresh base result `y` without its bias: the forward's
    last step when a scale is given (the base and LoRA terms summed wide, then scaled)."""
    z = add_lora(y, xa, lora_B.t(), scaling, out_dtype=torch.promote_types(y.dtype, xa.dtype))
    return scaled_output(z, scale, bias, out_dtype)


def packed_bytes(data):
    return data.reshape(-1).view(torch.uint8)


def offset_1d(offset):
    return None if offset is None else offset.reshape(1)


def quant_type_id(quant_type):
    return codes.QUANT_TYPE_ID[quant_type]
