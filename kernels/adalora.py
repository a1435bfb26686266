"""Triton kernel: AdaLoRA's sensitivity update, fused, one pass per parameter tensor.

For a parameter `p` (lora_A [r, K], lora_E [r, 1] or lora_B [N, r]) and its gradient, in place:
    ipt = |p · grad|;  exp_avg_ipt = b1·exp_avg_ipt + (1−b1)·ipt
    exp_avg_unc = b2·exp_avg_unc + (1−b2)·|ipt − exp_avg_ipt|
and returns the per-rank mean of the element score `exp_avg_ipt · exp_avg_unc` (over K for A,
over N for B), so the triplet score needs no temporaries the size of the parameter.
One program owns one rank and reduces over the other dimension: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import empty


@triton.jit
def _ipt_kernel(p_ptr, g_ptr, ipt_ptr, unc_ptr, score_ptr, L,
                sp_rank, sp_elem, sg_rank, sg_elem, si_rank, si_elem, su_rank, su_elem,
                beta1, beta2, BLOCK: tl.constexpr, SAME: tl.constexpr):
    # each tensor its own strides (rank, element), so a sliced grad or a transposed EMA reads and
    # writes its own elements; SAME (all four strided as p, the usual case) computes one offset
    rank = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < L
        e = offs.to(tl.int64)
        at_p = rank * sp_rank + e * sp_elem
        if SAME:
            at_g, at_i, at_u = at_p, at_p, at_p
        else:
            at_g, at_i = rank * sg_rank + e * sg_elem, rank * si_rank + e * si_elem
            at_u = rank * su_rank + e * su_elem
        p = tl.load(p_ptr + at_p, mask=live, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + at_g, mask=live, other=0.0).to(tl.float32)
        ema = tl.load(ipt_ptr + at_i, mask=live, other=0.0).to(tl.float32)
        unc = tl.load(unc_ptr + at_u, mask=live, other=0.0).to(tl.float32)
        ipt = tl.abs(p * g)
        ema = beta1 * ema + (1 - beta1) * ipt
        unc = beta2 * unc + (1 - beta2) * tl.abs(ipt - ema)
        tl.store(ipt_ptr + at_i, ema.to(ipt_ptr.dtype.element_ty), mask=live)
        tl.store(unc_ptr + at_u, unc.to(unc_ptr.dtype.element_ty), mask=live)
        total += tl.where(live, ema * unc, 0.0)
    tl.store(score_ptr + rank, tl.sum(total, axis=0) / L)


def update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1: float, beta2: float, rank_dim: int,
               block: int = 1024):
    """Update the two EMAs in place; return the fp32 per-rank mean score `[r]`.

    `rank_dim` is the dimension of the 2-D `p` that indexes ranks (0 for lora_A/lora_E, 1 for
    lora_B). The four tensors share one shape; each may have its own strides.
    """
    r, L = p.shape[rank_dim], p.shape[1 - rank_dim]
    score = empty(r, torch.float32, p.device)
    tensors = (p, grad, exp_avg_ipt, exp_avg_unc)
    strides = [s for t in tensors for s in (t.stride(rank_dim), t.stride(1 - rank_dim))]
    same = all(t.stride() == p.stride() for t in tensors)
    _ipt_kernel[(r,)](p, grad, exp_avg_ipt, exp_avg_unc, score, L, *strides,
                      float(beta1), float(beta2), BLOCK=block, SAME=same)
    return score
