"""Triton kernels: the fused (Q)LoRA linear, forward and input-gradient, dense or 4-bit base.

One kernel computes `out[M, P] = inp[M, Q] · Wop[Q, P] + s · (L[M, R] · R2[R, P]) [⊙ mask] + bias`
(with split-K, a tuned option for small M, a second launch adds the K-slices and the epilogue).
`Wop` is the base weight `W [N, K]` addressed through two strides, so the same code serves
  forward:  inp = x,  Wop = Wᵀ (q=k, p=n), L = xA = drop(x)·Aᵀ, R2 = Bᵀ, + bias
  backward: inp = dY, Wop = W  (q=n, p=k), L = dY·B,           R2 = A,  ⊙ dropout mask
and a 4-bit weight is decoded tile by tile inside the K loop (never written to global memory),
with plain or double-quantized absmax. The LoRA term is added in the epilogue.
Rounding of a 4-bit weight: like dequantize-then-matmul, each value `code · scale` is rounded once
to the activation dtype before the MMA, except in the swapped (small-M) forward, which multiplies
the codes' table values (rounded once to the activation dtype; exact in fp32) and scales each
quantization block's fp32 partial sum (`_block_scaled_mma`): as exact, not bit-identical.
Deterministic: every output tile is owned by one program (split-K partials are added in a fixed
order by the second launch), no atomics.
A GLUON tile config (a tuning candidate, one per regime) runs the 16-bit 4-bit forward on sm_90+
as kernels/qlora_wgmma.py (the same block-scaled math with the decoded weight in wgmma's
registers; M <= 16 or M >= 128): at small M into a split-K workspace that
`_split_k_epilogue_kernel` finishes as for split-K tiles; the large config also runs the bf16
4-bit dX at M >= 128, and both large kernels do the epilogue themselves (`qlora_wgmma.
large_linear`, `dx_linear`: 16-bit adapters, no workspace; DoRA's scale and z and fp32 adapters
take the large forward's workspace path).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import qlora_wgmma
from .common import INTERPRET, NO_FMA, empty, load_masked
from .quant_4bit import block_scale, decode_4bit


@triton.jit
def _decode_rows(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, row0, col0,
                 ncols, nrows, NROWS: tl.constexpr, NCOLS: tl.constexpr, BS: tl.constexpr,
                 NESTED: tl.constexpr, EVEN_COLS: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """W[row0:row0+NROWS, col0:col0+NCOLS] in its stored [N, K] layout, as fp32, when every row
    holds whole quantization blocks (K % BS == 0, BS constexpr): the high and the low nibbles of
    the packed bytes are the even and the odd columns. The bytes are loaded as one
    [NROWS, NCOLS/2] tile (lanes along K) and each byte is looked up once; one scale per block
    is loaded and broadcast over its BS columns. The tile's base is int64, offsets in it int32."""
    HALF: tl.constexpr = NCOLS // 2
    G: tl.constexpr = NCOLS // BS if NCOLS > BS else 1
    # Rows past the end read the last row instead of being masked: they meet zero activations
    # (dX) or land in output columns that are never stored (forward). Columns past the end are
    # masked unless the tile divides the row (EVEN_COLS). EVEN_ROWS: no row is past the end.
    r = tl.arange(0, NROWS)
    if not EVEN_ROWS:
        r = tl.minimum(r, nrows - 1 - row0)
    byte_col = col0 // 2 + tl.arange(0, HALF)
    blk_col = col0 // BS + tl.arange(0, G)
    blk_ok = (blk_col < ncols // BS)[None, :]
    base = w_ptr + tl.cast(row0, tl.int64) * (ncols // 2)
    byte = load_masked(base + (r * (ncols // 2))[:, None] + byte_col[None, :],
                       (byte_col < ncols // 2)[None, :], 0, not EVEN_COLS)
    blk = (row0 + r).to(tl.int64) * (ncols // BS)
    scale = block_scale(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, 0,
                        blk[:, None] + blk_col[None, :], blk_ok, NESTED, not EVEN_COLS)
    if not EVEN_COLS:
        scale = tl.where(blk_ok, scale, 0.0)
    # One 64-bit lookup per byte in the 256-entry pair table (a 1-D gather, which Triton stages
    # in shared memory): the fp32 values of columns 2j (high nibble) and 2j+1 (low nibble).
    pairs = tl.load(table_ptr + tl.arange(0, 256))
    two = tl.reshape(tl.gather(pairs, tl.reshape(byte.to(tl.int32), [NROWS * HALF]), axis=0),
                     [NROWS, HALF])
    hi, lo = _pair_halves(two, tl.float32)
    return tl.reshape(tl.join(_scaled(hi, scale, NROWS, G, HALF),
                              _scaled(lo, scale, NROWS, G, HALF)), [NROWS, NCOLS])


@triton.jit
def _scaled(vals, scale, NROWS: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr):
    """vals [NROWS, HALF] times its block's scale ([NROWS, G], broadcast over HALF / G)."""
    return tl.reshape(tl.reshape(vals, [NROWS, G, HALF // G]) * scale[:, :, None], [NROWS, HALF])


@triton.jit
def _weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, blocksize,
                 q0, p0, offs_q, offs_p, Q, P, stride_wq, stride_wp,
                 QUANT: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr,
                 W_T: tl.constexpr, BS: tl.constexpr, EVEN_COLS: tl.constexpr, EVEN_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    """Wop[offs_q, offs_p] as fp32. A 4-bit weight whose rows hold whole blocks (ROWS) is decoded
    in its stored layout: forward (W_T: Wop = Wᵀ) transposes the [n, k] tile in registers, dX
    (Wop = W) uses it as is. Otherwise each element is decoded from its flat index. (The swapped
    forward of such a weight runs `_block_scaled_mma` instead.)"""
    if QUANT and ROWS:
        if W_T:
            w = tl.trans(_decode_rows(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                                      table_ptr, p0, q0, Q, P, BLOCK_N, BLOCK_K, BS, NESTED,
                                      EVEN_COLS, False))
        else:
            w = _decode_rows(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                             q0, p0, P, Q, BLOCK_K, BLOCK_N, BS, NESTED, EVEN_COLS, EVEN_Q)
            if SWAP:
                w = tl.trans(w)
        return w
    if SWAP:  # the tile is Wop[offs_q, offs_p]ᵀ: [BLOCK_N, BLOCK_K]
        q_i = offs_q[None, :]
        p_i = offs_p[:, None]
    else:
        q_i = offs_q[:, None]
        p_i = offs_p[None, :]
    valid = (q_i < Q) & (p_i < P)
    idx = q_i.to(tl.int64) * stride_wq + p_i.to(tl.int64) * stride_wp
    if QUANT:
        w = decode_4bit(w_ptr, idx, valid, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                        table_ptr, blocksize, NESTED)
        return tl.where(valid, w, 0.0)
    return tl.load(w_ptr + idx, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _mma(lhs, rhs, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(lhs, rhs, acc, input_precision="ieee")
    return tl.dot(lhs, rhs, acc)


@triton.jit
def _block_scaled_mma(acc, x_rows, stride_iq, w_ptr, absmax_ptr, absmax2_ptr, code8_ptr,
                      offset_ptr, table_ptr, n0, q0, Q, P, BS: tl.constexpr, NESTED: tl.constexpr,
                      EVEN_COLS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """The swapped forward's K step, `accᵀ[BLOCK_N, BLOCK_M] += W[n0:, q0:q0+BLOCK_K] · xᵀ`, one
    quantization block at a time: the MMA multiplies the 4-bit codes' table values (exact in
    fp32, rounded once to the activation dtype in the pair table), then each block's fp32 scale
    multiplies its fp32 partial sum: a multiply and an add per accumulator element and block,
    instead of a multiply and a rounding per weight element. Rows of whole blocks, BS constexpr."""
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < BS else BS  # a sub-step lies within one block
    HALF: tl.constexpr = SUB // 2
    G: tl.constexpr = BLOCK_K // SUB
    # Rows past the end read the last row: they land in output columns that are never stored.
    r = tl.minimum(tl.arange(0, BLOCK_N), P - 1 - n0)
    w_rows = w_ptr + tl.cast(n0, tl.int64) * (Q // 2) + (r * (Q // 2))[:, None]
    blk0 = tl.cast(n0, tl.int64) * (Q // BS)  # the tile's first block; in-tile offsets int32
    cols = q0 // BS + tl.arange(0, G)
    # The step's G scales per row at once (in-thread; `_column` picks one per sub-step)
    scales = block_scale(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, blk0,
                         (r * (Q // BS))[:, None] + cols[None, :], (cols < Q // BS)[None, :],
                         NESTED, not EVEN_COLS)
    pairs = tl.load(table_ptr + tl.arange(0, 256))
    for j in tl.static_range(G):
        k0 = q0 + j * SUB
        offs = k0 + tl.arange(0, SUB)
        # Without EVEN_COLS a sub-step may be past the row's end (then wholly: whole blocks).
        byte = load_masked(w_rows + (k0 // 2 + tl.arange(0, HALF))[None, :],
                           (k0 + 2 * tl.arange(0, HALF) < Q)[None, :], 0, not EVEN_COLS)
        x = load_masked(x_rows + offs[None, :] * stride_iq, (offs < Q)[None, :], 0.0,
                        not EVEN_COLS)
        codes = _pair_values(tl.gather(pairs, tl.reshape(byte.to(tl.int32), [BLOCK_N * HALF]),
                                       axis=0), x.dtype, BLOCK_N, SUB)
        scale = _column(scales, j, BLOCK_N, G)
        part = _mma(codes, tl.trans(x), tl.zeros_like(acc), IEEE)
        acc += part * scale[:, None]  # not contracted (NO_FMA): the interpreter rounds alike
    return acc


@triton.jit
def _column(t, J: tl.constexpr, NROWS: tl.constexpr, G: tl.constexpr):
    """Column J of t [NROWS, G] (G <= 8, a power of two) by halving splits, kept in-thread."""
    if G == 1:
        c = tl.reshape(t, [NROWS])
    else:
        even, odd = tl.split(tl.reshape(t, [NROWS, G // 2, 2]))
        c = _column(odd if J % 2 == 1 else even, J // 2, NROWS, G // 2)
    return c


@triton.jit
def _pair_values(two, DT: tl.constexpr, NROWS: tl.constexpr, NCOLS: tl.constexpr):
    """[NROWS, NCOLS] table values from the byte-pair lookups `two` ([NROWS * NCOLS / 2])."""
    hi, lo = _pair_halves(two, DT)
    return tl.reshape(tl.join(hi, lo), [NROWS, NCOLS])


@triton.jit
def _pair_halves(two, DT: tl.constexpr):
    """The high- and the low-nibble values (dtype DT) of byte-pair lookups: an int64 entry holds
    two fp32 values, an int32 entry two 16-bit ones (the high nibble's in the low half)."""
    if two.dtype == tl.int64:
        hi = two.to(tl.int32).to(DT, bitcast=True)
        lo = (two >> 32).to(tl.int32).to(DT, bitcast=True)
    else:
        hi = two.to(tl.int16).to(DT, bitcast=True)
        lo = (two >> 16).to(tl.int16).to(DT, bitcast=True)
    return hi, lo


@triton.jit
def _epilogue(acc, offs_m, offs_p, M, P, l_ptr, stride_lm, stride_lr, r2_ptr, stride_rr, stride_rp,
              R, scaling, mask_ptr, stride_mm, stride_mp, bias_ptr, scale_ptr, z_ptr, out_ptr,
              stride_om, stride_op, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_Z: tl.constexpr, LORA_IEEE: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """out = (acc + s·(L·R2) [⊙ mask]) [⊙ scale] + bias, for the tile (offs_m, offs_p); L = xA
    (forward) or dY·B (backward), precomputed in the LoRA dtype (fp32 adapters stay exact fp32: LORA_IEEE)."""
    rows = offs_m[:, None].to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    lo = tl.load(l_ptr + rows * stride_lm + offs_r[None, :] * stride_lr,
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
    r2 = tl.load(r2_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
                 mask=(offs_r[:, None] < R) & (offs_p[None, :] < P), other=0.0)
    if LORA_IEEE:
        lora = tl.dot(lo, r2, input_precision="ieee")
    else:
        lora = tl.dot(lo, r2)
    lora = lora * scaling
    out_mask = (offs_m[:, None] < M) & (offs_p[None, :] < P)
    if HAS_MASK:
        lora *= tl.load(mask_ptr + rows * stride_mm + offs_p[None, :] * stride_mp, mask=out_mask,
                        other=0.0).to(tl.float32)
    acc += lora
    if HAS_Z:  # the pre-scale result too (what the scale's gradient reads), in out's layout
        tl.store(z_ptr + rows * stride_om + offs_p[None, :] * stride_op,
                 acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    if HAS_SCALE:  # a per-output-feature scale (DoRA's m / ‖W + s·B·A‖) before the bias
        acc *= tl.load(scale_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows * stride_om + offs_p[None, :] * stride_op,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _lora_matmul_kernel(
        inp_ptr, M, Q, stride_im, stride_iq,
        w_ptr, P, stride_wq, stride_wp,
        absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, blocksize,
        l_ptr, stride_lm, stride_lr, r2_ptr, stride_rr, stride_rp, R, scaling,
        mask_ptr, stride_mm, stride_mp, bias_ptr, scale_ptr, z_ptr, out_ptr, stride_om, stride_op,
        ws_ptr,
        QUANT: tl.constexpr, NESTED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_Z: tl.constexpr,
        IEEE: tl.constexpr, LORA_IEEE: tl.constexpr, ROWS: tl.constexpr, W_T: tl.constexpr,
        BS: tl.constexpr, EVEN_COLS: tl.constexpr, EVEN_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    a_rows = tl.minimum(offs_m, M - 1)[:, None].to(tl.int64)
    # Split-K: program (.., .., s) sums K-slice s, a whole number of BLOCK_K steps long.
    span = tl.cdiv(tl.cdiv(Q, SPLIT_K), BLOCK_K) * BLOCK_K
    q_lo = tl.program_id(2) * span
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for q0 in range(q_lo, tl.minimum(Q, q_lo + span), BLOCK_K):
        if QUANT and ROWS and W_T and SWAP:
            acc = _block_scaled_mma(acc, inp_ptr + a_rows * stride_im, stride_iq, w_ptr,
                                    absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                                    pid_n * BLOCK_N, q0, Q, P, BS, NESTED, EVEN_COLS, IEEE,
                                    BLOCK_N, BLOCK_K)
        else:
            offs_q = q0 + tl.arange(0, BLOCK_K)
            # Rows past M read row M - 1 (their outputs are never stored): only K may need a mask.
            a = load_masked(inp_ptr + a_rows * stride_im + offs_q[None, :] * stride_iq,
                            (offs_q < Q)[None, :], 0.0, not EVEN_Q)
            w = _weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                             blocksize, q0, pid_n * BLOCK_N, offs_q, offs_p, Q, P, stride_wq,
                             stride_wp, QUANT, NESTED, ROWS, W_T, BS, EVEN_COLS, EVEN_Q, BLOCK_K,
                             BLOCK_N, SWAP)
            # The weight is rounded to the activation dtype first, as dequantize-then-matmul does.
            w = w.to(a.dtype)
            if SWAP:  # accᵀ += Wopᵀ · inpᵀ: the weight is the MMA's A operand (from registers)
                acc = _mma(w, tl.trans(a), acc, IEEE)
            else:
                acc = _mma(a, w, acc, IEEE)
    if SWAP:
        acc = tl.trans(acc)
    if SPLIT_K == 1:
        _epilogue(acc, offs_m, offs_p, M, P, l_ptr, stride_lm, stride_lr, r2_ptr, stride_rr,
                  stride_rp, R, scaling, mask_ptr, stride_mm, stride_mp, bias_ptr, scale_ptr,
                  z_ptr, out_ptr, stride_om, stride_op, HAS_MASK, HAS_BIAS, HAS_SCALE, HAS_Z,
                  LORA_IEEE, BLOCK_R)
    else:  # fp32 partial sums to ws[s, m, p]; _split_k_epilogue_kernel adds them in order
        ws = ws_ptr + tl.program_id(2).to(tl.int64) * M * P + rows * P + offs_p[None, :]
        tl.store(ws, acc, mask=(offs_m[:, None] < M) & (offs_p[None, :] < P))


@triton.jit
def _split_k_epilogue_kernel(
        ws_ptr, M, P, stride_wm, stride_wp, l_ptr, stride_lm, stride_lr, r2_ptr, stride_rr, stride_rp, R, scaling,
        mask_ptr, stride_mm, stride_mp, bias_ptr, scale_ptr, z_ptr, out_ptr, stride_om, stride_op,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_Z: tl.constexpr, LORA_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr):
    """Sum the SPLIT_K partials in a fixed order (deterministic: no atomics), then the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = offs_m[:, None].to(tl.int64) * stride_wm + offs_p[None, :].to(tl.int64) * stride_wp
    valid = (offs_m[:, None] < M) & (offs_p[None, :] < P)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * (tl.cast(M, tl.int64) * P) + idx, mask=valid, other=0.0)
    _epilogue(acc, offs_m, offs_p, M, P, l_ptr, stride_lm, stride_lr, r2_ptr, stride_rr, stride_rp,
              R, scaling, mask_ptr, stride_mm, stride_mp, bias_ptr, scale_ptr, z_ptr, out_ptr,
              stride_om, stride_op, HAS_MASK, HAS_BIAS, HAS_SCALE, HAS_Z, LORA_IEEE, BLOCK_R)


# Tile configurations a GPU tuning run chooses from (`python -m peftkern.bench.tune`), per batch
# regime. Small M (decode): long K steps, split-K (SPLIT_K programs per output tile, each summing
# a slice of K into an fp32 workspace that a second launch adds up in fixed order: programs for
# every SM, at the cost of that launch), and SWAP: the kernel computes outᵀ = Wopᵀ·inpᵀ, so the
# decoded weight tile is the MMA's first operand (on sm_90a wgmma's register operand, M = 64 rows
# of W) and the few activation rows its second. The tuned choice per GPU and shape lives in
# peftkern/ops/tuning.json; one fixed config per shape keeps results the same from run to run.
SMALL_M = 16


def _configs(rows, split_k=1, swap=False, gluon=False):
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return [dict(zip(keys, r), **({"SPLIT_K": split_k} if split_k > 1 else {}),
                 **({"SWAP": True} if swap else {}), **({"GLUON": True} if gluon else {}))
            for r in rows]


CANDIDATES = {
    "small": _configs([(16, 64, 256, 4, 3)], split_k=2, swap=True)
    + _configs([(16, 64, 256, 4, 3), (16, 128, 128, 4, 3)], swap=True)
    + _configs([(16, 64, 256, 4, 3)], split_k=4, swap=True)
    + _configs([(16, 128, 128, 4, 3)], split_k=4, swap=True)
    + _configs([(16, 64, 128, 4, 3)], split_k=4, swap=True)
    + _configs([(16, 64, 128, 4, 3), (16, 32, 128, 2, 3), (16, 32, 256, 4, 3),
                (16, 128, 64, 4, 3), (16, 16, 256, 2, 4)])
    + _configs([(16, 64, 128, 4, 3)], split_k=4) + _configs([(16, 32, 128, 4, 3)], split_k=8)
    # GLUON: on sm_90+ the 16-bit 4-bit forward runs kernels/qlora_wgmma.py where it applies
    # (its own tiles); every other call, and the interpreter, the Triton kernel with the sm_90 rule
    # tiles (candidate 4)
    + _configs([(16, 128, 128, 4, 3)], split_k=4, swap=True, gluon=True),
    "large": _configs([(128, 128, 128, 8, 2), (128, 128, 128, 8, 3), (128, 128, 64, 8, 3),
                       (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                       (128, 256, 64, 8, 3), (64, 64, 64, 4, 4), (256, 128, 64, 8, 3),
                       (64, 256, 32, 4, 4)])
    # GLUON: the large-M Gluon forward and dX (kernels/qlora_wgmma.py) where they apply; every
    # other call the Triton kernel with the sm_90 rule tiles (candidate 0)
    + _configs([(128, 128, 128, 8, 2)], gluon=True),
}


def regime(M: int) -> str:
    return "small" if M <= SMALL_M else "large"


# The default where no tuned entry exists, per regime and arch family (Hopper and newer: 90;
# Ampere/Ada: 80): the candidate with the best static bound among those that compile without
# spills and fit shared memory there (`python -m peftkern.bench.static`; unmeasured on a GPU).
# On sm_90a the swapped small-M configs put the decoded weight in wgmma's register operand; of
# them 16x128x128 split-K 4 has the best bound (issue, MMA and shared-pipe time) in both passes
# at 4096x4096 and 14336x4096; on sm_80 the large 4-bit tile with BLOCK_K = 128 spills. The GLUON
# candidates (kernels/qlora_wgmma.py) have better bounds still (small M: memory-bound; large M:
# forward 0.75x and dX 1.03x the dense tile's, against the Triton 4-bit tile's 2.24x), but no GPU has run them:
# they are tuned in only where a GPU measures them and their result agrees (bench/tune.py).
RULE = {"small": {90: 4, 80: 5}, "large": {90: 0, 80: 2}}


# Candidates that the static check finds over shared memory or spilling in 16-bit on an arch
# family (`python -m peftkern.bench.static --configs all`): never tuned or picked there.
# sm_80: the swapped BLOCK_K = 256 tiles spill 8-36 B (4-bit), the large 4-bit tiles with BLOCK_K
# = 128 or 256-wide spill 112-316 B; both arches: 128x256, 256x128 and 64x256 spill (up to 1.6 KB).
# The GLUON candidates (small 13, large 10) are Hopper's: on sm_80 they would only repeat a
# Triton config.
EXCLUDED = {90: {"small": (), "large": (6, 8, 9)},
            80: {"small": (0, 1, 3, 13), "large": (0, 1, 6, 8, 9, 10)}}


def arch_family(capability: tuple[int, int] | None) -> int:
    return 90 if capability is None or capability[0] >= 9 else 80


def candidates(regime_: str, capability: tuple[int, int] | None = None) -> list[dict]:
    """The tile configs a tuning run may pick on a GPU of this compute capability."""
    out = EXCLUDED[arch_family(capability)][regime_]
    return [c for i, c in enumerate(CANDIDATES[regime_]) if i not in out]


def _config(M: int, capability: tuple[int, int] | None = None) -> dict:
    """Tiles when no tuned entry exists (RULE; `capability` None: the sm_90 rule)."""
    if INTERPRET:  # the interpreter's cost is per program: few, larger tiles
        return dict(BLOCK_M=max(16, min(64, triton.next_power_of_2(M))), BLOCK_N=64, BLOCK_K=64)
    return rule_config(regime(M), capability)


def rule_config(regime_: str, capability: tuple[int, int] | None = None) -> dict:
    """The GPU default of a regime on an arch (RULE)."""
    return CANDIDATES[regime_][RULE[regime_][arch_family(capability)]]


def _wgmma_applies(inp, packed, blocksize, forward: bool = True, P: int = 0) -> bool:
    """A Gluon kernel (a GLUON config: the forward, or the dX kernel with `forward` False and
    P = K) runs here: compiled code (not the interpreter) for an sm_90+ GPU, or no device (the
    static check records it for sm_90a), on shapes it takes."""
    M, Q = inp.shape
    fits = (qlora_wgmma.supported(M, Q, blocksize, inp.dtype) if forward
            else qlora_wgmma.dx_supported(M, Q, P, blocksize, inp.dtype))
    return (not INTERPRET and qlora_wgmma.hopper(_capability(inp.device)) and fits
            and qlora_wgmma.aligned(packed))


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def lora_matmul(inp, weight, wq: tuple, L, R2, scaling: float, mask=None, bias=None, *,
                stride_wq: int, stride_wp: int, P: int, config: dict | None = None,
                out_dtype: torch.dtype | None = None, scale=None, keep_z: bool = False):
    """Launch the fused kernel; see the module docstring.

    `weight` is the dense weight, or the packed uint8 codes when `wq` holds the 4-bit state
    `(absmax, absmax2, code8, offset, table [16], byte-pair table [256] int64 (fp32 values),
    byte-pair table in inp's dtype (`codes.byte_pair_table`), blocksize)`; `wq` is None for a
    dense weight.
    `L` is [M, R] and `R2` is [R, P], both in the LoRA dtype (the activation dtype, or fp32 for
    fp32 adapters). `config` (tile sizes, warps, stages) overrides the rule-based choice; the
    interpreter ignores warps and stages. `out_dtype` (default: inp's) is rounded to once.
    `scale` ([P], optional) multiplies each output column before the bias is added; `keep_z`
    returns `(out, z)` with z the result before the scale and the bias.
    """
    M, Q = inp.shape
    R = L.shape[1]
    out = empty((M, P), out_dtype or inp.dtype, inp.device)
    z = empty((M, P), out.dtype, inp.device) if keep_z else None
    if M == 0 or P == 0:
        return (out, z) if keep_z else out
    quant = wq is not None
    absmax, absmax2, code8, offset, table, pairs, mma_pairs, blocksize = (
        wq if quant else (weight,) * 7 + (1,))
    nested = quant and absmax2 is not None
    # Rows of whole quantization blocks (every LLM shape): the tile decoder in _decode_rows.
    forward = stride_wq == 1  # Wop = Wᵀ: the tile's columns run along K in the forward
    K = Q if forward else P
    rows = quant and K % blocksize == 0
    if not nested:
        absmax2 = code8 = offset = absmax
    cfg = {"SPLIT_K": 1, "SWAP": False, **(config or _config(M, _capability(inp.device))),
           "BLOCK_R": max(16, triton.next_power_of_2(R))}
    if INTERPRET:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    wgmma = cfg.pop("GLUON", False) and rows and _wgmma_applies(inp, weight, blocksize, forward, P)
    # the large Gluon kernels with their own epilogue (16-bit LoRA factors; DoRA's scale and z
    # take the forward's workspace path, the dX kernel has none)
    fused = (wgmma and M > qlora_wgmma.MAX_M and qlora_wgmma.lora_fits(L, R2, inp.dtype)
             and scale is None and not keep_z and (bias is None or forward)
             and (mask is None or not forward))
    if fused:
        args = (inp, weight, absmax, absmax2 if nested else None, code8, offset, mma_pairs,
                blocksize, P, L, R2, scaling)
        return (qlora_wgmma.large_linear(*args, bias, out) if forward
                else qlora_wgmma.dx_linear(*args, mask, out))
    wgmma = wgmma and forward
    split = qlora_wgmma.splits(Q, M) if wgmma else cfg["SPLIT_K"]
    # rows: one lookup per byte (the swapped forward: codes in the activation dtype, scaled per
    # block after the MMA), else one per nibble
    table = (mma_pairs if forward and cfg["SWAP"] else pairs) if rows else table
    even_cols = rows and K % cfg["BLOCK_K" if forward else "BLOCK_N"] == 0  # no column masks
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(P, cfg["BLOCK_N"]))
    if wgmma:  # the Gluon kernel's split-K partials; the epilogue kernel below adds them
        ws = qlora_wgmma.forward_partials(inp, weight, absmax, absmax2 if nested else None,
                                          code8, offset, mma_pairs, blocksize, P)
    else:
        ws = torch.empty((split, M, P), dtype=torch.float32, device=inp.device) \
            if split > 1 else out
    m = mask if mask is not None else out
    epilogue_args = (L, L.stride(0), L.stride(1), R2, R2.stride(0), R2.stride(1), R, float(scaling),
                     m, m.stride(0), m.stride(1), bias if bias is not None else out,
                     scale if scale is not None else out, z if keep_z else out, out,
                     out.stride(0), out.stride(1))
    flags = dict(HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                 HAS_SCALE=scale is not None, HAS_Z=keep_z, LORA_IEEE=L.dtype == torch.float32)
    if not wgmma:
        _lora_matmul_kernel[grid + (split,)](
            inp, M, Q, inp.stride(0), inp.stride(1), weight, P, stride_wq, stride_wp,
            absmax, absmax2, code8, offset, table, blocksize, *epilogue_args, ws,
            QUANT=quant, NESTED=nested, IEEE=inp.dtype == torch.float32, ROWS=rows, W_T=forward,
            BS=blocksize if rows else 1, EVEN_COLS=even_cols, EVEN_Q=Q % cfg["BLOCK_K"] == 0,
            **flags, **cfg, **NO_FMA)
    if split > 1 or wgmma:
        # a [split, M, P] workspace, or the large Gluon kernel's [1, P, M] seen as [1, M, P]
        _split_k_epilogue_kernel[grid](ws, M, P, ws.stride(1), ws.stride(2), *epilogue_args,
                                       **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                       BLOCK_R=cfg["BLOCK_R"], SPLIT_K=split,
                                       num_warps=max(4, cfg["BLOCK_M"] * cfg["BLOCK_N"] // 2048),
                                       **NO_FMA)
    return (out, z) if keep_z else out
