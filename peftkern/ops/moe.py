"""LoRA on mixture-of-experts weights: `expert_lora_linear` (one grouped GEMM over `[E, N, K]`
expert weights with per-expert LoRA) and `experts_forward` (a transformers experts module's
forward through it).

    y[t] = x[t]·W[e]ᵀ + bias[e] + s·(x[t]·A[e]ᵀ)·B[e]ᵀ,   e: the expert row t is routed to

Rows come grouped by expert (`group_sizes[e]` consecutive rows each, as the routers' sort gives
them). Each expert's group runs the fused LoRA op (dense, or a 4-bit expert decoded in-kernel),
so `W + B·A` is never built: PEFT's `target_parameters` materialises it for every expert on every
forward. Gradients reach x, every expert's A and B (and the bias), through the fused backward.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..format import QuantizedWeight
from ..validation import FLOAT_DTYPES, check_int_at_least, check_last_dim, check_tensor
from .backends import cublas
from .dispatch import plan_experts
from .lora import _lora_linear, _qlora_linear, base_linear, check_base, check_lora


def _n_experts(weight) -> int:
    return len(weight) if isinstance(weight, (list, tuple)) else weight.shape[0]


def _check(x, weight, bias, A, B, group_sizes, compute_dtype):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if isinstance(weight, (list, tuple)):
        if not weight or not all(isinstance(q, QuantizedWeight) for q in weight):
            raise TypeError("weight must be a [E, N, K] tensor or a non-empty list of "
                            "peftkern.QuantizedWeight (one per expert)")
        if len({tuple(q.shape) for q in weight}) != 1:
            raise ValueError("weight: every expert's QuantizedWeight must have the same shape")
        for e, q in enumerate(weight):  # each well-formed and on x's device
            base_dtype = check_base(x, q, compute_dtype, f"weight[{e}]")
        first = weight[0]
    else:
        check_tensor("weight", weight, ndim=3, dtypes=(x.dtype,), device=x.device, like="x")
        first, base_dtype = weight[0], x.dtype
    E = _n_experts(weight)
    N, K = first.shape
    check_last_dim("x", x, K)
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=(base_dtype,), device=x.device, like="x")
        if tuple(bias.shape) != (E, N):
            raise ValueError(f"bias must be [num_experts={E}, out_features={N}], got "
                             f"{tuple(bias.shape)}")
    if A is not None:
        check_tensor("lora_A", A, ndim=3, dtypes=FLOAT_DTYPES, device=x.device, like="x")
        check_tensor("lora_B", B, ndim=3, dtypes=(A.dtype,), device=x.device, like="x")
        if A.shape[0] != E or B.shape[0] != E:
            raise ValueError(f"lora_A and lora_B must hold num_experts={E} factors, got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        check_lora(x, first, None if bias is None else bias[0], A[0], B[0], 0.0, compute_dtype)
    if len(group_sizes) != E:
        raise ValueError(f"group_sizes must have num_experts={E} entries, got {len(group_sizes)}")
    for e, c in enumerate(group_sizes):
        check_int_at_least(f"group_sizes[{e}]", c, 0)
    if sum(group_sizes) != x.shape[0]:
        raise ValueError(f"group_sizes must be >= 0 and sum to the rows of x ({x.shape[0]}), "
                         f"got a sum of {sum(group_sizes)}")


def expert_lora_linear(x, weight: Union[torch.Tensor, Sequence[QuantizedWeight]],
                       bias: Optional[torch.Tensor], lora_A: Optional[torch.Tensor],
                       lora_B: Optional[torch.Tensor], scaling: float,
                       group_sizes: Union[torch.Tensor, Sequence[int]],
                       compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Grouped expert linear with per-expert LoRA for `x [S, K]` whose rows are grouped by expert.

    `weight`: `[E, N, K]` (a transposed view of a `[E, K, N]` parameter is fine) or one 4-bit
    `QuantizedWeight` per expert (`compute_dtype`: their GEMM dtype, default x's). `lora_A`
    `[E, r, K]`, `lora_B` `[E, N, r]` (None: no LoRA on this weight), `bias` `[E, N]` or None,
    `group_sizes` `[E]` rows per expert. Returns `[S, N]` in x's dtype.
    """
    sizes = group_sizes.tolist() if isinstance(group_sizes, torch.Tensor) else list(group_sizes)
    cd = compute_dtype or getattr(x, "dtype", None)
    _check(x, weight, bias, lora_A, lora_B, sizes, cd)
    return grouped_expert_linear(x, weight, bias, lora_A, lora_B, scaling, sizes, cd)


