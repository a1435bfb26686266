"""peftkern: fused kernels for parameter-efficient fine-tuning (LoRA, QLoRA, AdaLoRA).

Public API: the bitsandbytes-compatible 4-bit format, the fused (Q)LoRA ops (`peftkern.ops`)
and the drop-in modules `peftkern.nn.LoRALinear` / `peftkern.nn.QLoRALinear`.
"""
from . import codes, nn, ops, reference
from .adapters import inject, load_adapter, merge, save_adapter, trainable_parameters, unmerge
from .format import QuantizedWeight
from .integrations.bitsandbytes import from_bnb, to_bnb
from .ops import dequantize_4bit, quantize_4bit

__version__ = "0.1.0"
__all__ = ["inject", "merge", "unmerge", "trainable_parameters", "save_adapter", "load_adapter",
           "QuantizedWeight", "quantize_4bit", "dequantize_4bit", "from_bnb", "to_bnb", "ops", "nn",
           "reference", "codes"]
