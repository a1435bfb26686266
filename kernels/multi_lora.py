"""Triton kernels: grouped LoRA for batches that mix adapters (one adapter per row), Punica's
SGMV shape: rows sorted by adapter, then two launches over every adapter at once.

    shrink:  xa[p]  = s[a] · x[order[p]] · A[a]ᵀ     (p: sorted position, a: its adapter)
    expand:  y[order[p]] += xa[p] · B[a]ᵀ           (y holds the base result; rounded once)

`A` is `[n, r, K]` and `B` `[n, N, r]`, every adapter's factors stacked (smaller ranks padded
with zeros). Each program owns BLOCK_M sorted rows of a single adapter (the block table, built on
the device by `block_table`, so no host sync), so every output element is written by one
program: deterministic, no atomics. Rows of no adapter (index -1) are in no block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16


def block_table(adapter_index: torch.Tensor, n: int, block_m: int = BLOCK_M):
    """`(order, seg_end, blk_adapter, blk_row, nblk)`, all on the index's device: the rows sorted
    by adapter (stable; rows of no adapter last), where each adapter's rows end, and for each
    block of `block_m` sorted rows its adapter and first position; `nblk` blocks are live out of
    `len(blk_adapter) = cdiv(T, block_m) + n`, an upper bound that needs no sync."""
    idx = adapter_index.long()
    key = torch.where(idx < 0, n, idx)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n + 1)[:n]
    seg_end = torch.cumsum(counts, 0)
    nb = (counts + block_m - 1) // block_m
    blk_end = torch.cumsum(nb, 0)
    b = torch.arange(triton.cdiv(idx.numel(), block_m) + n, device=idx.device)
    blk_adapter = torch.searchsorted(blk_end, b, right=True).clamp_(max=n - 1)
    blk_row = (seg_end - counts)[blk_adapter] + (b - (blk_end - nb)[blk_adapter]) * block_m
    return order, seg_end, blk_adapter, blk_row, blk_end[-1:]


@triton.jit
def _rows(pid, order_ptr, seg_end_ptr, blk_adapter_ptr, blk_row_ptr, BLOCK_M: tl.constexpr):
    a = tl.load(blk_adapter_ptr + pid)
    pos = tl.load(blk_row_ptr + pid) + tl.arange(0, BLOCK_M)
    live = pos < tl.load(seg_end_ptr + a)
    rows = tl.load(order_ptr + pos, mask=live, other=0)
    return a, pos, live, rows


@triton.jit
def _shrink_kernel(x_ptr, stride_xm, stride_xk, a_ptr, stride_aa, stride_ar, stride_ak,
                   scal_ptr, xa_ptr, stride_pm, stride_pr, order_ptr, seg_end_ptr,
                   blk_adapter_ptr, blk_row_ptr, nblk_ptr, K, R,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    if pid < tl.load(nblk_ptr):
        a, pos, live, rows = _rows(pid, order_ptr, seg_end_ptr, blk_adapter_ptr, blk_row_ptr,
                                   BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                         mask=live[:, None] & (offs_k[None, :] < K), other=0.0)
            at = tl.load(a_ptr + a.to(tl.int64) * stride_aa + offs_r[None, :] * stride_ar
                         + offs_k[:, None] * stride_ak,
                         mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)
            xt = xt.to(at.dtype)  # PEFT casts x to the adapters' dtype
            if IEEE:
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        acc *= tl.load(scal_ptr + a)
        tl.store(xa_ptr + pos[:, None].to(tl.int64) * stride_pm + offs_r[None, :] * stride_pr,
                 acc.to(xa_ptr.dtype.element_ty), mask=live[:, None] & (offs_r[None, :] < R))


@triton.jit
def _expand_kernel(xa_ptr, stride_pm, stride_pr, b_ptr, stride_ba, stride_bn, stride_br,
                   y_ptr, stride_ym, stride_yn, order_ptr, seg_end_ptr, blk_adapter_ptr,
                   blk_row_ptr, nblk_ptr, N, R,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    if pid < tl.load(nblk_ptr):
        a, pos, live, rows = _rows(pid, order_ptr, seg_end_ptr, blk_adapter_ptr, blk_row_ptr,
                                   BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        xa = tl.load(xa_ptr + pos[:, None].to(tl.int64) * stride_pm + offs_r[None, :] * stride_pr,
                     mask=live[:, None] & (offs_r[None, :] < R), other=0.0)
        bt = tl.load(b_ptr + a.to(tl.int64) * stride_ba + offs_n[None, :].to(tl.int64) * stride_bn
                     + offs_r[:, None] * stride_br,
                     mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
        if IEEE:
            lora = tl.dot(xa, bt, input_precision="ieee")
        else:
            lora = tl.dot(xa, bt)
        out = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        ok = live[:, None] & (offs_n[None, :] < N)
        y = tl.load(out, mask=ok, other=0.0).to(tl.float32) + lora
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=ok)


def add_grouped_lora(y, x, A, B, scalings, adapter_index, table=None):
    """`y[t] += s[a]·x[t]·A[a]ᵀ·B[a]ᵀ` for every row t with adapter a = adapter_index[t] >= 0, in
    place (y: the base result [T, N]); `table`: `block_table`'s result, to reuse across layers."""
    T, K = x.shape
    n, R, _ = A.shape
    N = B.shape[1]
    if T == 0:
        return y
    order, seg_end, blk_adapter, blk_row, nblk = table or block_table(adapter_index, n)
    xa = torch.empty((T, R), dtype=A.dtype, device=x.device)
    BR = max(16, triton.next_power_of_2(R))
    ieee = A.dtype == torch.float32
    meta = (order, seg_end, blk_adapter, blk_row, nblk)
    grid = (blk_adapter.numel(),)
    _shrink_kernel[grid](x, x.stride(0), x.stride(1), A, *A.stride(), scalings, xa, xa.stride(0),
                         xa.stride(1), *meta, K, R, IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_K=64,
                         BLOCK_R=BR)
    _expand_kernel[grid + (triton.cdiv(N, 64),)](
        xa, xa.stride(0), xa.stride(1), B, *B.stride(), y, y.stride(0), y.stride(1), *meta, N, R,
        IEEE=ieee, BLOCK_M=BLOCK_M, BLOCK_N=64, BLOCK_R=BR)
    return y
