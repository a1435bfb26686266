"""`multi_lora_linear`: one base layer, many LoRA adapters, one adapter per row (PEFT's mixed
`adapter_names` batches; multi-tenant serving).

    y[t] = x[t]·Wᵀ + bias + s[a]·(x[t]·A[a]ᵀ)·B[a]ᵀ,   a = adapter_index[t]  (-1: base only)

The base product runs once for the whole batch (dense, or 4-bit through the fused decode paths);
the LoRA terms run grouped: every adapter's factors stacked (`A [n, r, K]`, `B [n, N, r]`, zero-
padded to the largest rank), rows sorted by adapter, one shrink and one expand launch for all
adapters (Triton; deterministic, no atomics), so the cost does not grow with the number of
adapters. Where autograd records, or off Triton, the same sums run as differentiable torch
products, one pair per adapter present.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..format import QuantizedWeight
from ..validation import FLOAT_DTYPES, check_real, check_tensor
from .backends import MODULES
from .dispatch import plan_grouped_lora
from .lora import _rows, _unrows, base_linear, check_base, check_lora


def _check(x, weight, bias, A, B, scalings, adapter_index, compute_dtype) -> torch.Tensor:
    """Every argument checked; returns the scalings as the fp32 vector the op takes."""
    check_base(x, weight, compute_dtype)
    N, K = weight.shape
    check_tensor("A_stack", A, ndim=3, dtypes=FLOAT_DTYPES, device=x.device, like="x")
    check_tensor("B_stack", B, ndim=3, dtypes=(A.dtype,), device=x.device, like="x")
    n, r = A.shape[0], A.shape[1]
    if n < 1 or r < 1 or A.shape[2] != K:
        raise ValueError(f"A_stack must be [n_adapters >= 1, r >= 1, in_features={K}], got "
                         f"{tuple(A.shape)}")
    if tuple(B.shape) != (n, N, r):
        raise ValueError(f"B_stack must be [n_adapters={n}, out_features={N}, r={r}] to match "
                         f"A_stack, got {tuple(B.shape)}")
    check_lora(x, weight, bias, A[0], B[0], 0.0, compute_dtype)
    scalings = _scalings(scalings, x.device)
    if scalings.shape != (n,):
        raise ValueError(f"scalings must have n_adapters={n} entries, got {tuple(scalings.shape)}")
    check_tensor("adapter_index", adapter_index, dtypes=(torch.int32, torch.int64),
                 device=x.device, like="x")
    rows = x.numel() // K if K else 0
    if adapter_index.numel() != rows:
        raise ValueError(f"adapter_index must have one entry per row of x ({rows}), got "
                         f"{adapter_index.numel()}")
    if rows and not (-1 <= int(adapter_index.min()) and int(adapter_index.max()) < n):
        raise ValueError(f"adapter_index entries must be in [-1, {n - 1}] (-1: no adapter)")
    return scalings


def _scalings(scalings, device) -> torch.Tensor:
    """Real numbers (a tensor on x's device or the CPU, or a sequence) as fp32 on `device`."""
    if isinstance(scalings, torch.Tensor):
        if scalings.is_complex() or scalings.dtype == torch.bool:
            raise TypeError(f"scalings must hold real numbers, got dtype {scalings.dtype}")
        if scalings.device not in (device, torch.device("cpu")):
            raise ValueError(f"scalings is on {scalings.device}, expected {device} like x, or cpu")
        return scalings.to(device=device, dtype=torch.float32).reshape(-1)
    if isinstance(scalings, (str, bytes)) or not isinstance(scalings, Sequence):
        raise TypeError(f"scalings must be a tensor or a sequence of numbers, got "
                        f"{type(scalings).__name__}")
    return torch.tensor([check_real(f"scalings[{i}]", s) for i, s in enumerate(scalings)],
                        dtype=torch.float32, device=device)


def multi_lora_linear(x, weight, bias, A_stack, B_stack, scalings: Union[torch.Tensor, Sequence],
                      adapter_index: torch.Tensor,
                      compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mixed-adapter LoRA linear for `x [..., K]` over a dense `[N, K]` `weight` or a 4-bit
    `QuantizedWeight`: row t of x (leading dimensions flattened) gets adapter
    `adapter_index[t]` (int, -1 for none), whose factors are `A_stack[a] [r, K]` and
    `B_stack[a] [N, r]` (pad smaller ranks with zeros) and scaling `scalings[a]`.

    No dropout (inference, as PEFT's `adapter_names`). Gradients reach x and the stacks through
    the torch path. The checks read `adapter_index`'s range (a device sync); serving code that
    builds the index itself can call `grouped_lora_linear`, which skips them.
    """
    cd = compute_dtype or getattr(x, "dtype", None)
    if not isinstance(weight, (torch.Tensor, QuantizedWeight)):
        raise TypeError(f"weight must be a torch.Tensor or a peftkern.QuantizedWeight, got "
                        f"{type(weight).__name__}")
    scal = _check(x, weight, bias, A_stack, B_stack, scalings, adapter_index, cd)
    return grouped_lora_linear(x, weight, bias, A_stack, B_stack, scal, adapter_index, cd)


def grouped_lora_linear(x, weight, bias, A_stack, B_stack, scalings, adapter_index,
                        compute_dtype=None, table=None):
    """`multi_lora_linear` on checked arguments (`scalings` an fp32 tensor on x's device);
    `table`: a `block_table` of this index, to share it across the layers of one batch."""
    N, K = weight.shape
    x2 = _rows(x, K)
    idx = adapter_index.reshape(-1)
    y = base_linear(x2, weight, bias, compute_dtype)
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (x2, A_stack, B_stack, y))
    backend = plan_grouped_lora(x2, N, K, A_stack.dtype, records).backend
    y = MODULES[backend].add_grouped_lora(y, x2, A_stack, B_stack, scalings, idx,
                                          table if backend == "triton" else None)
    return _unrows(y, x)


def block_table(adapter_index: torch.Tensor, n_adapters: int):
    """The Triton kernels' row grouping for an index (None where they do not run): computed once
    per batch and passed to `grouped_lora_linear` for every layer."""
    p = plan_grouped_lora(adapter_index, 0, 0, torch.float32, False)
    if p.backend != "triton":
        return None
    return MODULES["triton"].block_table(adapter_index.reshape(-1), n_adapters)
