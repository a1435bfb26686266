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
    return torch.nn.functional.linear(lora_input(x, lora_A, mask), lora_A)  # x·Aᵀ in one call


def add_lora(y, L, R2, scaling, mask=None, out_dtype=None):
    """`y + s·(L·R2) [⊙ mask]`, added in the widest dtype involved and rounded once to `out_dtype`
    (default y's). `y` must be a fresh result the caller owns (it may be updated in place). `L`,
    `R2` are in the LoRA dtype: fp32 adapters on a 16-bit base stay fp32."""
    out_dtype = out_dtype or y.dtype
    if mask is None and y.dtype == L.dtype == out_dtype:  # one op, one rounding
        if torch.is_grad_enabled() and (y.requires_grad or L.requires_grad or R2.requires_grad):
            return torch.addmm(y, L, R2, alpha=scaling)  # out of place: a cheaper backward
        return y.addmm_(L, R2, alpha=scaling)  # y is the caller's fresh result: no new buffer
    # the product too in the wide dtype: L and R2 are small (rank r), and a 16-bit L·R2 would
    # round twice more (the product, then s·) before the wide sum
    wide = torch.promote_types(torch.promote_types(y.dtype, L.dtype), out_dtype)
    return (y.to(wide) + dropped(scaling * (L.to(wide) @ R2.to(wide)), mask)).to(out_dtype)


def scaled_output(z, scale, bias, out_dtype):
    """DoRA's epilogue: `z ⊙ scale + bias` (scale per output feature), computed in the widest
    dtype involved and rounded once to `out_dtype`. Differentiable (the training path uses it)."""
    wide = torch.promote_types(z.dtype, scale.dtype)
    y = z.to(wide) * scale.to(wide)
    return (y if bias is None else y + bias.to(wide)).to(out_dtype)


def add_scaled_lora(y, xa, lora_B, scaling, scale, bias, out_dtype, keep_z=False):
    """`(y + s·xa·Bᵀ) ⊙ scale + bias` for a fresh base result `y` without its bias: the forward's
    last step when a scale is given (the base and LoRA terms summed wide, then scaled). Returns
    `(out, z or None)`: z, the pre-scale result in `out_dtype`, when `keep_z`."""
    z = add_lora(y, xa, lora_B.t(), scaling, out_dtype=torch.promote_types(y.dtype, xa.dtype))
    return scaled_output(z, scale, bias, out_dtype), z.to(out_dtype) if keep_z else None


def scale_grad(dy, z):
    """`Σ_m dy[m, n]·z[m, n]` in fp32: the gradient of a per-output-feature scale."""
    return torch.linalg.vecdot(dy.float(), z.float(), dim=0)


def add_grouped_lora(y, x, A, B, scalings, adapter_index, table=None):
    """`y + s[a]·x·A[a]ᵀ·B[a]ᵀ` per row (adapter a = adapter_index[row], -1: none), out of place
    and differentiable: the rows sorted by adapter, one product pair per adapter present, summed
    with y in the widest dtype and rounded once. (Reads the row counts: a host sync.)"""
    n, N = A.shape[0], B.shape[1]
    key = torch.where(adapter_index < 0, n, adapter_index.long())
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n + 1).tolist()
    xs = x[order].to(A.dtype)
    pieces, start = [], 0
    for a, c in enumerate(counts[:n]):
        if c:
            pieces.append(((xs[start:start + c] @ A[a].t()) * scalings[a]) @ B[a].t())
        start += c
    pieces.append(xs.new_zeros(counts[n], N))
    lora = torch.cat(pieces)[torch.argsort(order)]
    wide = torch.promote_types(y.dtype, lora.dtype)
    return (y.to(wide) + lora.to(wide)).to(y.dtype)


def packed_bytes(data):
    return data.reshape(-1).view(torch.uint8)


def offset_1d(offset):
    return None if offset is None else offset.reshape(1)


def quant_type_id(quant_type):
    return codes.QUANT_TYPE_ID[quant_type]
