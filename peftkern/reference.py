"""The specification: plain-torch reference implementations of everything peftkern computes.

Every kernel is tested against these functions. They favour clarity over speed, run on any
device, and the linear-algebra parts run in whatever dtype they are given (tests use float64).
The 4-bit quantizer is the exception: the format is defined by bitsandbytes' fp32 arithmetic,
so it always computes in fp32, exactly as bitsandbytes 0.50 does on the CPU.

No compute-path module imports this one except the reference backend (`peftkern.ops.backends
.reference`); the formulas both sides need live in `peftkern.formulas`.
"""
from __future__ import annotations

import math

import torch

from . import codes
from .formulas import (adalora_budget, adalora_scaling, adalora_threshold,  # noqa: F401
                       dequantize_absmax, double_quantize, lora_scaling, quantize_blockwise_8bit)

# --------------------------------------------------------------------------------------------
# 4-bit blockwise quantization (bitsandbytes NF4 / FP4)
# --------------------------------------------------------------------------------------------


def quantize_4bit(A: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64):
    """Quantize `A` (any shape, read in row-major order) to packed 4-bit codes.

    Returns `(packed, absmax)`: uint8 `[(n+1)//2]` with the even flat element in the high
    nibble, and fp32 `[ceil(n/blocksize)]`.
    """
    x = A.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks multiply by the reciprocal; the partial tail block divides (bnb's exact ops).
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, x[full:] / tail_max])
    scaled = scaled.clamp(-1, 1)
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bucket = torch.bucketize(scaled, codes.bucket_bounds(quant_type, device=x.device))
    code = codes.bucket_order(quant_type, device=x.device)[bucket].to(torch.uint8)
    packed = (code[0::2] << 4) | code[1::2]
    return packed, absmax


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int64 codes `[numel]` from packed bytes (high nibble first)."""
    b = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:numel]


def dequantize_4bit(packed, absmax, quant_type: str, blocksize: int, shape, dtype=torch.float32):
    """`table[code] * absmax[block]` in fp32, reshaped to `shape` and cast to `dtype`."""
    numel = math.prod(shape)
    code = unpack_codes(packed, numel)
    table = codes.code_table(quant_type, device=packed.device)
    block = torch.arange(numel, device=packed.device) // blocksize
    return (table[code] * absmax[block]).reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------
# LoRA / QLoRA linear (PEFT semantics)
# --------------------------------------------------------------------------------------------


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask=None):
    """`y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`, with dropout only on the LoRA branch.

    `dropout_mask` already holds the 1/(1-p) factor (0 where dropped), shaped like `x`. As in
    PEFT, the LoRA term is in the adapters' dtype (x cast to it) and y in x's.
    """
    xl = x.to(lora_A.dtype)
    xd = xl if dropout_mask is None else xl * dropout_mask
    y = x @ weight.t() + scaling * ((xd @ lora_A.t()) @ lora_B.t())
    return (y if bias is None else y + bias).to(x.dtype)


def lora_linear_backward(dy, x, weight, lora_A, lora_B, scaling, dropout_mask=None):
    """Gradients of `lora_linear` for a frozen base weight: `(dx, dA, dB, dbias)`.

    dX = dY·W + s·(dY·B)·A ⊙ mask;  dA = s·(dY·B)ᵀ·drop(x);  dB = s·dYᵀ·(drop(x)·Aᵀ).
    Leading dims of x/dy are flattened for the parameter gradients.
    """
    K, N = x.shape[-1], dy.shape[-1]
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    m2 = None if dropout_mask is None else dropout_mask.reshape(-1, K)
    xd = x2 if m2 is None else x2 * m2
    xa = xd @ lora_A.t()
    dyb = dy2 @ lora_B
    dx_lora = scaling * (dyb @ lora_A)
    if m2 is not None:
        dx_lora = dx_lora * m2
    dx = (dy2 @ weight + dx_lora).reshape(x.shape)
    dA = scaling * (dyb.t() @ xd)
    dB = scaling * (dy2.t() @ xa)
    dbias = dy2.sum(dim=0)
    return dx, dA, dB, dbias


def qlora_linear(x, packed, absmax, quant_type, blocksize, shape, bias, lora_A, lora_B, scaling,
                 dropout_mask=None):
    """QLoRA forward: the LoRA linear over the dequantized (fp32-decoded) base weight."""
    weight = dequantize_4bit(packed, absmax, quant_type, blocksize, shape, x.dtype)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)


def multi_lora_linear(x, weight, bias, A_stack, B_stack, scalings, adapter_index):
    """Mixed-adapter LoRA: row t gets `s[a]·(x[t]·A[a]ᵀ)·B[a]ᵀ` with `a = adapter_index[t]`
    (-1: none) on top of `x·Wᵀ + bias` (PEFT's `adapter_names` batches, one row per entry)."""
    idx = adapter_index.reshape(-1).long()
    x2 = x.reshape(-1, x.shape[-1])
    a = idx.clamp(min=0)
    xa = torch.einsum("tk,trk->tr", x2, A_stack[a]) * torch.as_tensor(scalings, dtype=x.dtype)[a, None]
    lora = torch.einsum("tr,tnr->tn", xa, B_stack[a]) * (idx >= 0)[:, None]
    y = x2 @ weight.t() + lora
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def expert_lora_linear(x, weight, bias, lora_A, lora_B, scaling, group_sizes):
    """MoE expert linear with per-expert LoRA: rows grouped by expert (`group_sizes[e]` each),
    `y = x·(W[e] + s·B[e]·A[e])ᵀ + bias[e]` (PEFT's target_parameters delta, materialised)."""
    out, start = [], 0
    for e, c in enumerate(group_sizes):
        w = weight[e] if lora_A is None else weight[e] + scaling * (lora_B[e] @ lora_A[e])
        y = x[start:start + c] @ w.t()
        out.append(y if bias is None else y + bias[e])
        start += c
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# DoRA (PEFT semantics)
# --------------------------------------------------------------------------------------------


def dora_weight_norm(weight, lora_A, lora_B, scaling):
    """`‖W + s·B·A‖₂` of every row (DoRA's column norm in PEFT's words: W is [out, in])."""
    return (weight + scaling * (lora_B @ lora_A)).norm(p=2, dim=1)


def dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, dropout_mask=None):
    """PEFT's DoRA: `base(x) + (g − 1)·(drop(x)·Wᵀ) + g·s·(drop(x)·Aᵀ)·Bᵀ` with
    `g = m / ‖W + s·B·A‖_row` (the norm detached). Without dropout: `g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b`."""
    g = magnitude / dora_weight_norm(weight.to(lora_A.dtype), lora_A, lora_B, scaling).detach()
    xd = x if dropout_mask is None else x * dropout_mask
    lora = (xd.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()
    y = x @ weight.t() + (g - 1) * (xd @ weight.t()) + g * (scaling * lora)
    return (y if bias is None else y + bias).to(x.dtype)  # mixed dtypes: as PEFT, y in x's


# --------------------------------------------------------------------------------------------
# AdaLoRA (PEFT semantics)
# --------------------------------------------------------------------------------------------


def adalora_linear(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_mask=None):
    """`y = x·Wᵀ + bias + drop(x)·(A⊙E)ᵀ·Bᵀ · s / (ranknum + 1e-5)`."""
    xd = x if dropout_mask is None else x * dropout_mask
    y = x @ weight.t() + (xd @ (lora_A * lora_E).t() @ lora_B.t()) * scaling / (ranknum + 1e-5)
    return y if bias is None else y + bias


def adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1=0.85, beta2=0.85):
    """One RankAllocator sensitivity step; returns new `(exp_avg_ipt, exp_avg_unc)`."""
    ipt = (p * grad).abs()
    exp_avg_ipt = beta1 * exp_avg_ipt + (1 - beta1) * ipt
    exp_avg_unc = beta2 * exp_avg_unc + (1 - beta2) * (ipt - exp_avg_ipt).abs()
    return exp_avg_ipt, exp_avg_unc


def adalora_triplet_score(score_A, score_E, score_B):
    """Per-rank score `[r]`: `score_E[i] + mean(score_A[i, :]) + mean(score_B[:, i])`.

    Each `score_*` is an element score `exp_avg_ipt * exp_avg_unc` of that parameter.
    """
    return score_E.reshape(-1) + score_A.mean(dim=1) + score_B.mean(dim=0)


def adalora_orth_reg(pairs, weight: float = 0.5):
    """PEFT's orthogonal regularizer for `pairs` of `(A, B)`.

    `w · (Σ ‖A·Aᵀ − I‖_F + Σ ‖Bᵀ·B − I‖_F) / (number of A and B matrices)`: PEFT averages over
    every A and every B, i.e. over 2 × layers (DESIGN.md §4's "mean over layers" is 2× too big).
    """
    norms = []
    for A, B in pairs:
        eye_r = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        norms += [torch.linalg.norm(A @ A.t() - eye_r), torch.linalg.norm(B.t() @ B - eye_r)]
    return weight * torch.stack(norms).mean()
