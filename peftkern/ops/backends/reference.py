"""The reference backend: plain torch in the compute dtype, on any device (the fallback without
Triton or the extension, when forced, and fp32 matmuls on CUDA). A 4-bit weight is dequantized
into a transient buffer by the dequantize backend `dispatch.plan` names in `config`, then
multiplied by torch (cuBLAS on CUDA). The only compute-path module that may use the oracle
`peftkern.reference`: its 4-bit codec is the specification of the bytes."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ... import reference
from . import cpp, triton
from .common import add_lora, add_scaled_lora, lora_xa, packed_bytes


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mask, scale=None, out_dtype=None,
                    config=None):
    xa = lora_xa(x, lora_A, mask)
    if scale is not None:
        return add_scaled_lora(F.linear(x, weight), xa, lora_B, scaling, scale, bias,
                               out_dtype or x.dtype), xa
    return add_lora(F.linear(x, weight, bias), xa, lora_B.t(), scaling, out_dtype=out_dtype), xa


def lora_linear_dx(dy, weight, lora_A, dyb, scaling, mask, config=None):
    return add_lora(dy @ weight, dyb, lora_A, scaling, mask)


def dense_weight(qw, N, K, dtype, config):
    """The [N, K] weight in `dtype`, decoded by backend `config` (None: plain torch) into a
    transient buffer."""
    decode = {"cpp": cpp.dequantize_4bit, "cuda": cpp.dequantize_4bit,
              "triton": triton.dequantize_4bit}.get(config, dequantize_4bit)
    return decode(*qw, N * K, dtype).view(N, K)


def qlora_linear_fwd(x, qw, out_features, bias, lora_A, lora_B, scaling, mask, compute_dtype,
                     scale=None, out_dtype=None, config=None):
    xa = lora_xa(x, lora_A, mask)
    w = dense_weight(qw, out_features, x.shape[1], compute_dtype, config)
    if scale is not None:
        return add_scaled_lora(F.linear(x.to(compute_dtype), w), xa, lora_B, scaling, scale,
                               bias, out_dtype or x.dtype), xa
    y = F.linear(x.to(compute_dtype), w, bias)
    return add_lora(y, xa, lora_B.t(), scaling, out_dtype=out_dtype or x.dtype), xa


def qlora_linear_dx(dy, qw, in_features, lora_A, dyb, scaling, mask, compute_dtype, config=None):
    w = dense_weight(qw, dy.shape[1], in_features, compute_dtype, config)
    return add_lora(dy.to(compute_dtype) @ w, dyb, lora_A, scaling, mask, out_dtype=dy.dtype)


def dora_norm(weight, qw, lora_A, lora_B, scaling, N, K, config=None):
    """Panel by panel (bounded memory), 4-bit panels decoded by backend `config` (None: torch)."""
    decode = {"cpp": cpp.dequantize_4bit, "triton": triton.dequantize_4bit}.get(config,
                                                                               dequantize_4bit)
    return cpp.dora_norm_panels(weight, qw, lora_A, lora_B, scaling, N, K, decode)


def add_grouped_lora(y, x, A, B, scalings, adapter_index, table=None):
    """`y + s[a]·x·A[a]ᵀ·B[a]ᵀ` per row (adapter a = adapter_index[row], -1: none), out of place
    and differentiable: the rows sorted by adapter, one product pair per adapter present, summed
    with y in the widest dtype and rounded once. (Reads the row counts: a host sync.)"""
    n, N = A.shape[0], B.shape[1]
    key = torch.where(adapter_index < 0, n, adapter_index.long())
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n + 1).tolist()
    xs = x[order].to(A.dtype)
    pieces, start = [], 0
    for a, c in enumerate(counts[:n]):
        if c:
            pieces.append(((xs[start:start + c] @ A[a].t()) * scalings[a]) @ B[a].t())
        start += c
    pieces.append(xs.new_zeros(counts[n], N))
    lora = torch.cat(pieces)[torch.argsort(order)]
    wide = torch.promote_types(y.dtype, lora.dtype)
    return (y.to(wide) + lora.to(wide)).to(y.dtype)


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


