"""DoRA (weight-decomposed LoRA) ops, PEFT semantics: `dora_weight_norm` and `dora_linear`.

    g = m / ‖W + s·B·A‖_row        (the norm detached, as PEFT and the DoRA paper do)
    y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias                                  (no dropout)
    y = (x − xd)·Wᵀ + bias + g ⊙ (xd·Wᵀ + s·(xd·Aᵀ)·Bᵀ),  xd = drop(x)    (dropout, training)

The second line is PEFT's `base(x) + (g − 1)·base(xd) + g·s·lora(xd)` rearranged: with dropout
PEFT runs the base layer twice, and so does this. The norm is one pass over the weight (the
Triton kernel decodes 4-bit rows in-kernel; elsewhere panels of rows), never `B·A` or the whole
dequantized weight. The rest is the fused LoRA op with `g` as its output scale (in the
epilogue; after it where autograd records, so that `m` gets its gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..format import QuantizedWeight, check_layout
from ..validation import FLOAT_DTYPES, check_real, check_tensor
from .backends import MODULES
from .backends.common import scaled_output
from .dispatch import _plan
from .dtensor import on_local_rows
from . import lora
from .lora import (_eager, _lora_linear, _passed, _qlora_linear, _remember, _rows, _signature,
                   _unrows, base_linear, check_factors, check_features, check_lora)


def _norm(weight: Optional[torch.Tensor], data: Optional[torch.Tensor],
          absmax: Optional[torch.Tensor], absmax2: Optional[torch.Tensor],
          code8: Optional[torch.Tensor], offset: Optional[torch.Tensor], quant_type: str,
          blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, N: int,
          K: int) -> torch.Tensor:
    p = _plan("dora_norm", lora_A, N, K, blocksize, lora_A.dtype)
    qw = None if data is None else (data, absmax, absmax2, code8, offset, quant_type, blocksize)
    return MODULES[p.backend].dora_norm(weight, qw, lora_A, lora_B, scaling, N, K, p.config)


dora_norm_op = torch.library.custom_op("peftkern::dora_norm", _norm, mutates_args=())


@dora_norm_op.register_fake
def _(weight, data, absmax, absmax2, code8, offset, quant_type, blocksize, lora_A, lora_B, scaling,
      N, K):
    return lora_A.new_empty(N)


def dora_weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """`‖W + s·B·A‖₂` of every row, `[out_features]` in the adapters' dtype, without gradient.

    `weight` is the dense `[N, K]` base weight (a transposed view is fine) or a 4-bit
    `QuantizedWeight`, decoded in fp32 (exactly, as the fused ops do). Summed in fp32."""
    if isinstance(weight, QuantizedWeight):
        check_layout(weight, "weight")
    else:
        check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    N, K = weight.shape
    check_factors(lora_A, lora_B, N, K, weight.device, like="weight")
    return _weight_norm(weight, lora_A, lora_B, scaling)


@torch.no_grad()
def _weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    """`dora_weight_norm` on checked arguments (`dora_linear` checked them)."""
    N, K = weight.shape
    q = weight if isinstance(weight, QuantizedWeight) else None
    args = (None if q else weight, *((q.data, q.absmax, q.absmax2, q.code8, q.offset,
                                      q.quant_type, q.blocksize) if q else
                                     (None,) * 5 + ("nf4", 0)),
            lora_A.detach(), lora_B.detach(), check_real("scaling", scaling), N, K)
    if _eager([t for t in args if isinstance(t, torch.Tensor)]):
        return _norm(*args)
    return dora_norm_op(*args)


def _fused(x, weight, bias, A, B, s, compute_dtype, scale=None, out_dtype=None):
    """The fused (Q)LoRA forward without dropout: `(x·Wᵀ + s·x·Aᵀ·Bᵀ) [⊙ scale] + bias`."""
    if isinstance(weight, QuantizedWeight):
        return _qlora_linear(x, weight, bias, A, B, s, 0.0, None, compute_dtype, scale, out_dtype)
    return _lora_linear(x, weight, bias, A, B, s, scale=scale, out_dtype=out_dtype)


@on_local_rows
def dora_linear(x, weight, bias, lora_A, lora_B, scaling: float, magnitude: torch.Tensor,
                dropout_p: float = 0.0, dropout_mask: Optional[torch.Tensor] = None,
                weight_norm: Optional[torch.Tensor] = None,
                compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """DoRA linear (PEFT's `use_dora=True`) for `x [..., K]` over a dense `[N, K]` `weight` or a
    4-bit `QuantizedWeight`; `magnitude` is PEFT's `lora_magnitude_vector` `[N]`.

    Gradients reach x, A, B, the magnitude and a trainable bias (dW too for a dense weight that
    requires grad); the norm is a constant, as in PEFT. `weight_norm` (`dora_weight_norm`'s
    result) skips recomputing it: PEFT caches it in eval mode. Dropout (the mask drawn once, or
    `dropout_mask`, already scaled by 1/(1-p)) follows PEFT: the LoRA input and the scaled base
    product see `drop(x)`, the unscaled base product sees x. `compute_dtype` is the 4-bit base
    GEMM's dtype (default x's), as in `qlora_linear`.
    """
    quant = isinstance(weight, QuantizedWeight)
    sig = _signature("dora", x, weight, bias, lora_A, lora_B, magnitude, weight_norm, dropout_p,
                     compute_dtype)
    cd = compute_dtype or getattr(x, "dtype", None)
    if not _passed(sig):
        if not quant and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor or a peftkern.QuantizedWeight, got "
                            f"{type(weight).__name__}")
        check_lora(x, weight, bias, lora_A, lora_B, dropout_p, cd)
        check_features("magnitude", magnitude, weight.shape[0], x.device)
        if weight_norm is not None:
            check_features("weight_norm", weight_norm, weight.shape[0], x.device)
        _remember(sig)
    norm = _weight_norm(weight, lora_A, lora_B, scaling) if weight_norm is None \
        else weight_norm.detach()
    g = magnitude / norm
    N, K = weight.shape
    x2 = _rows(x, K)
    mask = lora._mask(x2, dropout_p, dropout_mask, lora_A.dtype)  # one draw for both terms
    if mask is None:  # the scale in the fused op's epilogue, or after it under autograd
        y = _fused(x2, weight, bias, lora_A, lora_B, scaling, cd, scale=g)
    else:
        xd = (x2.to(lora_A.dtype) * mask).to(x.dtype)
        rest = base_linear(x2 - xd, weight, bias, cd)
        u = _fused(xd, weight, None, lora_A, lora_B, scaling, cd,
                   out_dtype=torch.promote_types(x.dtype, lora_A.dtype))  # wide until scaled
        y = scaled_output(u, g, rest.to(u.dtype), x.dtype)
    return _unrows(y, x)
