"""Every dispatch decision in one place: which backend (and tile config) runs an op call, and why.

    plan(op, x, weight=None) -> Plan(backend, config, reason)

The ops call it on every call and run `backends.MODULES[plan.backend].<op>(..., plan.config)`;
the bench and the tests call it to see what runs. The rules, in order:
1. Only backends that implement the op and are available on the device (`available`): Triton on
   CUDA or under TRITON_INTERPRET=1, the C++ extension on CPU when built, the CUDA extension on
   CUDA when built, the reference everywhere.
2. fp32 fused matmuls on CUDA skip Triton (IEEE fp32 runs on FFMA and spills: the static check),
   so cuBLAS runs them (after a dequantize); bf16 matmuls skip the Triton interpreter, whose bf16
   `tl.dot` is wrong (triton-lang/triton#11584). Forcing Triton into the latter raises.
3. `use_backend(name)` forces a backend (an error if it cannot run the call).
4. Otherwise the device default: CUDA -> Triton, then cuBLAS; CPU -> interpreted Triton under
   TRITON_INTERPRET=1, then the C++ extension; else the reference (with a warning). On CUDA a
   matmul then runs fused Triton or dequantize + cuBLAS (`backends/cublas.py`) as tuning.json
   measured for this GPU, pass and shape; untuned, fused for a 4-bit weight at M <= 16 and cuBLAS
   above it and for a dense weight (the anchors' choice).
5. Per op: the 4-bit forward runs the CUDA decode GEMV where it was measured faster than Triton on
   this GPU and shape (tuning.json), within its range (M <= 16, quantization blocks within rows);
   a forced "cuda" outside that range, or dX (no CUDA kernel), runs Triton (cuBLAS for fp32).
   The C++ 4-bit forward is the decode GEMV in that range ("gemv"), else dequantized panels.
6. Configs: Triton's tile config is the one tuned for this GPU and shape (tuning.json), else the
   kernel's rule for the arch (None under the interpreter: its own small tiles); a reference
   4-bit matmul names the backend that dequantizes the weight first.
7. MoE expert linears (`plan_experts`): torch's `_grouped_mm` on CUDA for dense bf16 experts with
   16-byte strides, else the fused op per expert (which rules 1-6 plan).
8. Mixed-adapter batches (`plan_grouped_lora`): the device default, but torch ops when autograd
   records the call or torch.compile traces it.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import NamedTuple, Optional

import torch

from .. import codes
from . import tuning
from .backends.ext import EXT, EXT_ERROR, HAS_CUDA

BACKENDS = ("triton", "cpp", "cuda", "cublas", "reference")
# The backends that implement each op (modules in ops/backends/). The dense LoRA linear has no
# C++ path (plain torch is BLAS); "cuda" in the 4-bit dX means "forced cuda runs Triton there".
# The DoRA norm, the grouped LoRA and the scale gradient are plain torch (the reference's) on
# every backend but Triton (the C++ norm decodes with the extension), so forcing one runs.
IMPLEMENTS = {
    "lora_linear_fwd": ("triton", "cublas", "reference"),
    "lora_linear_dx": ("triton", "cublas", "reference"),
    "qlora_linear_fwd": ("triton", "cuda", "cublas", "cpp", "reference"),
    "qlora_linear_dx": ("triton", "cuda", "cublas", "cpp", "reference"),
    "quantize_4bit": ("triton", "cpp", "reference"),
    "dequantize_4bit": ("triton", "cpp", "cuda", "reference"),
    "adalora_update_ipt": ("triton", "reference"),
    "dora_norm": ("triton", "cpp", "cuda", "cublas", "reference"),
    "grouped_lora": ("triton", "cpp", "cuda", "cublas", "reference"),
    "scale_grad": ("triton", "cpp", "cuda", "cublas", "reference"),
}
MATMULS = ("lora_linear_fwd", "lora_linear_dx", "qlora_linear_fwd", "qlora_linear_dx")
_state = threading.local()
_warned: set[str] = set()


class Plan(NamedTuple):
    backend: str
    config: Optional[object]  # Triton: tile dict (None: the interpreter's); cpp: "gemv"/"panels"
    reason: str


# ---- what can run -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _interpreting_fn():
    from ..kernels.common import interpreting as now
    return now


def interpreting() -> bool:
    """Triton runs on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return _has_triton() and _interpreting_fn()()


