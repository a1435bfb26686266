"""Every dispatch decision in one place: which backend (and tile config) runs an op call, and why.

    plan(op, x, weight=None) -> Plan(backend, config, reason)

The ops call it on every call and run `backends.MODULES[plan.backend].<op>(..., plan.config)`;
the bench and the tests call it to see what runs. The rules, in order:
1. Only backends that implement the op and are available on the device (`available`): Triton on
   CUDA or under TRITON_INTERPRET=1, the C++ extension on CPU when built, the CUDA extension on
   CUDA when built, the reference everywhere.
2. fp32 fused matmuls on CUDA skip Triton (IEEE fp32 runs on FFMA and spills: the static check),
   so cuBLAS runs them after a dequantize; bf16 matmuls skip the Triton interpreter, whose bf16
   `tl.dot` is wrong (triton-lang/triton#11584). Forcing Triton into the latter raises.
3. `use_backend(name)` forces a backend (an error if it cannot run the call).
4. Otherwise the device default: CUDA -> Triton, then the CUDA extension; CPU -> interpreted
   Triton under TRITON_INTERPRET=1, then the C++ extension; else the reference (with a warning).
5. Per op: the 4-bit forward runs the CUDA decode GEMV where it was measured faster than Triton on
   this GPU and shape (tuning.json), within its range (M <= 16, quantization blocks within rows);
   a forced "cuda" outside that range, or dX (no CUDA kernel), runs Triton (reference for fp32).
   The C++ 4-bit forward is the decode GEMV in that range ("gemv"), else dequantized panels.
6. Configs: Triton's tile config is the one tuned for this GPU and shape (tuning.json), else the
   kernel's rule for the arch (None under the interpreter: its own small tiles); a reference
   4-bit matmul names the backend that dequantizes the weight first.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import NamedTuple, Optional

import torch

from .. import codes
from . import tuning
from .backends.ext import EXT, EXT_ERROR, HAS_CUDA

BACKENDS = ("triton", "cpp", "cuda", "reference")
# The backends that implement each op (modules in ops/backends/). The dense LoRA linear has no
# C++ path (plain torch is BLAS); "cuda" in the 4-bit dX means "forced cuda runs Triton there".
IMPLEMENTS = {
    "lora_linear_fwd": ("triton", "reference"),
    "lora_linear_dx": ("triton", "reference"),
    "qlora_linear_fwd": ("triton", "cuda", "cpp", "reference"),
    "qlora_linear_dx": ("triton", "cuda", "cpp", "reference"),
    "quantize_4bit": ("triton", "cpp", "reference"),
    "dequantize_4bit": ("triton", "cpp", "cuda", "reference"),
    "adalora_update_ipt": ("triton", "reference"),
}
MATMULS = ("lora_linear_fwd", "lora_linear_dx", "qlora_linear_fwd", "qlora_linear_dx")
_state = threading.local()
_warned: set[str] = set()


class Plan(NamedTuple):
    backend: str
    config: Optional[object]  # Triton: tile dict (None: the interpreter's); cpp: "gemv"/"panels"
    reason: str


# ---- what can run -----------------------------------------------------------------------------

def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton runs on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    if not _has_triton():
        return False
    from ..kernels.common import interpreting as now
    return now()


def available(device: torch.device) -> tuple[str, ...]:
    names = ["reference"]
    if _has_triton() and (device.type == "cuda" or interpreting()):
        names.append("triton")
    if EXT is not None and device.type == "cpu":
        names.append("cpp")
    if HAS_CUDA and device.type == "cuda":
        names.append("cuda")
    return tuple(names)


# ---- what the caller forces ------------------------------------------------------------------

@contextlib.contextmanager
def _scoped(attr, value):
    prev = getattr(_state, attr, None)
    setattr(_state, attr, value)
    try:
        yield
    finally:
        setattr(_state, attr, prev)


def use_backend(name: str | None):
    """Force `name` for every op run inside the block (None restores the default choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return _scoped("forced", name)


def forced() -> str | None:
    """The backend forced by the innermost `use_backend` block, or None."""
    return getattr(_state, "forced", None)


def use_config(config: dict | None):
    """Force a Triton tile config (a `CANDIDATES` entry) for the fused matmuls in the block: the
    tuner and the tests use it."""
    return _scoped("config", config)


# ---- the decision ----------------------------------------------------------------------------

def plan(op: str, x: torch.Tensor, weight=None) -> Plan:
    """What runs `op` for input `x` (dY for the dX ops) and `weight`: a dense [N, K] tensor, a
    `QuantizedWeight`, or None (quantize/dequantize/AdaLoRA)."""
    if op not in IMPLEMENTS:
        raise ValueError(f"op must be one of {sorted(IMPLEMENTS)}, got {op!r}")
    shape = tuple(getattr(weight, "shape", (0, 0)))
    return _plan(op, x, *shape, getattr(weight, "blocksize", 0))


def _plan(op, x, N=0, K=0, blocksize=0, dtype=None, same_layout=True) -> Plan:
    """`plan` on raw fields, as the custom ops hold them; `dtype` is the compute dtype."""
    dev, dtype = x.device, dtype or x.dtype
    have = [b for b in available(dev) if b in IMPLEMENTS[op]]
    name, why = forced(), ""
    if op in MATMULS and dtype == torch.float32 and dev.type == "cuda" and name is None \
            and "triton" in have:
        have.remove("triton")
        why = "fp32 on CUDA: cuBLAS (the fused Triton FFMA kernels spill); "
    if dtype == torch.bfloat16 and dev.type == "cpu" and interpreting() and "triton" in have \
            and op in MATMULS + ("adalora_update_ipt",):
        if name == "triton":
            raise RuntimeError("backend 'triton' refuses bfloat16 under TRITON_INTERPRET=1: the "
                               "interpreter's bf16 arithmetic is wrong (triton-lang/triton#11584); "
                               "use float16/float32, or the 'cpp' or 'reference' backend")
        have.remove("triton")
        why = "bf16 under the Triton interpreter (wrong there): "
    if not same_layout and "triton" in have and name != "triton":
        have.remove("triton")
        why = "tensors of different layouts (the Triton kernel takes one): "
    if name is not None:
        if name not in have:
            raise RuntimeError(f"backend {name!r} is not available for this op on {dev.type} "
                               f"(available: {', '.join(have)})")
        backend, why = name, why + f"forced by use_backend({name!r})"
    else:
        backend, why = _default(dev, have, why)
    return _refine(op, x, N, K, blocksize, dtype, backend, why)


def _default(dev, have, why):
    order = ("triton", "cuda") if dev.type == "cuda" else \
        (("triton", "cpp") if interpreting() else ("cpp",))
    for name in order:
        if name in have:
            return name, why + f"{dev.type} default"
    if dev.type == "cpu" and EXT is None:
        _warn_once("cpu", f"peftkern: the C++ extension is not available ({EXT_ERROR}); CPU ops run "
                          "the slow pure-PyTorch reference. Build it with "
                          "`pip install --no-build-isolation -e .`")
    elif dev.type == "cuda" and "triton" not in available(dev):
        _warn_once("cuda", "peftkern: Triton is not installed; CUDA ops run the slow reference")
    return "reference", why + "plain torch: no faster backend for this op here"


def _refine(op, x, N, K, blocksize, dtype, backend, why) -> Plan:
    """Rules 5-6: the GEMV ranges and the configs."""
    dev, M = x.device, x.shape[0]
    if op == "qlora_linear_fwd":
        fits = M <= codes.GEMV_MAX_ROWS and K % blocksize == 0
        if backend == "cuda" and not fits:
            backend, why = _no_cuda_kernel(dev, dtype), why + "; outside the CUDA GEMV's range"
        elif backend == "triton" and fits and forced() is None and "cuda" in available(dev) and \
                0 < M <= tuning.cuda_gemv_max_m(dev, N, K):
            backend, why = "cuda", why + "; the CUDA GEMV was measured faster here (tuning.json)"
        if backend == "cpp":
            return Plan("cpp", "gemv" if fits else "panels", why + (
                "; C++ decode GEMV (M <= 16, blocks within rows)" if fits
                else "; C++ dequantized panels (outside the GEMV's range)"))
    if op == "qlora_linear_dx" and backend == "cuda":
        backend, why = _no_cuda_kernel(dev, dtype), why + "; no CUDA dX kernel"
    if backend == "triton" and op in MATMULS:
        return _triton_config(op, x, N, K, why)
    if backend == "reference" and op in ("qlora_linear_fwd", "qlora_linear_dx"):
        deq = _plan("dequantize_4bit", x) if forced() != "reference" else Plan("reference", None, "")
        return Plan("reference", deq.backend, why + f"; weight dequantized by {deq.backend}")
    return Plan(backend, None, why)


def _no_cuda_kernel(dev, dtype) -> str:
    return "triton" if "triton" in available(dev) and dtype != torch.float32 else "reference"


def _triton_config(op, x, N, K, why) -> Plan:
    cfg = getattr(_state, "config", None)
    if cfg is not None:
        return Plan("triton", cfg, why + "; tile config forced by use_config")
    if x.device.type != "cuda":
        return Plan("triton", None, why + "; interpreter tiles")
    quant, pass_ = op.startswith("qlora"), "dx" if op.endswith("_dx") else "fwd"
    cfg = tuning.lora_matmul_config(x.device, pass_, quant, x.shape[0], N, K)
    if cfg is not None:
        return Plan("triton", cfg, why + f"; tiles tuned for {torch.cuda.get_device_name(x.device)}")
    from ..kernels import lora_linear
    cap = torch.cuda.get_device_capability(x.device)
    cfg = lora_linear.rule_config(lora_linear.regime(x.shape[0]), cap)
    return Plan("triton", cfg, why + "; rule tiles (untuned GPU)")


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
