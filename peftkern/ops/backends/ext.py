"""The C++/CUDA extension `peftkern._C`, loaded once (None when it is not built or fails to load).

Backends call it as `ext.EXT.<op>` at call time, so a test can wrap it in one place.
"""
from __future__ import annotations

import importlib.util

import torch


def _load():
    if importlib.util.find_spec("peftkern._C") is None:
        return None, "peftkern._C is not built (installed with PEFTKERN_NO_EXT=1, or not installed)"
    try:
        from ... import _C  # noqa: F401  (importing registers torch.ops.peftkern_C)
    except ImportError as e:  # built against another torch, for example
        return None, f"peftkern._C failed to load: {e}"
    return torch.ops.peftkern_C, None


EXT, EXT_ERROR = _load()
HAS_CUDA = EXT is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "peftkern_C::dequantize_4bit", "CUDA")