def available(device: torch.device) -> tuple[str, ...]:
    names = ["reference"]
    if _has_triton() and (device.type == "cuda" or interpreting()):
        names.append("triton")
    if EXT is not None and device.type == "cpu":
        names.append("cpp")
    if HAS_CUDA and device.type == "cuda":
        names.append("cuda")
    if device.type == "cuda":
        names.append("cublas")
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
    # duck-typed: plan reads only .device, .dtype and .shape (a stand-in plans a CUDA call)
    if not all(hasattr(x, a) for a in ("device", "dtype", "shape")):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if len(x.shape) < 1:
        raise ValueError(f"x must have at least 1 dimension (rows first), got shape {tuple(x.shape)}")
    if weight is not None and not hasattr(weight, "shape"):
        raise TypeError(f"weight must be None, a [N, K] tensor or a peftkern.QuantizedWeight, got "
                        f"{type(weight).__name__}")
    if weight is not None and len(weight.shape) != 2:
        raise ValueError(f"weight must have 2 dimensions [N, K], got shape {tuple(weight.shape)}")
    shape = tuple(getattr(weight, "shape", (0, 0)))
    return _plan(op, x, *shape, getattr(weight, "blocksize", 0))


def _plan(op, x, N=0, K=0, blocksize=0, dtype=None) -> Plan:
    """`plan` on raw fields, as the custom ops hold them; `dtype` is the compute dtype. Cached:
    the answer depends only on these fields, the forced backend and config, the interpreter
    switch and the tuning table (whose `generation` changes when it is reloaded)."""
    forced_name, config, interp, gen = stamp()
    if config is not None:  # a forced tile config (tuner, tests): not cached
        return _decide(op, x.device, x.shape[0], N, K, blocksize, dtype or x.dtype)
    return _cached(op, x.device, x.shape[0], N, K, blocksize, dtype or x.dtype, forced_name,
                   interp, gen)


def stamp() -> tuple:
    """What a plan depends on besides the call's own fields: this thread's forced backend and
    tile config, the interpreter switch and the tuning table's generation. Plans made under
    equal stamps for equal fields are equal (callers that keep a plan compare stamps)."""
    state = _state.__dict__  # this thread's (one dict read: this runs on every call)
    return state.get("forced"), state.get("config"), interpreting(), tuning.generation


@functools.lru_cache(maxsize=8192)
def _cached(op, device, M, N, K, blocksize, dtype, _forced, _interp, _gen) -> Plan:
    return _decide(op, device, M, N, K, blocksize, dtype)


class _Rows(NamedTuple):
    """What the rules read of the input: its device and row count."""
    device: torch.device
    shape: tuple


def _decide(op, device, M, N, K, blocksize, dtype) -> Plan:
    x = _Rows(device, (M,))
    dev = device
    have = [b for b in available(dev) if b in IMPLEMENTS[op]]
    name, why = forced(), ""
    if op in MATMULS and dtype == torch.float32 and dev.type == "cuda" and name is None \
            and "triton" in have:
        have.remove("triton")
        why = "fp32 on CUDA: cuBLAS (the fused Triton FFMA kernels spill); "
    if dtype == torch.bfloat16 and dev.type == "cpu" and interpreting() and "triton" in have \
            and op in MATMULS + ("adalora_update_ipt", "dora_norm", "grouped_lora", "scale_grad"):
        if name == "triton":
            raise RuntimeError("backend 'triton' refuses bfloat16 under TRITON_INTERPRET=1: the "
                               "interpreter's bf16 arithmetic is wrong (triton-lang/triton#11584); "
                               "use float16/float32, or the 'cpp' or 'reference' backend")
        have.remove("triton")
        why = "bf16 under the Triton interpreter (wrong there): "
    if name is not None:
        if name not in have:
            raise RuntimeError(f"backend {name!r} is not available for this op on {dev.type} "
                               f"(available: {', '.join(have)})")
        backend, why = name, why + f"forced by use_backend({name!r})"
    else:
        backend, why = _default(dev, have, why)
    return _refine(op, x, N, K, blocksize, dtype, backend, why)


