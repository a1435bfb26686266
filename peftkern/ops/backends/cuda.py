"""The CUDA extension backend (csrc/cuda): the 4-bit decode GEMV for M <= 16 with quantization
blocks within rows, in the compute dtype throughout, and dequantize. Other calls go elsewhere
(dispatch.plan)."""
from __future__ import annotations

import torch

from . import ext
from .common import add_lora, lora_xa, offset_1d, packed_bytes, quant_type_id, scaled_output
from .cpp import dequantize_4bit  # noqa: F401  (the same extension op, on CUDA tensors)
from .reference import add_grouped_lora, dora_norm, scale_grad  # noqa: F401  (plain torch)


def qlora_linear_fwd(x, qw, out_features, bias, lora_A, lora_B, scaling, mask, compute_dtype,
                     scale=None, out_dtype=None, keep_z=False, config=None):
    data, absmax, absmax2, code8, offset, quant_type, blocksize = qw
    xa = lora_xa(x, lora_A, mask)
    out = out_dtype or x.dtype
    fuse = lora_A.dtype == compute_dtype  # else the LoRA term is added after, in its dtype
    y = ext.EXT.qlora_gemv(x.to(compute_dtype).contiguous(), packed_bytes(data), absmax, absmax2,
                           code8, offset_1d(offset), quant_type_id(quant_type), blocksize,
                           out_features, bias if scale is None else None,
                           xa.contiguous() if fuse else None,
                           lora_B.contiguous() if fuse else None, float(scaling))
    if scale is not None:  # (base + LoRA) ⊙ scale + bias, in the widest dtype
        z = y if fuse else add_lora(y, xa, lora_B.t(), scaling,
                                    out_dtype=torch.promote_types(y.dtype, xa.dtype))
        return scaled_output(z, scale, bias, out), xa, z.to(out) if keep_z else None
    y = y.to(out) if fuse else add_lora(y, xa, lora_B.t(), scaling, out_dtype=out)
    return y, xa, None
