"""The single door to the kernels: torch.library custom ops, dispatched by device.

`use_backend("triton" | "cpp" | "cuda" | "reference")` forces an implementation.
"""
from .adalora import adalora_orth_reg, adalora_update_ipt
from .backends import BACKENDS, available, use_backend
from .lora import lora_linear, qlora_linear
from .quant import dequantize_4bit, quantize_4bit

__all__ = ["BACKENDS", "available", "use_backend", "quantize_4bit", "dequantize_4bit",
           "lora_linear", "qlora_linear",
           "adalora_update_ipt", "adalora_orth_reg"]
