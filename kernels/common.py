"""Shared Triton helpers for every kernel here, and the one place TRITON_INTERPRET is read."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# CPython's os.environ keeps its encoded entries in `_data`: read there, the switch costs a dict
# lookup instead of ~0.6 µs of key encoding (it is read on every op call); elsewhere, os.environ.
_ENV = getattr(os.environ, "_data", None)
_KEY, _ON = (os.environ.encodekey("TRITON_INTERPRET"), os.environ.encodevalue("1")) \
    if isinstance(_ENV, dict) and hasattr(os.environ, "encodekey") else (None, None)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors through its interpreter (tests).
    Read at each call, as Triton's launcher does; INTERPRET is what it was at import."""
    if _KEY is not None:
        return _ENV.get(_KEY) == _ON
    return os.environ.get("TRITON_INTERPRET") == "1"


INTERPRET = interpreting()
# Dequantizing double-quantized absmax is `code8[q] * absmax2 + offset` with two roundings, as in
# bitsandbytes; fusing them into an FMA would change the last bit of some weights.
NO_FMA = {} if INTERPRET else {"enable_fp_fusion": False}
# Tests set PEFTKERN_NAN_FILL=1 so that outputs start as NaN (or 0xAB bytes): unwritten elements fail.
NAN_FILL = os.environ.get("PEFTKERN_NAN_FILL") == "1"


def empty(shape, dtype, device):
    if not NAN_FILL:
        return torch.empty(shape, dtype=dtype, device=device)
    shape = shape if isinstance(shape, tuple) else (shape,)
    return torch.full(shape, float("nan") if dtype.is_floating_point else 0xAB, dtype=dtype,
                      device=device)


@triton.jit
def load_masked(ptr, mask, other, MASKED: tl.constexpr):
    if MASKED:
        val = tl.load(ptr, mask=mask, other=other)
    else:
        val = tl.load(ptr)
    return val
