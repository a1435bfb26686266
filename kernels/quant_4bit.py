"""Triton kernels: bitsandbytes-compatible 4-bit blockwise quantize and dequantize.

Launchers take validated, contiguous tensors and return new tensors. The arithmetic follows
`peftkern.reference` operation for operation, so the bytes are identical to bitsandbytes'.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, NO_FMA, empty, load_masked

@triton.jit
def _quantize_4bit_kernel(a_ptr, packed_ptr, absmax_ptr, bounds_ptr, order_ptr, n,
                          BLOCKSIZE: tl.constexpr, IS_FP4: tl.constexpr):
    # One program per quantization block; even/odd flat elements become high/low nibbles.
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCKSIZE
    j = tl.arange(0, BLOCKSIZE // 2)
    idx = start + 2 * j
    x_hi = tl.load(a_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    x_lo = tl.load(a_ptr + idx + 1, mask=idx + 1 < n, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x_hi), axis=0), tl.max(tl.abs(x_lo), axis=0))
    safe = tl.maximum(amax, 1e-38)
    # bnb multiplies full blocks by the reciprocal and divides the partial tail block, with IEEE
    # division (div_rn: Triton's `/` is an approximate div.full.f32 on GPUs).
    full = start + BLOCKSIZE <= n
    recip = tl.math.div_rn(1.0, safe)
    s_hi = tl.where(full, x_hi * recip, tl.math.div_rn(x_hi, safe))
    s_lo = tl.where(full, x_lo * recip, tl.math.div_rn(x_lo, safe))
    s_hi = tl.minimum(tl.maximum(s_hi, -1.0), 1.0)
    s_lo = tl.minimum(tl.maximum(s_lo, -1.0), 1.0)
    # bucket = number of midpoints strictly below the value (torch.bucketize, right=False).
    b_hi = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    b_lo = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    for k in tl.static_range(15):
        bound = tl.load(bounds_ptr + k)
        b_hi += (s_hi > bound).to(tl.int32)
        b_lo += (s_lo > bound).to(tl.int32)
    if IS_FP4:
        b_hi = tl.load(order_ptr + b_hi)
        b_lo = tl.load(order_ptr + b_lo)
    byte = ((b_hi << 4) | b_lo).to(tl.uint8)
    tl.store(packed_ptr + start // 2 + j, byte, mask=idx < n)
    tl.store(absmax_ptr + pid, tl.where(full, amax, safe))


@triton.jit
def decode_4bit(packed_ptr, idx, live, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                blocksize, NESTED: tl.constexpr):
    """fp32 weights at flat indices `idx` (int64): `table[code] * absmax[idx // blocksize]`.

    The one 4-bit decoder, shared by the dequantize kernel and the fused LoRA GEMM.
    """
    byte = tl.load(packed_ptr + idx // 2, mask=live, other=0).to(tl.int32)
    code = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
    scale = block_scale(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, 0, idx // blocksize,
                        live, NESTED, True)
    return tl.load(table_ptr + code) * scale


@triton.jit
def block_scale(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, blk0, blk, live,
                NESTED: tl.constexpr, MASKED: tl.constexpr):
    """The fp32 scale of quantization blocks `blk0 + blk` (blk0 a scalar, so that `blk` may be
    int32 offsets in a tile): absmax, or the double-quantized `code8[q] * absmax2[(blk0 + blk)
    // 256] + offset`, rounded twice as in bnb. With MASKED, blocks outside `live` are not read
    (their scale is not meaningful)."""
    if NESTED:
        q = load_masked(absmax_ptr + blk0 + blk, live, 0, MASKED).to(tl.int32)
        # absmax2[(blk0 + blk) // 256] (bnb's nested blocksize, codes.NESTED_BLOCKSIZE) as a
        # scalar base and offsets of blk's type (all >= 0)
        group = (tl.cast(blk0 % 256, tl.int32) + blk) >> 8
        scale = tl.load(code8_ptr + q) * load_masked(absmax2_ptr + blk0 // 256 + group, live,
                                                     0.0, MASKED)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = load_masked(absmax_ptr + blk0 + blk, live, 0.0, MASKED)
    return scale


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                            out_ptr, n, blocksize, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < n
    w = decode_4bit(packed_ptr, idx, live, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                    table_ptr, blocksize, NESTED)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _block_scales_t_kernel(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, out_ptr, N, NB,
                           NESTED: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[j, n] = the scale of row n's block j (rows of NB blocks), transposed."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = (j[:, None] < NB) & (n[None, :] < N)
    blk = n[None, :].to(tl.int64) * NB + j[:, None]
    scale = block_scale(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, 0, blk, live, NESTED, True)
    tl.store(out_ptr + j[:, None].to(tl.int64) * N + n[None, :], scale, mask=live)


def block_scales_t(absmax, absmax2, code8, offset, N: int, NB: int) -> torch.Tensor:
    """Every block's fp32 scale as `[NB, N]` (row n's block j at [j, n]): what a kernel that
    stages a tile's scales reads in wide, coalesced loads. `absmax2 is None`: plain absmax."""
    out = empty((NB, N), torch.float32, absmax.device)
    nested = absmax2 is not None
    if not nested:
        absmax2 = code8 = offset = absmax
    if N and NB:
        grid = (triton.cdiv(NB, 32), triton.cdiv(N, 64))
        _block_scales_t_kernel[grid](absmax, absmax2, code8, offset, out, N, NB, NESTED=nested,
                                     BLOCK_J=32, BLOCK_N=64, **NO_FMA)
    return out


def quantize_4bit(A: torch.Tensor, bounds: torch.Tensor, order: torch.Tensor, blocksize: int,
                  is_fp4: bool):
    """Flat contiguous `A` -> `(packed uint8 [(n+1)//2], absmax fp32 [ceil(n/bs)])`."""
    n = A.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = empty((n + 1) // 2, torch.uint8, A.device)
    absmax = empty(nblocks, torch.float32, A.device)
    if n:
        _quantize_4bit_kernel[(nblocks,)](A, packed, absmax, bounds, order, n,
                                          BLOCKSIZE=blocksize, IS_FP4=is_fp4)
    return packed, absmax


def dequantize_4bit(packed, absmax, absmax2, code8, offset, table, blocksize: int, numel: int,
                    dtype: torch.dtype, block: int = 2048):
    """Packed bytes -> flat `[numel]` tensor of `dtype`; `absmax2 is None` means plain absmax."""
    # Interpreter-only shim: the Triton interpreter truncates fp32 -> bf16 where GPUs round to
    # nearest even, so under TRITON_INTERPRET=1 bf16 output is written as fp32 and rounded by torch.
    shim = INTERPRET and dtype == torch.bfloat16
    out = empty(numel, torch.float32 if shim else dtype, packed.device)
    nested = absmax2 is not None
    if not nested:  # unused pointers still need a tensor
        absmax2 = code8 = offset = absmax
    grid = (triton.cdiv(numel, block),)
    if numel:
        _dequantize_4bit_kernel[grid](packed, absmax, absmax2, code8, offset, table, out, numel,
                                      blocksize, NESTED=nested, BLOCK=block, **NO_FMA)
    return out.to(dtype) if shim else out
