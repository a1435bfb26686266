"""AdaLoRA allocator ops: the fused sensitivity update and the orthogonal regularizer.

They run outside the model's forward (after the optimizer step), so they are plain functions
rather than custom ops; the allocator (`peftkern.adalora.RankAllocator`) calls them.
"""
from __future__ import annotations

import functools

import torch

from ..validation import (FLOAT_DTYPES, check_int_in, check_probability, check_real,
                          check_tensor)
from .backends import MODULES
from .dispatch import _plan


_REAL = FLOAT_DTYPES + (torch.float64,)  # the allocator runs on a float64 PEFT model too


def check_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2, rank_dim) -> None:
    """A 2-D float parameter, its gradient and its two EMAs: one shape, dtype and device."""
    check_tensor("p", p, ndim=2, dtypes=_REAL)
    for name, t in (("grad", grad), ("exp_avg_ipt", exp_avg_ipt), ("exp_avg_unc", exp_avg_unc)):
        check_tensor(name, t, dtypes=(p.dtype,), device=p.device, like="p")
        if t.shape != p.shape:
            raise ValueError(f"{name} must have p's shape {tuple(p.shape)}, got {tuple(t.shape)}")
        if name != "grad" and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"{name} is updated in place and must not be an expanded tensor "
                             f"(strides {t.stride()}: elements share memory); clone() it")
    check_probability("beta1", beta1)
    check_probability("beta2", beta2)
    check_int_in("rank_dim", rank_dim, 0, 1)


def check_pairs(pairs, weight) -> None:
    """`(A [r, K], B [N, r])` pairs of float factors, at least one, each pair on one device."""
    if isinstance(pairs, torch.Tensor) or not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"pairs must be a non-empty list of (lora_A, lora_B) pairs, got {pairs!r}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (lora_A, lora_B) pair, got {type(pair).__name__}")
        A, B = pair
        check_tensor(f"pairs[{i}] lora_A", A, ndim=2, dtypes=_REAL)
        check_tensor(f"pairs[{i}] lora_B", B, ndim=2, dtypes=(A.dtype,), device=A.device,
                     like="its lora_A")
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"pairs[{i}] lora_B must be [out_features, r={A.shape[0]}] to match "
                             f"its lora_A, got {tuple(B.shape)}")
    check_real("weight", weight, lo=0.0)


def adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1: float, beta2: float,
                       rank_dim: int) -> torch.Tensor:
    """Update `exp_avg_ipt`/`exp_avg_unc` in place from `p` and `grad`; return the fp32 per-rank
    mean of `exp_avg_ipt · exp_avg_unc` (`[r]`, ranks along `rank_dim`)."""
    check_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2, rank_dim)
    plan = _plan("adalora_update_ipt", p)
    return MODULES[plan.backend].adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2,
                                                    rank_dim)


class _OrthNorms(torch.autograd.Function):
    """`‖A·Aᵀ − I‖_F + ‖Bᵀ·B − I‖_F` with its gradient in closed form: d‖G‖ = 2·G·A/‖G‖
    for G = A·Aᵀ − I (and 2·B·G/‖G‖ for G = Bᵀ·B − I), reusing the r×r Gram matrices.
    Computed in fp32 at least (the result is fp32), each gradient rounded once to its factor's
    dtype: in 16 bits, rounding the Gram matrix, the norm and 2·grad/‖G‖ separately costs
    several ulps more than torch's own autograd of the formula."""

    @staticmethod
    def forward(ctx, A, B):
        acc = torch.promote_types(A.dtype, torch.float32)
        a, b = A.to(acc), B.to(acc)
        eye = torch.eye(A.shape[0], dtype=acc, device=A.device)
        ga, gb = a @ a.t() - eye, b.t() @ b - eye
        na, nb = torch.linalg.norm(ga), torch.linalg.norm(gb)
        ctx.save_for_backward(a, b, ga, gb, na, nb)
        ctx.dtypes = A.dtype, B.dtype
        return na + nb

    @staticmethod
    def backward(ctx, grad):
        a, b, ga, gb, na, nb = ctx.saved_tensors
        # the Frobenius norm's gradient at G = 0 is taken as 0
        da = torch.where(na > 0, 2 * grad / na.clamp_min(1e-30), 0.0) * (ga @ a)
        db = torch.where(nb > 0, 2 * grad / nb.clamp_min(1e-30), 0.0) * (b @ gb)
        return da.to(ctx.dtypes[0]), db.to(ctx.dtypes[1])


def adalora_orth_reg(pairs, weight: float = 0.5) -> torch.Tensor:
    """PEFT's orthogonal regularizer over `(A, B)` pairs (mean over every A and every B), in the
    factors' dtype (summed in fp32 at least, rounded once)."""
    check_pairs(pairs, weight)
    total = sum(_OrthNorms.apply(A, B) for A, B in pairs)
    dtype = functools.reduce(torch.promote_types, [A.dtype for A, _ in pairs])
    return (weight * total / (2 * len(pairs))).to(dtype)
