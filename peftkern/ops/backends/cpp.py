"""The C++ CPU backend (csrc/cpu, AVX-512/AVX2): the fused 4-bit decode GEMV for M <= 16 with
quantization blocks within rows (config "gemv"), otherwise the weight dequantized in cache-sized
panels of rows, each multiplied at once, so no full-size dequantized weight is written
("panels"); quantize / dequantize. It computes in fp32: 16-bit activations are converted (M
rows, small) and the result rounded once."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ... import codes
from . import ext
from .common import (add_grouped_lora, add_lora, add_scaled_lora, lora_xa,  # noqa: F401
                     offset_1d, packed_bytes, quant_type_id, scale_grad, scaled_output)

PANEL_ELEMS = 1 << 20  # dequantize ~4 MB of fp32 weight at a time, so it stays in cache


@functools.lru_cache(maxsize=None)
def _lora_in_kernel(M, bf16):
    """Whether the GEMV's path for M rows adds the low-rank term itself (csrc/cpu `choose`)."""
    return bool(ext.EXT.gemv_lora_in_kernel(M, bf16))


def _f32(t):
    return None if t is None else t.float().contiguous()


def weight_panels(qw, N, K, decode=None):
    """Yield `(n0, n1, W[n0:n1])` in fp32, panel by panel, decoded by `decode` (a backend's
    `dequantize_4bit`; default this one's).

    Panels start at element multiples of the absmax block (and of the nested block of 256 absmax
    when double-quantized), so each one is a valid 4-bit weight of its own; blocks may span rows.
    """
    data, absmax, absmax2, code8, offset, quant_type, blocksize = qw
    align = blocksize * (codes.NESTED_BLOCKSIZE if absmax2 is not None else 1)
    step = align // math.gcd(K, align)           # the fewest rows whose size is a multiple of align
    rows = max(step, PANEL_ELEMS // K // step * step)
    packed = packed_bytes(data)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        e0, e1 = n0 * K, n1 * K
        b0, b1 = e0 // blocksize, -(-e1 // blocksize)
        a2 = None if absmax2 is None else absmax2[b0 // codes.NESTED_BLOCKSIZE:
                                                 -(-b1 // codes.NESTED_BLOCKSIZE)]
        w = (decode or dequantize_4bit)(packed[e0 // 2:(e1 + 1) // 2], absmax[b0:b1], a2, code8,
                                        offset, quant_type, blocksize, e1 - e0, torch.float32)
        yield n0, n1, w.view(n1 - n0, K)


def qlora_linear_fwd(x, qw, out_features, bias, lora_A, lora_B, scaling, mask, compute_dtype,
                     scale=None, out_dtype=None, keep_z=False, config="panels"):
    data, absmax, absmax2, code8, offset, quant_type, blocksize = qw
    xa = lora_xa(x, lora_A, mask)
    out = out_dtype or x.dtype
    xc = x.to(compute_dtype)
    if config == "gemv":
        # the best SIMD level; bf16 products (as bnb's bf16 compute) only for bf16 compute; a
        # scale applies to the fp32 result before the bias. The low-rank term: in the kernel
        # where its path adds it to the accumulators, else by MKL after it (the kernel's scalar
        # epilogue for it took 0.2 ms of 1.15 at M=16, 4096x4096, r=16)
        bf16 = compute_dtype == torch.bfloat16
        fused = _lora_in_kernel(x.shape[0], bf16)
        y = ext.EXT.qlora_gemv(_f32(xc), packed_bytes(data), absmax, absmax2, code8,
                               offset_1d(offset), quant_type_id(quant_type), blocksize,
                               out_features, _f32(bias) if scale is None else None,
                               _f32(xa) if fused else None, _f32(lora_B) if fused else None,
                               float(scaling) if fused else 0.0, 3, bf16)
        if not fused:
            y.addmm_(_f32(xa), _f32(lora_B).t(), alpha=float(scaling))
        if scale is None:
            return y.to(out), xa, None
        return scaled_output(y, scale, bias, out), xa, y.to(out) if keep_z else None
    x32 = xc.float()  # fp32 on CPU: faster than CPU half matmuls, and one rounding at the end
    y = torch.cat([F.linear(x32, w) for _, _, w in weight_panels(qw, out_features, x.shape[1])],
                  dim=1)
    if scale is not None:
        y, z = add_scaled_lora(y, xa, lora_B, scaling, scale, bias, out, keep_z)
        return y, xa, z
    if bias is not None:
        y += bias
    return add_lora(y, xa, lora_B.t(), scaling, out_dtype=out), xa, None


def qlora_linear_dx(dy, qw, in_features, lora_A, dyb, scaling, mask, compute_dtype,
                    inp_scale=None, config=None):
    """dX = sum over panels of dY[:, panel]·W[panel], accumulated in fp32."""
    dy32 = dy.to(compute_dtype).float()
    if inp_scale is not None:
        dy32 = (dy32 * inp_scale).to(compute_dtype).float()  # dY ⊙ scale, rounded as on GPUs
    dx = dy.new_zeros(dy.shape[0], in_features, dtype=torch.float32)
    for n0, n1, w in weight_panels(qw, dy.shape[1], in_features):
        dx.addmm_(dy32[:, n0:n1], w)
    return add_lora(dx, dyb, lora_A, scaling, mask, out_dtype=dy.dtype)


def dora_norm(weight, qw, lora_A, lora_B, scaling, N, K, config=None):
    return dora_norm_panels(weight, qw, lora_A, lora_B, scaling, N, K)


def dora_norm_panels(weight, qw, lora_A, lora_B, scaling, N, K, decode=None):
    """`‖W + s·B·A‖` per row, panel by panel of rows (dense slices, or 4-bit panels decoded in
    fp32): neither `B·A` nor the whole dequantized weight exists at once. Summed in fp32 (in the
    adapters' dtype when wider), returned in the adapters' dtype."""
    wide = torch.promote_types(torch.float32, lora_A.dtype)
    A = lora_A.to(wide)
    if qw is None:
        rows = max(1, PANEL_ELEMS // max(K, 1))
        panels = ((n0, min(N, n0 + rows), weight[n0:n0 + rows]) for n0 in range(0, N, rows))
    else:
        panels = weight_panels(qw, N, K, decode)
    out = torch.empty(N, dtype=wide, device=lora_A.device)
    for n0, n1, w in panels:
        torch.linalg.vector_norm(torch.addmm(w.to(wide), lora_B[n0:n1].to(wide), A, alpha=scaling),
                                 dim=1, out=out[n0:n1])
    return out.to(lora_A.dtype)


def quantize_4bit(A, quant_type, blocksize):
    return ext.EXT.quantize_4bit(A, quant_type_id(quant_type), blocksize)


def dequantize_4bit(data, absmax, absmax2, code8, offset, quant_type, blocksize, numel, dtype):
    return ext.EXT.dequantize_4bit(packed_bytes(data), absmax, absmax2, code8, offset,
                                   quant_type_id(quant_type), blocksize, numel, dtype)
