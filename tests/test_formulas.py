"""peftkern.formulas, which the compute path and the reference share: LoRA/AdaLoRA scaling, the
AdaLoRA budget schedule and threshold, bnb's double quantization of the absmax."""
import math

import torch

from peftkern import formulas as F
from peftkern import reference as R


def test_double_quantization_round_trip_is_close(gen):
    absmax = torch.rand(1000, generator=gen) * 3
    q8, absmax2, code8, offset = F.double_quantize(absmax)
    back = F.dequantize_absmax(q8, absmax2, code8, offset)
    # dynamic 8-bit code: relative step <= ~1/64 of each 256-block's range
    assert (back - absmax).abs().max() <= (absmax - offset).abs().max() / 64


def test_scalings():
    assert F.lora_scaling(16, 32) == 2.0
    assert F.lora_scaling(16, 32, use_rslora=True) == 8.0
    assert F.adalora_scaling(0, 12) == 12.0 and F.adalora_scaling(32, 12) == 32


def test_adalora_budget_edges():
    assert F.adalora_budget(0, 24, 8, 3, 5, 40) == (24, False)
    assert F.adalora_budget(36, 24, 8, 3, 5, 40) == (8, True)
    b, _ = F.adalora_budget(10, 24, 8, 3, 5, 40)
    assert b == int((24 - 8) * (1 - 7 / 32) ** 3 + 8)
    assert F.adalora_threshold(torch.arange(5.0), 5, 5) is None  # nothing to prune
    assert F.adalora_threshold(torch.arange(5.0), 10, 0) == 4.0  # k past the end: clamp, no crash
    assert not math.isnan(float(F.adalora_threshold(torch.arange(5.0), 5, 4)))


def test_the_reference_uses_these_formulas_not_copies():
    for name in ("lora_scaling", "adalora_scaling", "adalora_budget", "adalora_threshold",
                 "double_quantize", "dequantize_absmax", "quantize_blockwise_8bit"):
        assert getattr(R, name) is getattr(F, name), name
