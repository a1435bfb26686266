"""AdaLoRA allocator ops: the fused sensitivity update and the orthogonal regularizer.

They run outside the model's forward (after the optimizer step), so they are plain functions
rather than custom ops; the allocator (`peftkern.adalora.RankAllocator`) calls them.
"""
from __future__ import annotations

import torch

from .backends import MODULES
from .dispatch import _plan


def adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1: float, beta2: float,
                       rank_dim: int) -> torch.Tensor:
    """Update `exp_avg_ipt`/`exp_avg_unc` in place from `p` and `grad`; return the fp32 per-rank
    mean of `exp_avg_ipt · exp_avg_unc` (`[r]`, ranks along `rank_dim`)."""
    same_layout = all(t.stride() == p.stride() and t.shape == p.shape
                      for t in (grad, exp_avg_ipt, exp_avg_unc))
    plan = _plan("adalora_update_ipt", p, same_layout=same_layout)
    return MODULES[plan.backend].adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2,
                                                    rank_dim)


class _OrthNorms(torch.autograd.Function):
    """`‖A·Aᵀ − I‖_F + ‖Bᵀ·B − I‖_F` with its gradient in closed form: d‖G‖ = 2·G·A/‖G‖
    for G = A·Aᵀ − I (and 2·B·G/‖G‖ for G = Bᵀ·B − I), reusing the r×r Gram matrices."""

    @staticmethod
    def forward(ctx, A, B):
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        ga, gb = A @ A.t() - eye, B.t() @ B - eye
        na, nb = torch.linalg.norm(ga), torch.linalg.norm(gb)
        ctx.save_for_backward(A, B, ga, gb, na, nb)
        return na + nb

    @staticmethod
    def backward(ctx, grad):
        A, B, ga, gb, na, nb = ctx.saved_tensors
        # the Frobenius norm's gradient at G = 0 is taken as 0
        da = torch.where(na > 0, 2 * grad / na.clamp_min(1e-30), 0.0) * (ga @ A)
        db = torch.where(nb > 0, 2 * grad / nb.clamp_min(1e-30), 0.0) * (B @ gb)
        return da, db


def adalora_orth_reg(pairs, weight: float = 0.5) -> torch.Tensor:
    """PEFT's orthogonal regularizer over `(A, B)` pairs (mean over every A and every B)."""
    total = sum(_OrthNorms.apply(A, B) for A, B in pairs)
    return weight * total / (2 * len(pairs))
