"""The 4-bit weight format: `QuantizedWeight` (a leaf: it imports no ops; `peftkern.ops` holds
`quantize_4bit` / `dequantize_4bit`, `peftkern.integrations.bitsandbytes` the bnb interop).

Byte-identical to bitsandbytes (NF4/FP4, optional double quantization), so bnb weights and QLoRA
checkpoints are used in place. `state_dict()` uses the keys of a bnb `Linear4bit` checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

import torch

from . import codes
from .validation import (FLOAT_DTYPES, check_blocksize, check_choice, check_finite,
                         check_tensor)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclasses.dataclass
class QuantizedWeight:
    """A 4-bit blockwise-quantized weight `[N, K]`, laid out exactly as bitsandbytes does.

    data:    packed codes, `((N*K+1)//2, 1)` uint8 (or those bytes viewed as `quant_storage`);
             the even flat element is the high nibble.
    absmax:  fp32 `[nblocks]`, or uint8 `[nblocks]` when double-quantized (`nested`), with
    absmax2: fp32 `[ceil(nblocks/256)]`, code8: fp32 `[256]` (bnb's dynamic map), offset: fp32 `[]`;
             absmax[i] = code8[absmax[i]] * absmax2[i // 256] + offset.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax2: Optional[torch.Tensor] = None
    code8: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def quant_storage(self) -> torch.dtype:
        return self.data.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this weight occupies: packed codes, absmax (and nested absmax, map, offset)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device) -> "QuantizedWeight":
        """A copy on `device` (the same object when already there)."""
        if torch.device(device) == self.device:
            return self
        moved = {k: v.to(device) for k, v in self._tensors().items()}
        return dataclasses.replace(self, **moved)

    # ---- serialization (bnb Linear4bit checkpoint keys) ------------------------------------

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors under bnb's keys: `{prefix}`, `{prefix}.absmax`, `{prefix}.quant_map`, ..."""
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)}
        sd = {prefix: self.data, f"{prefix}.absmax": self.absmax,
              f"{prefix}.quant_map": codes.code_table(self.quant_type, device=self.device).clone()}
        if self.nested:
            meta.update(nested_blocksize=codes.NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=float(self.offset))
            sd[f"{prefix}.nested_absmax"] = self.absmax2
            sd[f"{prefix}.nested_quant_map"] = self.code8.clone()
        blob = json.dumps(meta).encode("utf-8")
        sd[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "weight", device=None) -> "QuantizedWeight":
        """Rebuild from `state_dict()` output or a bnb `Linear4bit` checkpoint; checks every field."""
        return _from_state_dict(sd, prefix, device)

    def save(self, path: str) -> None:
        import safetensors.torch
        safetensors.torch.save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path)

    @classmethod
    def load(cls, path: str, device=None) -> "QuantizedWeight":
        """Load a file written by `save` (safetensors only; nothing is unpickled)."""
        import safetensors.torch
        try:
            sd = safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"path {path!r} is not a readable safetensors file: {e}") from e
        return _from_state_dict(sd, "weight", device)



# ---- loading and consistency checks -----------------------------------------------------------


def checked(q: QuantizedWeight) -> QuantizedWeight:
    """Refuse a QuantizedWeight whose fields disagree (truncated, corrupted, or mismatched)."""
    check_choice("quant_type", q.quant_type, codes.QUANT_TYPES)
    check_blocksize("blocksize", q.blocksize)
    check_choice("dtype", q.dtype, FLOAT_DTYPES)
    if len(q.shape) != 2 or any(d <= 0 for d in q.shape):
        raise ValueError(f"shape must be a 2-D shape with positive sizes, got {tuple(q.shape)}")
    nbytes, nblocks = (q.numel + 1) // 2, -(-q.numel // q.blocksize)
    if q.data.numel() * q.data.element_size() != nbytes:
        raise ValueError(f"data holds {q.data.numel() * q.data.element_size()} bytes, expected "
                         f"{nbytes} for shape {tuple(q.shape)} (truncated or wrong shape?)")
    _check_vec("absmax", q.absmax, nblocks, torch.uint8 if q.nested else torch.float32)
    if q.nested:
        _check_vec("nested absmax", q.absmax2, -(-nblocks // codes.NESTED_BLOCKSIZE), torch.float32)
        _check_vec("nested quant_map", q.code8, 256, torch.float32)
        check_tensor("offset", q.offset, dtypes=(torch.float32,))
        check_finite("offset", q.offset)
        check_finite("nested absmax", q.absmax2)
    else:
        check_finite("absmax", q.absmax)
    return q


def _check_vec(name: str, t, n: int, dtype: torch.dtype) -> None:
    check_tensor(name, t, dtypes=(dtype,))
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n} (truncated or corrupted?)")


def _from_state_dict(sd: dict, prefix: str, device) -> QuantizedWeight:
    def get(key):
        if key not in sd:
            raise KeyError(f"state dict is missing {key!r} (found: {sorted(sd)[:8]})")
        return sd[key] if device is None else sd[key].to(device)

    blob_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(blob_keys) != 1:
        raise KeyError(f"state dict must hold exactly one '{prefix}.quant_state.bitsandbytes__<type>' "
                       f"entry, found {blob_keys}")
    try:
        meta = json.loads(bytes(sd[blob_keys[0]].cpu().tolist()).decode("utf-8"))
        fields = dict(shape=torch.Size(meta["shape"]), dtype=_NAME_DTYPES.get(meta["dtype"]),
                      blocksize=meta["blocksize"], quant_type=meta["quant_type"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupted quant_state metadata in {blob_keys[0]!r}: {e}") from e
    if fields["dtype"] is None:
        raise ValueError(f"quant_state dtype must be one of {list(_NAME_DTYPES)}, got {meta['dtype']!r}")
    q = QuantizedWeight(data=get(prefix), absmax=get(f"{prefix}.absmax"), **fields)
    if "nested_offset" in meta:
        q.absmax2 = get(f"{prefix}.nested_absmax")
        q.code8 = get(f"{prefix}.nested_quant_map")
        q.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=q.device)
    checked(q)
    qmap = get(f"{prefix}.quant_map")
    if not torch.equal(qmap.cpu(), codes.code_table(q.quant_type)):
        raise ValueError(f"{prefix}.quant_map is not the standard {q.quant_type} table; peftkern only "
                         "decodes bnb's NF4/FP4 tables")
    return q
