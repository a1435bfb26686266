"""The 4-bit quantize / dequantize ops.

Public: `quantize_4bit(weight) -> QuantizedWeight` and `dequantize_4bit(qweight)`, validated here.
Underneath, the custom ops `peftkern::quantize_4bit` / `peftkern::dequantize_4bit` on flat packed
bytes (`quantize_blocks`, `dequantize_blocks`) plan a backend, then call it; their fake
implementations let torch.compile trace them without graph breaks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import codes, formulas
from ..format import QuantizedWeight
from ..validation import (FLOAT_DTYPES, check_blocksize, check_bool, check_choice, check_finite,
                          check_tensor)
from .backends import MODULES
from .dispatch import _plan


@torch.library.custom_op("peftkern::quantize_4bit", mutates_args=())
def quantize_blocks(A: torch.Tensor, quant_type: str, blocksize: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row-major codes of `A`: `(packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])`."""
    p = _plan("quantize_4bit", A)
    return MODULES[p.backend].quantize_4bit(A.contiguous(), quant_type, blocksize)


@quantize_blocks.register_fake
def _(A, quant_type, blocksize):
    n = A.numel()
    return (A.new_empty(((n + 1) // 2,), dtype=torch.uint8),
            A.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.custom_op("peftkern::dequantize_4bit", mutates_args=())
def dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                      code8: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                      quant_type: str, blocksize: int, shape: list[int],
                      dtype: torch.dtype) -> torch.Tensor:
    """`table[code] * absmax[block]` as `dtype` of `shape`; nested absmax when `absmax2` is given."""
    p = _plan("dequantize_4bit", packed)
    return MODULES[p.backend].dequantize_4bit(packed, absmax, absmax2, code8, offset, quant_type,
                                              blocksize, math.prod(shape), dtype).view(shape)


@dequantize_blocks.register_fake
def _(packed, absmax, absmax2, code8, offset, quant_type, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, quant_storage: torch.dtype = torch.uint8
                  ) -> QuantizedWeight:
    """Quantize a `[N, K]` fp32/fp16/bf16 weight to bnb's 4-bit format (any strides accepted).

    The absmax double quantization is small (1/blocksize of the weight) and runs in torch
    (`peftkern.formulas.double_quantize`, bnb's arithmetic), on the weight's device.
    """
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    check_choice("quant_type", quant_type, codes.QUANT_TYPES)
    check_blocksize("blocksize", blocksize)
    check_bool("double_quant", double_quant)
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {type(quant_storage).__name__}")
    nbytes = (weight.numel() + 1) // 2
    if nbytes % quant_storage.itemsize:
        raise ValueError(f"quant_storage {quant_storage} needs the packed size ({nbytes} bytes) to "
                         f"be a multiple of {quant_storage.itemsize}; use torch.uint8")
    check_finite("weight", weight)
    packed, absmax = quantize_blocks(weight, quant_type, blocksize)
    nested = {}
    if double_quant:
        q8, absmax2, code8, offset = formulas.double_quantize(absmax)
        nested = dict(absmax=q8, absmax2=absmax2, code8=code8.clone(), offset=offset)
    return QuantizedWeight(data=packed.view(quant_storage).unsqueeze(1),
                           absmax=nested.pop("absmax", absmax), shape=weight.shape,
                           dtype=weight.dtype, blocksize=blocksize, quant_type=quant_type, **nested)


def dequantize_4bit(qweight: QuantizedWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The `[N, K]` weight decoded from `qweight`, in `dtype` (default: the original dtype)."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a peftkern.QuantizedWeight, got {type(qweight).__name__}")
    dtype = qweight.dtype if dtype is None else dtype
    check_choice("dtype", dtype, FLOAT_DTYPES)
    q = qweight
    return dequantize_blocks(q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type,
                             q.blocksize, list(q.shape), dtype)


