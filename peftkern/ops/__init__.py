"""The single door to the kernels: torch.library custom ops that plan a backend, then call it.

`plan(op, x, weight)` says which backend and tile config run a call and why (`dispatch.py`);
`use_backend("triton" | "cpp" | "cuda" | "reference")` forces an implementation.
"""
from . import backends
from .adalora import adalora_orth_reg, adalora_update_ipt
from .dora import dora_linear, dora_weight_norm
from .dispatch import BACKENDS, Plan, available, plan, use_backend, use_config
from .lora import lora_linear, qlora_linear
from .moe import expert_lora_linear
from .multi_lora import multi_lora_linear
from .quant import dequantize_4bit, quantize_4bit

__all__ = ["BACKENDS", "Plan", "available", "plan", "use_backend", "use_config", "backends",
           "quantize_4bit", "dequantize_4bit", "lora_linear", "qlora_linear",
           "dora_linear", "dora_weight_norm", "multi_lora_linear",
           "expert_lora_linear",
           "adalora_update_ipt", "adalora_orth_reg"]
