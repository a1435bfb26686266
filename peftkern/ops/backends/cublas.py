"""The dequantize + cuBLAS backend (CUDA; the path unsloth and Axolotl take at training sizes):
the 4-bit weight is decoded into a transient buffer in the compute dtype by the dequantize kernel
`dispatch.plan` names in `config` ("cuda" or "triton"), multiplied by torch (cuBLAS), and the
LoRA term is added in place with `addmm_`; the buffer is freed when the call returns. dX decodes
the same bytes again (nothing is re-quantized or kept). A dense weight goes straight to cuBLAS."""
from __future__ import annotations

import torch.nn.functional as F

from . import cpp, triton
from .common import add_lora, lora_xa

_DEQUANT = {"cuda": cpp.dequantize_4bit, "triton": triton.dequantize_4bit}


def _plus_lora(y, L, R2, scaling, mask, out_dtype):
    """`y + s·(L·R2) [⊙ mask]` in place when nothing needs a wider dtype (the common case: the
    adapters in the compute dtype, no dropout mask on the output), else `common.add_lora`."""
    if mask is None and L.dtype == y.dtype == out_dtype:
        return y.addmm_(L, R2, alpha=scaling)
    return add_lora(y, L, R2, scaling, mask, out_dtype=out_dtype)


def _weight(qw, N, K, dtype, config):
    return _DEQUANT[config](*qw, N * K, dtype).view(N, K)


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mask, config=None):
    xa = lora_xa(x, lora_A, mask)
    return _plus_lora(F.linear(x, weight, bias), xa, lora_B.t(), scaling, None, x.dtype), xa


def lora_linear_dx(dy, weight, lora_A, dyb, scaling, mask, config=None):
    return _plus_lora(dy @ weight, dyb, lora_A, scaling, mask, dy.dtype)


def qlora_linear_fwd(x, qw, out_features, bias, lora_A, lora_B, scaling, mask, compute_dtype,
                     config="triton"):
    xa = lora_xa(x, lora_A, mask)
    w = _weight(qw, out_features, x.shape[1], compute_dtype, config)
    y = F.linear(x.to(compute_dtype), w, bias)
    del w  # the transient buffer goes back to the allocator before the LoRA term
    return _plus_lora(y, xa, lora_B.t(), scaling, None, x.dtype), xa


def qlora_linear_dx(dy, qw, in_features, lora_A, dyb, scaling, mask, compute_dtype,
                    config="triton"):
    w = _weight(qw, dy.shape[1], in_features, compute_dtype, config)
    dx = dy.to(compute_dtype) @ w
    del w
    return _plus_lora(dx, dyb, lora_A, scaling, mask, dy.dtype)

