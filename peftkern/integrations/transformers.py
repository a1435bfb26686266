"""Hugging Face transformers integration: run peftkern's AdaLoRA allocator inside `Trainer`.

`Trainer` never calls AdaLoRA's `update_and_allocate`, so under PEFT alone the ranks never change.
`AdaLoRACallback` runs a `peftkern.adalora.RankAllocator` after every optimizer step (before the
gradients are zeroed, which the sensitivity scores need), with the Trainer's global step:

    alloc = RankAllocator(peft_model)            # the schedule comes from its AdaLoraConfig
    trainer = Trainer(model=peft_model, ..., callbacks=[AdaLoRACallback(alloc)])

Use either this callback or `alloc.attach(optimizer)`, not both.
"""
from __future__ import annotations

from transformers import TrainerCallback


class AdaLoRACallback(TrainerCallback):
    """Calls `allocator.update_and_allocate(state.global_step)` after each optimizer step."""

    def __init__(self, allocator):
        from ..adalora import RankAllocator
        if not isinstance(allocator, RankAllocator):
            raise TypeError(f"allocator must be a peftkern.adalora.RankAllocator, got "
                            f"{type(allocator).__name__}")
        self.allocator = allocator
        self.budget = None  # the budget after the latest step

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.budget = self.allocator.update_and_allocate(state.global_step)
        return control
