"""The dequantize + cuBLAS backend (CUDA; the path unsloth and Axolotl take at training sizes):
the 4-bit weight is decoded into a transient buffer in the compute dtype by the dequantize kernel
`dispatch.plan` names in `config` ("cuda" or "triton"), multiplied by torch (cuBLAS), and the
LoRA term is added in place with `addmm_`; the buffer is dropped when the call returns. dX
decodes the same bytes again. A dense weight goes straight to cuBLAS. This is the reference
backend's math (`reference.py`) with a kernel decoding the weight: one implementation, its own
name, so that `plan` and the tuner can choose it on CUDA.
"""
from .reference import (lora_linear_dx, lora_linear_fwd, qlora_linear_dx,  # noqa: F401
                        qlora_linear_fwd)
