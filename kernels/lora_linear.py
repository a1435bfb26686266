"""Triton kernels: the fused (Q)LoRA linear, forward and input-gradient, dense or 4-bit base.

One kernel computes `out[M, P] = inp[M, Q] · Wop[Q, P] + s · (L[M, R] · R2[R, P]) [⊙ mask] + bias`.
`Wop` is the base weight `W [N, K]` addressed through two strides, so the same code serves
  forward:  inp = x,  Wop = Wᵀ (q=k, p=n), L = xA = drop(x)·Aᵀ, R2 = Bᵀ, + bias
  backward: inp = dY, Wop = W  (q=n, p=k), L = dY·B,           R2 = A,  ⊙ dropout mask
and a 4-bit weight is decoded tile by tile inside the K loop (never written to global memory),
with plain or double-quantized absmax. The LoRA term is added in the epilogue.
Deterministic: every output tile is owned by one program, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_4bit import _INTERPRET, _empty, decode_4bit


@triton.jit
def _weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, blocksize,
                 offs_q, offs_p, Q, P, stride_wq, stride_wp,
                 QUANT: tl.constexpr, NESTED: tl.constexpr):
    """Wop[offs_q, offs_p] as fp32; 4-bit weights are decoded from their flat index."""
    valid = (offs_q[:, None] < Q) & (offs_p[None, :] < P)
    idx = offs_q[:, None].to(tl.int64) * stride_wq + offs_p[None, :].to(tl.int64) * stride_wp
    if QUANT:
        w = decode_4bit(w_ptr, idx, valid, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                        table_ptr, blocksize, NESTED)
        return tl.where(valid, w, 0.0)
    return tl.load(w_ptr + idx, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _lora_matmul_kernel(
        inp_ptr, M, Q, stride_im, stride_iq,
        w_ptr, P, stride_wq, stride_wp,
        absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, blocksize,
        l_ptr, stride_lm, stride_lr, r2_ptr, stride_rr, stride_rp, R, scaling,
        mask_ptr, stride_mm, stride_mp, bias_ptr, out_ptr, stride_om, stride_op,
        QUANT: tl.constexpr, NESTED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_K):
        offs_q = q0 + tl.arange(0, BLOCK_K)
        a = tl.load(inp_ptr + rows * stride_im + offs_q[None, :] * stride_iq,
                    mask=(offs_m[:, None] < M) & (offs_q[None, :] < Q), other=0.0)
        w = _weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                         blocksize, offs_q, offs_p, Q, P, stride_wq, stride_wp, QUANT, NESTED)
        # The weight is rounded to the activation dtype first, as dequantize-then-matmul does.
        if IEEE:
            acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    # Epilogue: the low-rank term from the precomputed L = xA (forward) or dY·B (backward).
    offs_r = tl.arange(0, BLOCK_R)
    lo = tl.load(l_ptr + rows * stride_lm + offs_r[None, :] * stride_lr,
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
    r2 = tl.load(r2_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
                 mask=(offs_r[:, None] < R) & (offs_p[None, :] < P), other=0.0)
    if IEEE:
        lora = tl.dot(lo, r2, input_precision="ieee")
    else:
        lora = tl.dot(lo, r2)
    lora = lora * scaling
    out_mask = (offs_m[:, None] < M) & (offs_p[None, :] < P)
    if HAS_MASK:
        lora *= tl.load(mask_ptr + rows * stride_mm + offs_p[None, :] * stride_mp, mask=out_mask,
                        other=0.0).to(tl.float32)
    acc += lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows * stride_om + offs_p[None, :] * stride_op,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Tile configurations a GPU tuning run chooses from (`python -m peftkern.bench.tune`), per batch
# regime. Small M (decode): narrow N tiles, so that a 4096-wide layer still gives a few hundred
# programs, and long K steps. The tuned choice per GPU and shape lives in peftkern/ops/tuning.json;
# one fixed config per shape keeps results the same from run to run.
SMALL_M = 16
CANDIDATES = {
    "small": [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
              for n, k, w, st in [(64, 128, 4, 3), (32, 128, 2, 3), (32, 256, 4, 3), (64, 256, 4, 4),
                                  (128, 64, 4, 3), (128, 128, 8, 3), (16, 256, 2, 4), (32, 512, 4, 2)]],
    "large": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
              for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4),
                                        (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                                        (128, 256, 64, 8, 3), (64, 64, 64, 4, 4),
                                        (256, 128, 64, 8, 3), (64, 256, 32, 4, 4)]],
}


def regime(M: int) -> str:
    return "small" if M <= SMALL_M else "large"


def _config(M: int) -> dict:
    """Tile sizes when no tuned entry exists: the first candidate of the regime (a rule, unmeasured)."""
    if _INTERPRET:  # the interpreter's cost is per program: few, larger tiles
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(M))), BLOCK_N=64, BLOCK_K=64)
    return CANDIDATES[regime(M)][0]


def lora_matmul(inp, weight, wq: tuple, L, R2, scaling: float, mask=None, bias=None, *,
                stride_wq: int, stride_wp: int, P: int, config: dict | None = None):
    """Launch the fused kernel; see the module docstring.

    `weight` is the dense weight, or the packed uint8 codes when `wq` holds the 4-bit state
    `(absmax, absmax2, code8, offset, table, blocksize)`; `wq` is None for a dense weight.
    `L` is [M, R] and `R2` is [R, P]; both in the activation dtype. `config` (tile sizes, warps,
    stages) overrides the rule-based choice; the interpreter ignores warps and stages.
    """
    M, Q = inp.shape
    R = L.shape[1]
    out = _empty((M, P), inp.dtype, inp.device)
    if M == 0 or P == 0:
        return out
    quant = wq is not None
    absmax, absmax2, code8, offset, table, blocksize = wq if quant else (weight,) * 5 + (1,)
    nested = quant and absmax2 is not None
    if not nested:
        absmax2 = code8 = offset = absmax
    cfg = dict(config or _config(M), BLOCK_R=max(16, triton.next_power_of_2(R)))
    if _INTERPRET:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(P, cfg["BLOCK_N"]))
    m = mask if mask is not None else out
    _lora_matmul_kernel[grid](
        inp, M, Q, inp.stride(0), inp.stride(1),
        weight, P, stride_wq, stride_wp,
        absmax, absmax2, code8, offset, table, blocksize,
        L, L.stride(0), L.stride(1), R2, R2.stride(0), R2.stride(1), R, float(scaling),
        m, m.stride(0), m.stride(1), bias if bias is not None else out, out, out.stride(0),
        out.stride(1),
        QUANT=quant, NESTED=nested, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        IEEE=inp.dtype == torch.float32, **cfg)
    return out
