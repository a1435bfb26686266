"""The 4-bit weight format: `QuantizedWeight`, `quantize_4bit`, `dequantize_4bit`.

Byte-identical to bitsandbytes (NF4/FP4, optional double quantization), so bnb weights and QLoRA
checkpoints are used in place. `state_dict()` uses the keys of a bnb `Linear4bit` checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

import torch

from . import codes, formulas, ops
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

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_4bit(self, dtype)

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

    # ---- bitsandbytes interop (bytes are shared, never copied) -----------------------------

    @classmethod
    def from_bnb(cls, param, check: bool = True) -> "QuantizedWeight":
        """View a `bnb.nn.Params4bit` (or a `bnb.nn.Linear4bit`) without copying its bytes.

        `check=False` skips the consistency checks (which read the data: a host sync), for
        per-call use on a weight that was checked once.
        """
        param = getattr(param, "weight", param)
        qs = getattr(param, "quant_state", None)
        if qs is None:
            raise ValueError("param must be a quantized bitsandbytes Params4bit (its quant_state is "
                             "None: bnb quantizes when the module is moved to a device)")
        if getattr(qs, "packing_format_for_cpu", False):
            # bnb >= 0.50 repacks weights in place for its AVX512-BF16 CPU inference path (absmax
            # rounded to bf16). Restore its standard layout the way bnb does before saving.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
            param.data, param.quant_state = _convert_weight_packed_for_cpu_inverse(param.data, qs)
            qs = param.quant_state
        fields = dict(data=param.data, absmax=qs.absmax, shape=torch.Size(qs.shape), dtype=qs.dtype,
                      blocksize=qs.blocksize, quant_type=qs.quant_type)
        if qs.nested:
            if qs.state2.blocksize != codes.NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize must be {codes.NESTED_BLOCKSIZE}, "
                                 f"got {qs.state2.blocksize}")
            fields.update(absmax2=qs.state2.absmax, code8=qs.state2.code, offset=qs.offset)
        return _checked(cls(**fields)) if check else cls(**fields)

    def to_bnb(self):
        """A `bnb.nn.Params4bit` sharing this weight's bytes (needs bitsandbytes)."""
        try:
            import bitsandbytes as bnb
            from bitsandbytes.functional import QuantState
        except ImportError as e:
            raise ImportError("to_bnb() needs bitsandbytes: pip install bitsandbytes") from e
        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code8,
                                blocksize=codes.NESTED_BLOCKSIZE, dtype=torch.float32)
        qs = QuantState(absmax=self.absmax, shape=self.shape, dtype=self.dtype,
                        code=codes.code_table(self.quant_type, device=self.device).clone(),
                        blocksize=self.blocksize, quant_type=self.quant_type,
                        offset=self.offset, state2=state2)
        return bnb.nn.Params4bit(data=self.data, requires_grad=False, quant_state=qs,
                                 blocksize=self.blocksize, compress_statistics=self.nested,
                                 quant_type=self.quant_type, quant_storage=self.data.dtype,
                                 bnb_quantized=True)


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, quant_storage: torch.dtype = torch.uint8
                  ) -> QuantizedWeight:
    """Quantize a `[N, K]` fp32/fp16/bf16 weight to bnb's 4-bit format (any strides accepted).

    The absmax double quantization is small (1/blocksize of the weight) and always runs through
    the torch reference, on the weight's device.
    """
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    check_choice("quant_type", quant_type, codes.QUANT_TYPES)
    check_blocksize("blocksize", blocksize)
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {type(quant_storage).__name__}")
    nbytes = (weight.numel() + 1) // 2
    if nbytes % quant_storage.itemsize:
        raise ValueError(f"quant_storage {quant_storage} needs the packed size ({nbytes} bytes) to "
                         f"be a multiple of {quant_storage.itemsize}; use torch.uint8")
    check_finite("weight", weight)
    packed, absmax = ops.quantize_4bit(weight, quant_type, blocksize)
    nested = {}
    if double_quant:
        q8, absmax2, code8, offset = formulas.double_quantize(absmax)
        nested = dict(absmax=q8, absmax2=absmax2, code8=code8.clone(), offset=offset)
    return QuantizedWeight(data=packed.view(quant_storage).unsqueeze(1),
                           absmax=nested.pop("absmax", absmax), shape=weight.shape,
                           dtype=weight.dtype, blocksize=blocksize, quant_type=quant_type, **nested)


def dequantize_4bit(qweight: QuantizedWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The `[N, K]` weight decoded from `qweight`, in `dtype` (default: the original dtype)."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a peftkern.QuantizedWeight, got {type(qweight).__name__}")
    dtype = qweight.dtype if dtype is None else dtype
    check_choice("dtype", dtype, FLOAT_DTYPES)
    q = qweight
    return ops.dequantize_4bit(q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type,
                               q.blocksize, list(q.shape), dtype)


# ---- loading and consistency checks -----------------------------------------------------------


def _checked(q: QuantizedWeight) -> QuantizedWeight:
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
    _checked(q)
    qmap = get(f"{prefix}.quant_map")
    if not torch.equal(qmap.cpu(), codes.code_table(q.quant_type)):
        raise ValueError(f"{prefix}.quant_map is not the standard {q.quant_type} table; peftkern only "
                         "decodes bnb's NF4/FP4 tables")
    return q
