"""The dequantize + cuBLAS backend (CUDA; the path unsloth and Axolotl take at training sizes):
the 4-bit weight is decoded into a transient buffer in the compute dtype by the dequantize kernel
`dispatch.plan` names in `config` ("cuda" or "triton"), multiplied by torch (cuBLAS), and the
LoRA term is added in place with `addmm_`; the buffer is dropped when the call returns. dX
decodes the same bytes again. A dense weight goes straight to cuBLAS. This is the reference
backend's math (`reference.py`) with a kernel decoding the weight: one implementation, its own
name, so that `plan` and the tuner can choose it on CUDA.
"""
import torch

from .reference import (add_grouped_lora, dora_norm, lora_linear_dx,  # noqa: F401
                        lora_linear_fwd, qlora_linear_dx, qlora_linear_fwd, scale_grad)


def expert_linear(x, weight, bias, lora_A, lora_B, scaling, offsets, expert_of_row):
    """MoE: `x·W[e]ᵀ + bias[e] + s·(x·A[e]ᵀ)·B[e]ᵀ` for rows grouped by expert (`offsets`: the
    int32 cumulative row counts) with torch's grouped GEMM: three launches for all experts,
    differentiable, no `W + B·A` built. `expert_of_row` gathers the bias."""
    y = torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if lora_A is not None:
        xa = torch._grouped_mm(x, lora_A.transpose(1, 2), offs=offsets)
        y = y + scaling * torch._grouped_mm(xa, lora_B.transpose(1, 2), offs=offsets)
    return y if bias is None else y + bias[expert_of_row]
