"""bitsandbytes interop: a bnb 4-bit parameter viewed as a `QuantizedWeight` and back, sharing
the bytes (never copied). bitsandbytes is imported only where a bnb object is built."""
from __future__ import annotations

import torch

from .. import codes
from ..format import QuantizedWeight, checked


def from_bnb(param, check: bool = True) -> QuantizedWeight:
    """View a `bnb.nn.Params4bit` (or a `bnb.nn.Linear4bit`) without copying its bytes.

    `check=False` skips the consistency checks (which read the data: a host sync), for
    per-call use on a weight that was checked once.
    """
    module, param = param, getattr(param, "weight", param)
    qs = getattr(param, "quant_state", None)
    if qs is None and module is not param:  # FSDP2 all-gathers a plain tensor: the module's state
        qs = getattr(module, "quant_state", None)
        storage = getattr(module, "quant_storage", param.dtype)
        if qs is not None and param.dtype != storage:
            raise RuntimeError(f"the packed 4-bit bytes were cast from {storage} to {param.dtype} "
                               f"(an FSDP2 MixedPrecisionPolicy param_dtype?); they are codes, not "
                               f"numbers: use param_dtype=None or {storage}")
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
    q = QuantizedWeight(**fields)
    return checked(q) if check else q


def to_bnb(qweight: QuantizedWeight):
    """A `bnb.nn.Params4bit` sharing `qweight`'s bytes (needs bitsandbytes)."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a peftkern.QuantizedWeight, got {type(qweight).__name__}")
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState
    except ImportError as e:
        raise ImportError("to_bnb() needs bitsandbytes: pip install bitsandbytes") from e
    state2 = None
    if qweight.nested:
        state2 = QuantState(absmax=qweight.absmax2, code=qweight.code8,
                            blocksize=codes.NESTED_BLOCKSIZE, dtype=torch.float32)
    qs = QuantState(absmax=qweight.absmax, shape=qweight.shape, dtype=qweight.dtype,
                    code=codes.code_table(qweight.quant_type, device=qweight.device).clone(),
                    blocksize=qweight.blocksize, quant_type=qweight.quant_type,
                    offset=qweight.offset, state2=state2)
    return bnb.nn.Params4bit(data=qweight.data, requires_grad=False, quant_state=qs,
                             blocksize=qweight.blocksize, compress_statistics=qweight.nested,
                             quant_type=qweight.quant_type, quant_storage=qweight.data.dtype,
                             bnb_quantized=True)
