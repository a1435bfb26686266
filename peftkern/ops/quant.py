"""Custom ops `peftkern::quantize_4bit` and `peftkern::dequantize_4bit`.

Inputs are validated by the public API (`peftkern.format`); these ops dispatch to a backend.
Fake implementations let torch.compile trace them without graph breaks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import codes, reference
from .backends import EXT, pick


@torch.library.custom_op("peftkern::quantize_4bit", mutates_args=())
def quantize_4bit(A: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row-major codes of `A`: `(packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])`."""
    backend = pick(A.device, ("triton", "cpp", "reference"))
    A = A.contiguous()
    if backend == "triton":
        from ..kernels import quant_4bit
        dev = A.device
        return quant_4bit.quantize_4bit(A.reshape(-1), codes.bucket_bounds(quant_type, device=dev),
                                        codes.bucket_order(quant_type, device=dev), blocksize,
                                        quant_type == "fp4")
    if backend == "cpp":
        return EXT.quantize_4bit(A, codes.QUANT_TYPE_ID[quant_type], blocksize)
    return reference.quantize_4bit(A, quant_type, blocksize)


@quantize_4bit.register_fake
def _(A, quant_type, blocksize):
    n = A.numel()
    return (A.new_empty(((n + 1) // 2,), dtype=torch.uint8),
            A.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.custom_op("peftkern::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                    code8: Optional[torch.Tensor], offset: Optional[torch.Tensor], quant_type: str,
                    blocksize: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """`table[code] * absmax[block]` as `dtype` of `shape`; nested absmax when `absmax2` is given."""
    backend = pick(packed.device)
    packed = packed.reshape(-1).view(torch.uint8)
    numel = math.prod(shape)
    if backend in ("cpp", "cuda"):
        out = EXT.dequantize_4bit(packed, absmax, absmax2, code8, offset,
                                  codes.QUANT_TYPE_ID[quant_type], blocksize, numel, dtype)
    elif backend == "triton":
        from ..kernels import quant_4bit
        table = codes.code_table(quant_type, device=packed.device)
        out = quant_4bit.dequantize_4bit(packed, absmax, absmax2, code8, offset, table, blocksize,
                                         numel, dtype)
    else:
        if absmax2 is not None:
            absmax = reference.dequantize_absmax(absmax, absmax2, code8, offset)
        out = reference.dequantize_4bit(packed, absmax, quant_type, blocksize, (numel,), dtype)
    return out.view(shape)


@dequantize_4bit.register_fake
def _(packed, absmax, absmax2, code8, offset, quant_type, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)
