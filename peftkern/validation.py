"""The one place user input is checked. Messages name the argument, what was expected and what came.

Kernels and ops below the public API assume input has passed through here.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _names(items: Iterable) -> str:
    return ", ".join(str(i).replace("torch.", "") for i in items)


def check_tensor(name: str, t, *, ndim=None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got {t.dim()} (shape {tuple(t.shape)})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {_names([t.dtype])}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); refusing to quantize them")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of ({_names(choices)}), got {value!r}")


def check_blocksize(name: str, blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) \
            or blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize!r}")


def check_int_in(name: str, v, lo: int, hi: int, hi_label: str = "") -> None:
    """`v` is an int (not a bool) in [lo, hi]; `hi_label` names the upper bound in the message."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi_label}{hi}], got {v!r}")


def check_rank(name: str, r, out_features: int, in_features: int) -> None:
    check_int_in(name, r, 1, min(out_features, in_features), "min(out_features, in_features)=")


def check_probability(name: str, p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (a float), got {p!r}")
