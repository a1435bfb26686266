"""The one place user input is checked. Messages name the argument, what was expected and what came.

Kernels and ops below the public API assume input has passed through here.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _names(items: Iterable) -> str:
    return ", ".join(str(i).replace("torch.", "") for i in items)


def check_tensor(name: str, t, *, ndim=None, dtypes=None, device=None,
                 like: str = "the other inputs") -> torch.Tensor:
    """`t` a tensor of rank `ndim`, a dtype in `dtypes`, on `device` (that of `like`)."""
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
        raise ValueError(f"{name} is on {t.device}, expected {device} like {like}")
    return t


def check_last_dim(name: str, x: torch.Tensor, in_features: int) -> None:
    """`x [..., in_features]` (a layer's input)."""
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{name} must have in_features={in_features} as its last dimension, got "
                         f"shape {tuple(x.shape)}")


def check_input(name: str, x, in_features: int, device=None, like: str = "weight") -> None:
    """A layer's float input `[..., in_features]`, on the layer's device."""
    check_tensor(name, x, dtypes=FLOAT_DTYPES, device=device, like=like)
    check_last_dim(name, x, in_features)


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":  # no values to check (nor to quantize)
        raise ValueError(f"{name} is on the meta device: its values are needed, and it has none")
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


def check_int_at_least(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")


def check_real(name: str, v, lo: Optional[float] = None) -> float:
    """`v` as a float: a real number (an int, a float, a one-element real tensor; not a bool, a
    string or a complex). NaN passes unless `lo` is given (then `v >= lo`): only quantization
    refuses NaN; a scaling of NaN is the caller's business, as in torch."""
    try:
        if isinstance(v, (bool, str, bytes)) or getattr(v, "is_complex", bool)():
            raise TypeError
        f = float(v)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise TypeError(f"{name} must be a real number, got {v!r}") from None
    if lo is not None and not f >= lo:
        raise ValueError(f"{name} must be a real number >= {lo}, got {v!r}")
    return f


def check_path(name: str, path) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
