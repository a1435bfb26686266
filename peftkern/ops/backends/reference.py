"""The reference backend: plain torch in the compute dtype, on any device (the fallback without
Triton or the extension, when forced, and fp32 matmuls on CUDA). A 4-bit weight is dequantized
into a transient buffer by the dequantize backend `dispatch.plan` names in `config`, then
multiplied by torch (cuBLAS on CUDA). The only compute-path module that may use the oracle
`peftkern.reference`: its 4-bit codec is the specification of the bytes."""
from __future__ import annotations


import torch.nn.functional as F

from ... import reference
from . import cpp, triton
from .common import (add_grouped_lora, add_lora, add_scaled_lora, lora_xa,  # noqa: F401
                     packed_bytes, scale_grad)


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mask, scale=None, out_dtype=None,
                    keep_z=False, config=None):
    xa = lora_xa(x, lora_A, mask)
    if scale is not None:
        y, z = add_scaled_lora(F.linear(x, weight), xa, lora_B, scaling, scale, bias,
                               out_dtype or x.dtype, keep_z)
        return y, xa, z
    return add_lora(F.linear(x, weight, bias), xa, lora_B.t(), scaling, out_dtype=out_dtype), xa, None


def lora_linear_dx(dy, weight, lora_A, dyb, scaling, mask, inp_scale=None, config=None):
    base = (dy if inp_scale is None else (dy * inp_scale).to(dy.dtype)) @ weight
    return add_lora(base, dyb, lora_A, scaling, mask)


def dense_weight(qw, N, K, dtype, config):
    """The [N, K] weight in `dtype`, decoded by backend `config` (None: plain torch) into a
    transient buffer."""
    decode = {"cpp": cpp.dequantize_4bit, "cuda": cpp.dequantize_4bit,
              "triton": triton.dequantize_4bit}.get(config, dequantize_4bit)
    return decode(*qw, N * K, dtype).view(N, K)


def qlora_linear_fwd(x, qw, out_features, bias, lora_A, lora_B, scaling, mask, compute_dtype,
                     scale=None, out_dtype=None, keep_z=False, config=None):
    xa = lora_xa(x, lora_A, mask)
    w = dense_weight(qw, out_features, x.shape[1], compute_dtype, config)
    if scale is not None:
        y, z = add_scaled_lora(F.linear(x.to(compute_dtype), w), xa, lora_B, scaling, scale,
                               bias, out_dtype or x.dtype, keep_z)
        return y, xa, z
    y = F.linear(x.to(compute_dtype), w, bias)
    return add_lora(y, xa, lora_B.t(), scaling, out_dtype=out_dtype or x.dtype), xa, None


def qlora_linear_dx(dy, qw, in_features, lora_A, dyb, scaling, mask, compute_dtype,
                    inp_scale=None, config=None):
    w = dense_weight(qw, dy.shape[1], in_features, compute_dtype, config)
    dyc = dy if inp_scale is None else dy * inp_scale
    return add_lora(dyc.to(compute_dtype) @ w, dyb, lora_A, scaling, mask, out_dtype=dy.dtype)


def dora_norm(weight, qw, lora_A, lora_B, scaling, N, K, config=None):
    """Panel by panel (bounded memory), 4-bit panels decoded by backend `config` (None: torch)."""
    decode = {"cpp": cpp.dequantize_4bit, "triton": triton.dequantize_4bit}.get(config,
                                                                               dequantize_4bit)
    return cpp.dora_norm_panels(weight, qw, lora_A, lora_B, scaling, N, K, decode)


def quantize_4bit(A, quant_type, blocksize):
    return reference.quantize_4bit(A, quant_type, blocksize)


def dequantize_4bit(data, absmax, absmax2, code8, offset, quant_type, blocksize, numel, dtype):
    if absmax2 is not None:
        absmax = reference.dequantize_absmax(absmax, absmax2, code8, offset)
    return reference.dequantize_4bit(packed_bytes(data), absmax, quant_type, blocksize, (numel,),
                                     dtype)


def adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2, rank_dim):
    ipt, unc = reference.adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2)
    exp_avg_ipt.copy_(ipt)
    exp_avg_unc.copy_(unc)
    return (ipt * unc).float().mean(dim=1 - rank_dim)