def grouped_expert_linear(x, weight, bias, A, B, scaling, sizes, compute_dtype=None):
    """`expert_lora_linear` on checked arguments, `sizes` a list of ints."""
    quant = isinstance(weight, (list, tuple))
    pieces, start = [], 0
    # no rows at all: one empty call still links y to x, A, B and bias (zero gradients, as an
    # empty matmul gives), rather than a fresh tensor that backward cannot pass through
    groups = [(e, c) for e, c in enumerate(sizes) if c] or [(0, 0)]
    for e, c in groups:
        xe, b = x[start:start + c], None if bias is None else bias[e]
        start += c
        if A is None:
            pieces.append(base_linear(xe, weight[e], b, compute_dtype))
        elif quant:
            pieces.append(_qlora_linear(xe, weight[e], b, A[e], B[e], scaling, 0.0, None,
                                        compute_dtype))
        else:
            pieces.append(_lora_linear(xe, weight[e], b, A[e], B[e], scaling))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def experts_forward(experts, loras: dict, hidden_states, top_k_index, top_k_weights):
    """A transformers experts module's forward (`use_experts_implementation`: `gate_up_proj` or
    `up_proj`, then `down_proj`, stored `[E, out, in]`, or `[E, in, out]` when `is_transposed`)
    with `loras[name] = (A [E, r, K], B [E, N, r], scaling)` on the parameters it names: tokens
    sorted by expert, one grouped call per projection, the routing weights applied and the top-k
    results summed per token in fp32 (as transformers' grouped_mm forward does)."""
    k, T = top_k_index.shape[-1], hidden_states.shape[0]
    ids = top_k_index.reshape(-1)
    ids_sorted, perm = torch.sort(ids, stable=True)
    counts = torch.bincount(ids_sorted, minlength=experts.num_experts)
    x = hidden_states[perm // k]
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    groups = _Groups(counts, ids_sorted)
    h = _project(experts, first, x, groups, loras)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _project(experts, "down_proj", h, groups, loras)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm, None]
    out = out[torch.argsort(perm)].view(T, k, -1).float().sum(dim=1)
    return out.to(hidden_states.dtype)


class _Groups:
    """The routing of one forward, in the forms the two expert paths take: device offsets for
    the grouped GEMM, host row counts (one sync, made once) for the per-expert path."""

    def __init__(self, counts, expert_of_row):
        self.counts, self.expert_of_row, self._sizes = counts, expert_of_row, None

    @property
    def offsets(self):
        return torch.cumsum(self.counts, 0, dtype=torch.int32)

    @property
    def sizes(self):
        if self._sizes is None:
            self._sizes = self.counts.tolist()
        return self._sizes


def _project(experts, name, x, groups, loras):
    w = getattr(experts, name)
    w = w.transpose(1, 2) if getattr(experts, "is_transposed", False) else w
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    A, B, s = loras.get(name, (None, None, 0.0))
    x = x.to(w.dtype)
    if plan_experts(x, w, A, B).backend == "cublas":
        B = None if B is None else B.contiguous()  # PEFT's view of B has strides it rejects
        return cublas.expert_linear(x, w, bias, A, B, s, groups.offsets, groups.expert_of_row)
    return grouped_expert_linear(x, w, bias, A, B, s, groups.sizes)
