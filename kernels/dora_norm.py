"""Triton kernels for DoRA: the weight norm `‖W[n] + s·(B·A)[n]‖₂` for every row n of the base
weight, and `column_dot` (the gradient of a per-output-feature scale).

One program owns BLOCK_N rows and walks K in BLOCK_K steps: it loads (dense) or decodes (4-bit,
in-kernel, as the fused GEMM does) the weight tile, adds `s·B[rows]·A[:, k-tile]` computed on the
spot, and accumulates the squares in fp32. Neither `B·A` nor the dequantized weight is ever
written to memory; the output is N values. Deterministic (one program per row block, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import NO_FMA, empty
from .lora_linear import _decode_rows
from .quant_4bit import decode_4bit


@triton.jit
def _dora_norm_kernel(w_ptr, stride_wn, stride_wk, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                      table_ptr, blocksize, a_ptr, stride_ar, stride_ak, b_ptr, stride_bn,
                      stride_br, N, K, R, scaling, out_ptr,
                      QUANT: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr,
                      BS: tl.constexpr, EVEN_COLS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        if QUANT and ROWS:  # rows of whole blocks: the GEMM's tile decoder (stored layout)
            w = _decode_rows(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                             row0, k0, K, N, BLOCK_N, BLOCK_K, BS, NESTED, EVEN_COLS, False)
        elif QUANT:  # blocks span rows: decode each element from its flat index
            w = decode_4bit(w_ptr, offs_n[:, None].to(tl.int64) * K + offs_k[None, :], valid,
                            absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, blocksize,
                            NESTED)
        else:
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
                        + offs_k[None, :].to(tl.int64) * stride_wk, mask=valid,
                        other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        if IEEE:
            ba = tl.dot(b, a, input_precision="ieee")
        else:
            ba = tl.dot(b, a)
        v = tl.where(valid, w + scaling * ba, 0.0)
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_n, tl.sqrt(acc).to(out_ptr.dtype.element_ty), mask=offs_n < N)


def dora_norm(weight, wq, lora_A, lora_B, scaling: float, N: int, K: int,
              config: dict | None = None) -> torch.Tensor:
    """`‖W + s·B·A‖` per row, `[N]` in the adapters' dtype. `weight` is the dense `[N, K]` weight
    (any strides), or the packed uint8 codes when `wq` holds the 4-bit state `(absmax, absmax2,
    code8, offset, table [16], byte-pair tables [256] (fp32, MMA dtype), blocksize)` (see
    `lora_linear.lora_matmul`)."""
    out = empty((N,), lora_A.dtype, lora_A.device)
    if N == 0:
        return out
    quant = wq is not None
    absmax, absmax2, code8, offset, table, pairs, _, blocksize = wq if quant else (weight,) * 7 + (1,)
    nested = quant and absmax2 is not None
    if not nested:
        absmax2 = code8 = offset = absmax
    cfg = {"BLOCK_N": 32, "BLOCK_K": 128, **(config or {})}
    rows = quant and K % blocksize == 0
    stride_wn, stride_wk = (K, 1) if quant else weight.stride()
    _dora_norm_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        weight, stride_wn, stride_wk, absmax, absmax2, code8, offset, pairs if rows else table,
        blocksize, lora_A, lora_A.stride(0), lora_A.stride(1), lora_B, lora_B.stride(0),
        lora_B.stride(1), N, K, lora_A.shape[0], float(scaling), out,
        QUANT=quant, NESTED=nested, ROWS=rows, BS=blocksize if rows else 1,
        EVEN_COLS=rows and K % cfg["BLOCK_K"] == 0, IEEE=lora_A.dtype == torch.float32,
        BLOCK_R=max(16, triton.next_power_of_2(lora_A.shape[0])), **cfg, **NO_FMA)
    return out


@triton.jit
def _column_dot_kernel(a_ptr, b_ptr, stride_am, stride_an, stride_bm, stride_bn, M, N, out_ptr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):  # in order: deterministic
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an, mask=ok,
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=ok,
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=0)
    tl.store(out_ptr + offs_n, acc, mask=offs_n < N)


def column_dot(a, b) -> torch.Tensor:
    """`Σ_m a[m, n]·b[m, n]` in fp32, `[N]`: the gradient of a per-column output scale (dY and the
    pre-scale result), one read of each, summed in a fixed order."""
    M, N = a.shape
    out = torch.empty(N, dtype=torch.float32, device=a.device)
    if N:
        _column_dot_kernel[(triton.cdiv(N, 64),)](a, b, a.stride(0), a.stride(1), b.stride(0),
                                                  b.stride(1), M, N, out, BLOCK_M=32, BLOCK_N=64)
    return out
