"""The one table of quantization codes (bitsandbytes-compatible).

Everything that encodes or decodes 4-bit weights reads its values from here; the C++/CUDA header
`csrc/include/peftkern/codes.h` mirrors them and a test checks that the two agree.
"""
from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")
QUANT_TYPE_ID = {"nf4": 0, "fp4": 1}  # the integer the C++/Triton kernels take
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bnb's blocksize for the 8-bit quantization of absmax (double quant)
GEMV_MAX_ROWS = 16  # the C++/CUDA decode GEMVs take M <= 16 (kMaxGemvRows in codes.h)

NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) as bnb lists it, normalized by 12 in fp32.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# Quantization sorts the table and buckets the scaled value between fp32 midpoints (bnb's
# CPU path). For NF4 the table is already sorted; for FP4, bucket i holds code FP4_ORDER[i].
# bnb's order puts +0 before -0, so values in (0, 0.0026] get code 8 (-0.0): kept, for bytes.
FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


@functools.lru_cache(maxsize=None)
def _table_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    return torch.tensor(_FP4_RAW, dtype=torch.float32) / torch.tensor(12.0)


def _cached_on(fn):
    """Make `fn(*args)` -> CPU tensor into `fn(*args, device=None)`, cached per device.

    The tables are tiny and read-only: one copy per device, so kernels never re-upload them.
    """
    @functools.lru_cache(maxsize=None)
    def on_device(args, device):
        return fn(*args).to(device)

    @functools.wraps(fn)
    def get(*args, device=None):
        return on_device(args, torch.device(device if device is not None else "cpu"))
    return get


@_cached_on
def code_table(quant_type: str) -> torch.Tensor:
    """The 16 fp32 values that codes 0..15 decode to (read-only, cached per device)."""
    return _table_cpu(quant_type)


@_cached_on
def byte_pair_table(quant_type: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of a packed byte's high nibble (low half) and low nibble (high half), so that
    the fused GEMM looks a whole byte up at once (cached per device): [256] int64 of two fp32
    values, or with a 16-bit `dtype` [256] int32 of two values rounded once to it."""
    b = torch.arange(256)
    t = code_table(quant_type).to(dtype)
    pair = torch.stack([t[b >> 4], t[b & 15]], 1).contiguous()
    return pair.view(torch.int64 if dtype == torch.float32 else torch.int32).reshape(256)


@_cached_on
def bucket_order(quant_type: str) -> torch.Tensor:
    """int64 map from sorted-bucket index to code."""
    order = tuple(range(16)) if quant_type == "nf4" else FP4_ORDER
    return torch.tensor(order, dtype=torch.int64)


@_cached_on
def bucket_bounds(quant_type: str) -> torch.Tensor:
    """The 15 fp32 midpoints between consecutive sorted table values."""
    s = _table_cpu(quant_type)[bucket_order(quant_type)]
    return (s[:-1] + s[1:]) / 2


@_cached_on
def dynamic_map() -> torch.Tensor:
    """bnb's signed dynamic 8-bit table (256 sorted fp32 values), as stored in the nested state."""
    # bnb's create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).
    data = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)

