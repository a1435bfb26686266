"""Which implementation runs an op: Triton, the C++/CUDA extension, or the torch reference.

Default by device: CUDA -> Triton; CPU -> Triton when TRITON_INTERPRET=1, else the C++ extension
when built, else the reference. `use_backend(name)` forces one (tests use it to cover each).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

BACKENDS = ("triton", "cpp", "cuda", "reference")
_state = threading.local()
_warned: set[str] = set()


def _load_ext():
    import importlib.util
    if importlib.util.find_spec("peftkern._C") is None:
        return None, "peftkern._C is not built (installed with PEFTKERN_NO_EXT=1, or not installed)"
    try:
        from .. import _C  # noqa: F401  (importing registers torch.ops.peftkern_C)
    except ImportError as e:  # built against another torch, for example
        return None, f"peftkern._C failed to load: {e}"
    return torch.ops.peftkern_C, None


EXT, EXT_ERROR = _load_ext()
HAS_CUDA_EXT = EXT is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "peftkern_C::dequantize_4bit", "CUDA")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> tuple[str, ...]:
    names = ["reference"]
    if _has_triton() and (device.type == "cuda" or interpreting()):
        names.append("triton")
    if EXT is not None and device.type == "cpu":
        names.append("cpp")
    if HAS_CUDA_EXT and device.type == "cuda":
        names.append("cuda")
    return tuple(names)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force `name` for every op run inside the block (None restores the default choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    prev = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = prev


def forced() -> str | None:
    """The backend forced by the innermost `use_backend` block, or None."""
    return getattr(_state, "forced", None)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def pick(device: torch.device, supported=BACKENDS, dtype: torch.dtype | None = None,
         matmul: bool = False) -> str:
    """The backend for an op on `device`; `supported` lists the backends that implement it.

    `dtype`, given by the ops whose Triton kernels compute in it, keeps bf16 off the Triton
    interpreter, whose bf16 `tl.dot` is wrong (DESIGN.md §6, triton-lang/triton#11584):
    the next backend runs instead, and forcing Triton there raises. (Kernels that only convert
    bf16 to or from fp32, like quantize/dequantize, are exact there and pass no dtype.)
    `matmul` (the fused matmuls) also keeps fp32 on CUDA off Triton unless it is forced.
    """
    have = [b for b in available(device) if b in supported]
    name = forced()
    if matmul and dtype == torch.float32 and device.type == "cuda" and name is None \
            and "triton" in have:
        # fp32 is IEEE (no tf32): the fused matmul kernels run on FFMA and spill (static check),
        # so cuBLAS SGEMM after dequantizing (or the CUDA GEMV) runs unless Triton is forced.
        have.remove("triton")
    if dtype == torch.bfloat16 and device.type == "cpu" and "triton" in have:
        if name == "triton":
            raise RuntimeError("backend 'triton' refuses bfloat16 under TRITON_INTERPRET=1: the "
                               "interpreter's bf16 arithmetic is wrong (triton-lang/triton#11584); "
                               "use float16/float32, or the 'cpp' or 'reference' backend")
        have.remove("triton")
    if name is not None:
        if name not in have:
            raise RuntimeError(f"backend {name!r} is not available for this op on {device.type} "
                               f"(available: {', '.join(have)})")
        return name
    order = ("triton", "cuda") if device.type == "cuda" else \
        (("triton", "cpp") if interpreting() else ("cpp",))
    for name in order:
        if name in have:
            return name
    if device.type == "cpu" and EXT is None:
        _warn_once("cpu", f"peftkern: the C++ extension is not available ({EXT_ERROR}); CPU ops run "
                          "the slow pure-PyTorch reference. Build it with "
                          "`pip install --no-build-isolation -e .`")
    elif device.type == "cuda":
        _warn_once("cuda", "peftkern: Triton is not installed; CUDA ops run the slow reference")
    return "reference"
