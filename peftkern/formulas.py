"""Formulas that the compute path and the reference both use, so that neither imports the other.

Each one is PEFT's or bitsandbytes' own definition, checked against PEFT / bitsandbytes directly
in the tests (not against `peftkern.reference`): LoRA and AdaLoRA scaling, AdaLoRA's budget
schedule and pruning threshold, and bitsandbytes' 8-bit quantization of the absmax
(double quantization), which fixes the stored bytes.
"""
from __future__ import annotations

import functools
import math

import torch

from . import codes


# ---- scaling ---------------------------------------------------------------------------------

def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def adalora_scaling(lora_alpha: float, r: int) -> float:
    return lora_alpha if lora_alpha > 0 else float(r)


# ---- AdaLoRA rank budget (PEFT's RankAllocator) -----------------------------------------------

def adalora_budget(step, init_budget, target_budget, tinit, tfinal, total_step, deltaT=1):
    """PEFT's cubic budget schedule: `(budget, mask_now)`."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * mul**3 + target_budget), step % deltaT == 0


def adalora_threshold(all_scores: torch.Tensor, init_budget: int, budget: int):
    """Global threshold: ranks whose score is <= it get masked; None when nothing is pruned."""
    k = init_budget - budget
    if k <= 0:
        return None
    return torch.kthvalue(all_scores, min(k, all_scores.numel()))[0]


# ---- bitsandbytes double quantization of the absmax ---------------------------------------------

@functools.lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    # bnb's 65536-entry quantization table: bin i holds value -1 + 2i/65535 (fp32), and maps to
    # the number of fp32 midpoints of the dynamic table strictly below that value.
    table = codes.dynamic_map()
    mid = 0.5 * (table[:-1] + table[1:])
    val = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mid, val, side="left")


def quantize_blockwise_8bit(A: torch.Tensor, blocksize: int = codes.NESTED_BLOCKSIZE):
    """bnb's 8-bit dynamic blockwise quantization, exactly as its CPU library (0.50) does it.

    Per block: `v = clamp(x * (1/absmax), -1, 1)`, bin `trunc(((v + 1) * 0.5) * 65535 + 0.5)`
    of the 65536-entry table above (fp32, each operation rounded). An all-zero block gives 0.
    Returns `(q uint8 [n], absmax fp32 [ceil(n/blocksize)])`.
    """
    x = A.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)[:, None]  # zero blocks give code 0 below
    v = (padded * inv).clamp(-1.0, 1.0)
    bins = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # truncation, as the C cast
    q = _dynamic_lut().to(x.device)[bins]
    q = torch.where(absmax[:, None] == 0, 0, q)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def double_quantize(absmax: torch.Tensor):
    """bnb's compress_statistics: `offset = mean(absmax)`, then 8-bit blocks of `absmax - offset`.

    Returns `(q8 uint8 [nblocks], absmax2 fp32 [ceil(nblocks/256)], code8 fp32 [256], offset fp32 [])`.
    """
    offset = absmax.mean()
    q8, absmax2 = quantize_blockwise_8bit(absmax - offset)
    return q8, absmax2, codes.dynamic_map(device=absmax.device), offset


def dequantize_absmax(q8, absmax2, code8, offset) -> torch.Tensor:
    """`code8[q8[i]] * absmax2[i // 256] + offset`, as two separately rounded fp32 operations."""
    block = torch.arange(q8.numel(), device=q8.device) // codes.NESTED_BLOCKSIZE
    scaled = code8[q8.long()] * absmax2[block]
    return scaled + offset
