"""The 4-bit weight format: `QuantizedWeight` (a leaf: it imports no ops; `peftkern.ops` holds
`quantize_4bit` / `dequantize_4bit`, `peftkern.integrations.bitsandbytes` the bnb interop).

Byte-identical to bitsandbytes (NF4/FP4, optional double quantization), so bnb weights and QLoRA
checkpoints are used in place. `state_dict()` uses the keys of a bnb `Linear4bit` checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Mapping
from typing import Callable, Optional

import torch

from . import codes
from .validation import (FLOAT_DTYPES, check_blocksize, check_choice, check_finite, check_path,
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
        """Write a safetensors file, atomically: a file already at `path` stays intact until the
        new one is complete."""
        check_path("path", path)
        save_safetensors({k: v.contiguous() for k, v in self.state_dict().items()}, path)

    @classmethod
    def load(cls, path: str, device=None) -> "QuantizedWeight":
        """Load a file written by `save` (safetensors only; nothing is unpickled)."""
        import safetensors.torch
        check_path("path", path)
        try:
            sd = safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"path {path!r} is not a readable safetensors file: {e}") from e
        return _from_state_dict(sd, "weight", device)



# ---- loading and consistency checks -----------------------------------------------------------


def checked(q: QuantizedWeight) -> QuantizedWeight:
    """Refuse a QuantizedWeight whose fields disagree (truncated, corrupted, or mismatched), or
    whose scales are NaN/Inf (this reads them: a host sync)."""
    check_layout(q)
    if q.nested:
        check_finite("offset", q.offset)
        check_finite("nested absmax", q.absmax2)
    else:
        check_finite("absmax", q.absmax)
    return q


def check_layout(q: QuantizedWeight, name: str = "") -> QuantizedWeight:
    """Refuse a QuantizedWeight whose fields disagree in type, size or device, without reading
    any value (cheap: the ops run it on a hand-built weight too, which a kernel would read out of
    bounds). `name` prefixes the fields in the messages ("qweight" -> "qweight.absmax ...")."""
    p = f"{name}." if name else ""
    check_choice(f"{p}quant_type", q.quant_type, codes.QUANT_TYPES)
    check_blocksize(f"{p}blocksize", q.blocksize)
    check_choice(f"{p}dtype", q.dtype, FLOAT_DTYPES)
    if not isinstance(q.shape, (tuple, list)) or len(q.shape) != 2 or \
            any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in q.shape):
        raise ValueError(f"{p}shape must be a 2-D shape with positive sizes, got {q.shape!r}")
    check_tensor(f"{p}data", q.data, ndim=(1, 2))
    nbytes, nblocks = (q.numel + 1) // 2, -(-q.numel // q.blocksize)
    if q.data.numel() * q.data.element_size() != nbytes:
        raise ValueError(f"{p}data holds {q.data.numel() * q.data.element_size()} bytes, expected "
                         f"{nbytes} for shape {tuple(q.shape)} (truncated or wrong shape?)")
    on = (q.data.device, f"{p}data")  # every field on the packed bytes' device
    _check_vec(f"{p}absmax", q.absmax, nblocks, torch.uint8 if q.nested else torch.float32, on)
    if q.nested:
        _check_vec(f"{p}nested absmax", q.absmax2, -(-nblocks // codes.NESTED_BLOCKSIZE),
                   torch.float32, on)
        _check_vec(f"{p}nested quant_map", q.code8, 256, torch.float32, on)
        check_tensor(f"{p}offset", q.offset, ndim=(0, 1), dtypes=(torch.float32,), device=on[0],
                     like=on[1])
        if q.offset.numel() != 1:
            raise ValueError(f"{p}offset must hold one value, got shape {tuple(q.offset.shape)}")
    return q


def _check_vec(name: str, t, n: int, dtype: torch.dtype, on) -> None:
    check_tensor(name, t, ndim=1, dtypes=(dtype,), device=on[0], like=on[1])
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n} (truncated or corrupted?)")


def _from_state_dict(sd: dict, prefix: str, device) -> QuantizedWeight:
    def get(key):
        if key not in sd:
            raise KeyError(f"state dict is missing {key!r} (found: {sorted(sd)[:8]})")
        check_tensor(f"state dict entry {key!r}", sd[key])
        return sd[key] if device is None else sd[key].to(device)

    if not isinstance(sd, Mapping):
        raise TypeError(f"sd must be a dict of tensors (a state dict), got {type(sd).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    blob_keys = [k for k in sd if str(k).startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(blob_keys) != 1:
        raise KeyError(f"state dict must hold exactly one '{prefix}.quant_state.bitsandbytes__<type>' "
                       f"entry, found {blob_keys}")
    try:
        meta = json.loads(bytes(get(blob_keys[0]).cpu().tolist()).decode("utf-8"))
        fields = dict(shape=torch.Size(meta["shape"]), dtype=_NAME_DTYPES.get(meta["dtype"]),
                      blocksize=meta["blocksize"], quant_type=meta["quant_type"])
        offset = float(meta["nested_offset"]) if "nested_offset" in meta else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupted quant_state metadata in {blob_keys[0]!r}: {e}") from e
    if fields["dtype"] is None:
        raise ValueError(f"quant_state dtype must be one of {list(_NAME_DTYPES)}, got {meta['dtype']!r}")
    q = QuantizedWeight(data=get(prefix), absmax=get(f"{prefix}.absmax"), **fields)
    if offset is not None:
        q.absmax2 = get(f"{prefix}.nested_absmax")
        q.code8 = get(f"{prefix}.nested_quant_map")
        q.offset = torch.tensor(offset, dtype=torch.float32, device=q.device)
    checked(q)
    qmap = get(f"{prefix}.quant_map")
    if not torch.equal(qmap.cpu(), codes.code_table(q.quant_type)):
        raise ValueError(f"{prefix}.quant_map is not the standard {q.quant_type} table; peftkern only "
                         "decodes bnb's NF4/FP4 tables")
    return q


# ---- atomic writes ----------------------------------------------------------------------------


def atomic_write(path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, flushed to disk (fsync), then renamed onto
    `path` (`os.replace`: atomic). A crash or an exception midway leaves a file already at `path`
    intact, and an exception leaves no temporary file behind."""
    path = os.fspath(path)
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the writers write by name: reopen to fsync
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename durable too, where the OS lets a folder be opened (not on Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(tensors: dict, path, metadata: Optional[dict] = None) -> None:
    """`safetensors.torch.save_file`, atomically (`atomic_write`)."""
    import safetensors.torch
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
