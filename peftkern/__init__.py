"""peftkern: fused kernels for parameter-efficient fine-tuning (LoRA, QLoRA, AdaLoRA).

Public API so far: the bitsandbytes-compatible 4-bit format and the ops behind it.
"""
from . import codes, ops, reference
from .format import QuantizedWeight, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"
__all__ = ["QuantizedWeight", "quantize_4bit", "dequantize_4bit", "ops", "reference", "codes"]