def _default(dev, have, why):
    order = ("triton", "cublas", "cuda") if dev.type == "cuda" else \
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
        if backend == "cpp" and fits:  # the GEMV picks its SIMD path by host and M: say which
            path = EXT.gemv_path(M, dtype == torch.bfloat16)
            return Plan("cpp", "gemv", why + f"; C++ decode GEMV (M <= 16, blocks within rows), "
                                             f"{path} path on this CPU")
        if backend == "cpp":
            return Plan("cpp", "panels", why + "; C++ dequantized panels (outside the GEMV's range)")
    if op == "qlora_linear_dx" and backend == "cuda":
        backend, why = _no_cuda_kernel(dev, dtype), why + "; no CUDA dX kernel"
    if backend == "triton" and op in MATMULS and dev.type == "cuda" and forced() is None:
        backend, why = _cuda_matmul(op, x, N, K, why)
    if backend == "triton" and op in MATMULS:
        return _triton_config(op, x, N, K, why)
    if backend == "cublas" and op.startswith("qlora"):
        deq = _plan("dequantize_4bit", x, dtype=dtype).backend
        return Plan("cublas", deq, why + f"; weight dequantized by {deq}, then cuBLAS")
    if backend == "reference" and op in ("qlora_linear_fwd", "qlora_linear_dx", "dora_norm"):
        deq = _plan("dequantize_4bit", x, dtype=dtype) if forced() != "reference" \
            else Plan("reference", None, "")
        return Plan("reference", deq.backend, why + f"; weight dequantized by {deq.backend}")
    return Plan(backend, None, why)


def plan_experts(x, weight, A=None, B=None) -> Plan:
    """How `ops.moe` runs a grouped expert linear: "cublas" (torch's `_grouped_mm`, CUDA: one
    launch for the base product of every expert and two for the LoRA terms, offsets on the
    device) for dense experts whose operands it takes (`_fits_grouped_mm`: bf16, 16-byte
    strides), else "per-expert" (the fused (Q)LoRA op on each expert's rows, as `plan` chooses
    for it; a forced backend other than cuBLAS runs there). `weight`: the [E, N, K] stack, or
    anything else for 4-bit experts."""
    name = forced()
    if name not in (None, "cublas"):
        return Plan("per-expert", None, f"forced by use_backend({name!r}): its fused op per expert")
    dense = isinstance(weight, torch.Tensor)
    if x.device.type == "cuda" and dense and _fits_grouped_mm(x, weight, A, B) and \
            hasattr(torch, "_grouped_mm"):
        return Plan("cublas", None, "cuda: torch._grouped_mm over all experts")
    if name == "cublas":
        raise RuntimeError("backend 'cublas' runs expert linears on CUDA for dense bf16 experts "
                           "with 16-byte strides only")
    return Plan("per-expert", None, "the fused (Q)LoRA op on each expert's rows (4-bit experts, "
                                    "not CUDA, or operands torch._grouped_mm does not take)")


def _fits_grouped_mm(x, *stacks) -> bool:
    """bf16 operands with 16-byte aligned strides, what torch._grouped_mm takes: x's rows, and
    both matrix dimensions of each expert stack (the weight, A and B)."""
    tensors = [x] + [t for t in stacks if t is not None]
    return all(t.dtype == torch.bfloat16 for t in tensors) and x.shape[-1] % 8 == 0 and \
        all(t.shape[-1] % 8 == 0 and t.shape[-2] % 8 == 0 for t in tensors[1:])


def plan_grouped_lora(x: torch.Tensor, N: int, K: int, dtype, records: bool) -> Plan:
    """How `ops.multi_lora` adds a mixed batch's LoRA terms: the device default of `plan` (the
    Triton shrink/expand kernels on CUDA), except the torch path ("reference") when autograd
    records the call (the kernels have no backward) or torch.compile traces it (the kernels read
    the row counts on the host: a graph break)."""
    if records:
        return Plan("reference", None, "autograd records the call: torch ops, which have a backward")
    if torch.compiler.is_compiling():
        return Plan("reference", None, "traced by torch.compile: torch ops")
    return _plan("grouped_lora", x, N, K, 0, dtype)


def _no_cuda_kernel(dev, dtype) -> str:
    if "triton" in available(dev) and dtype != torch.float32:
        return "triton"
    return "cublas" if dev.type == "cuda" else "reference"


def _cuda_matmul(op, x, N, K, why):
    """Fused Triton or dequantize + cuBLAS for a matmul on CUDA: what tuning.json measured on this
    GPU and shape, else the anchors' choice (fused for a 4-bit weight at M <= 16, where reading
    the packed bytes once wins; cuBLAS above and for a dense weight, PEFT's own path)."""
    quant, pass_, M = op.startswith("qlora"), "dx" if op.endswith("_dx") else "fwd", x.shape[0]
    entry = tuning.lora_matmul_entry(x.device, pass_, quant, M, N, K)
    if entry is not None:
        return entry.get("backend", "triton"), why + "; measured fastest here (tuning.json)"
    if quant and M <= codes.GEMV_MAX_ROWS:
        return "triton", why + "; untuned GPU: fused 4-bit decode for M <= 16"
    return "cublas", why + (f"; untuned GPU: dequantize + cuBLAS for M > {codes.GEMV_MAX_ROWS}"
                            if quant else "; untuned GPU: cuBLAS for a dense weight")


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
