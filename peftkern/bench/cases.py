"""What the suite measures: each op, its default sweep, and the implementations it compares.

An implementation is built by `make()`, which returns one independent copy `(call, bytes)`: `call()`
runs the op once and `bytes` is the memory that copy owns, used to rotate copies past the caches.
"peftkern" is the default dispatch; "peftkern[<backend>]" forces another backend; every other
name is a baseline: "torch-ref" (peftkern's plain-torch reference backend), "peft+bnb" (PEFT LoRA
over bitsandbytes `Linear4bit`), "dequant+mm" (dequantize into a buffer, matmul, addmm: the
unsloth pattern), "dense-lora" (PEFT LoRA over a dense `nn.Linear` in the compute dtype; on CPU
decode also "dense-lora-bf16"), "bnb"
(bitsandbytes' own dequantize), "peft-adalora" and "peftkern-lora" (the AdaLoRA step's yardsticks).
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from .. import ops
from ..integrations.bitsandbytes import to_bnb
from ..ops import dequantize_4bit, quantize_4bit
from ..nn import LoRALinear, QLoRALinear

LLAMA3_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N, K) of its linears
BLOCKSIZE = 64  # bnb's default; NF4 with double quant throughout (QLoRA's setting)


@dataclass
class Impl:
    name: str
    make: Callable[[], tuple[Callable[[], object], int]]


@dataclass
class Case:
    op: str
    N: int
    K: int
    M: int
    r: int
    dtype: torch.dtype
    device: str
    flops: float = 0.0       # per call, for TFLOP/s and the compute roofline
    bytes: float = 0.0       # per call, compulsory memory traffic, for GB/s and the bandwidth roofline
    graph: bool = False      # launch-bound: time with CUDA graphs
    impls: list[Impl] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.op} {self.N}x{self.K} M={self.M}" + (f" r={self.r}" if self.r else "")


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- building blocks ---------------------------------------------------------------------------


def _linear(N, K, dtype, device, bias=False):
    lin = nn.Linear(K, N, bias=bias, device=device, dtype=dtype)
    lin.requires_grad_(False)
    return lin


def _randomize_B(layer, std=0.02):
    with torch.no_grad():  # PEFT inits B = 0; a nonzero B keeps the LoRA term honest
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)
    return layer


def _qlora(N, K, r, dtype, device):
    layer = QLoRALinear.from_linear(_linear(N, K, dtype, device), r=r, lora_alpha=2 * r,
                                    quant_type="nf4", double_quant=True, compute_dtype=dtype)
    return _randomize_B(layer)


def _peft(base: nn.Module, config):
    from peft import get_peft_model
    return get_peft_model(base, config)


def _peft_lora(base: nn.Module, r: int, targets):
    from peft import LoraConfig
    return _randomize_B(_peft(base, LoraConfig(target_modules=targets, r=r, lora_alpha=2 * r)))


def _peft_bnb_layer(N, K, r, dtype, device):
    """PEFT LoRA over a bnb `Linear4bit` holding the same NF4 bytes peftkern would (no requantize)."""
    import bitsandbytes as bnb
    q = quantize_4bit(torch.randn(N, K, dtype=dtype, device=device), "nf4", BLOCKSIZE, True)
    b4 = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", device=device)
    b4.weight = to_bnb(q)
    return _peft_lora(nn.Sequential(b4), r, ["0"]), q.nbytes


def forced(backend):
    """A context that forces `backend` (None: the default dispatch)."""
    return ops.use_backend(backend) if backend else contextlib.nullcontext()


def _call(module, x, mode, N, backend=None):
    """One forward (no grad) or forward + backward (dX and the trainable parameters' grads)."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad(), forced(backend):
                return module(x)
        return fwd
    xg = x.detach().clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    gy = torch.randn(*x.shape[:-1], N, dtype=x.dtype, device=x.device)

    def fwd_bwd():
        with forced(backend):
            return torch.autograd.grad(module(xg), [xg, *params], gy)
    return fwd_bwd


def _plan(op, shape, M, K, device, dtype):
    """ops.plan for this case (what "peftkern" runs and why), with the op name attached."""
    weight = None
    if shape is not None:
        weight = SimpleNamespace(shape=shape, blocksize=BLOCKSIZE) if op.startswith("qlora") \
            else torch.empty(shape, device="meta")
    x = torch.empty(M, K, dtype=dtype, device=device)
    p = ops.plan(op, x, weight)
    forceable = []
    for b in ops.available(torch.device(device)):  # the backends that really run when forced
        with ops.use_backend(b):
            try:
                if b != "reference" and ops.plan(op, x, weight).backend == b:
                    forceable.append(b)
            except RuntimeError:  # not for this op or dtype here
                pass
    return SimpleNamespace(op=op, backend=p.backend, config=p.config, reason=p.reason,
                           forceable=forceable)


def _peftkern_impls(build, plan) -> list[Impl]:
    """"peftkern" (default dispatch: `plan`, from `ops.plan`), each other backend that runs the op
    when forced, and "torch-ref"."""
    default, others = plan.backend, plan.forceable
    impls = [Impl("peftkern", lambda: build(None))]
    for b in others:  # the default too when there are two (its forced time is the crossover's)
        if b != default or len(others) > 1:
            impls.append(Impl(f"peftkern[{b}]", lambda b=b: build(b)))
    impls.append(Impl("torch-ref", lambda: build("reference")))
    return impls


# ---- ops -----------------------------------------------------------------------------------------


def dequantize(N, K, M, r, dtype, device) -> Case:
    q_bytes = N * K // 2 + N * K // BLOCKSIZE
    case = Case("dequantize", N, K, 0, 0, dtype, device,
                bytes=q_bytes + N * K * torch.finfo(dtype).bits // 8)

    def ours(backend):
        q = quantize_4bit(torch.randn(N, K, dtype=dtype, device=device), "nf4", BLOCKSIZE, True)

        def call():
            with forced(backend):
                return dequantize_4bit(q, dtype)
        return call, q.nbytes

    case.impls = _peftkern_impls(ours, _plan("dequantize_4bit", None, 1, N, device, dtype))
    if has("bitsandbytes"):
        def bnb_dequant():
            import bitsandbytes.functional as bf
            p = to_bnb(quantize_4bit(torch.randn(N, K, dtype=dtype, device=device), "nf4",
                                     BLOCKSIZE, True))
            return (lambda: bf.dequantize_4bit(p.data, p.quant_state)), N * K // 2
        case.impls.append(Impl("bnb", bnb_dequant))
    return case


class _DequantMM(nn.Module):
    """The unsloth pattern: dequantize into a buffer, matmul, then addmm for the LoRA term."""

    def __init__(self, N, K, r, dtype, device):
        super().__init__()
        self.q = quantize_4bit(torch.randn(N, K, dtype=dtype, device=device), "nf4", BLOCKSIZE, True)
        self.lora_A = nn.Parameter(torch.randn(r, K, dtype=dtype, device=device) / K**0.5)
        self.lora_B = nn.Parameter(torch.randn(N, r, dtype=dtype, device=device) * 0.02)
        self.scaling, self.dtype = 2.0, dtype

    def forward(self, x):
        w = dequantize_4bit(self.q, self.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(x2 @ w.t(), x2 @ self.lora_A.t(), self.lora_B.t(), alpha=self.scaling)
        return y.reshape(*x.shape[:-1], -1)


def _linear_case(op, N, K, M, r, dtype, device, mode, quantized) -> Case:
    elt = torch.finfo(dtype).bits // 8
    w_bytes = N * K // 2 + N * K // BLOCKSIZE if quantized else N * K * elt
    passes = 1 if mode == "fwd" else 2           # the weight is read again for dX
    lora = 2 * M * r * (K + N) * (1 if mode == "fwd" else 3)
    io = M * (K + N) * elt * (1 if mode == "fwd" else 2) + r * (K + N) * elt
    case = Case(op, N, K, M, r, dtype, device, flops=2 * M * N * K * passes + lora,
                bytes=w_bytes * passes + io, graph=(mode == "fwd" and M <= 16))
    x = torch.randn(M, K, dtype=dtype, device=device)

    def ours(backend):
        if quantized:
            layer = _qlora(N, K, r, dtype, device)
            return _call(layer, x, mode, N, backend), layer.qweight.nbytes
        layer = _randomize_B(LoRALinear.from_linear(_linear(N, K, dtype, device), r=r, lora_alpha=2 * r))
        return _call(layer, x, mode, N, backend), N * K * elt

    op_name = "qlora_linear_fwd" if quantized else "lora_linear_fwd"
    case.impls = _peftkern_impls(ours, _plan(op_name, (N, K), M, K, device, dtype))
    if quantized:
        case.impls.append(Impl("dequant+mm", lambda: (_call(_DequantMM(N, K, r, dtype, device), x,
                                                            mode, N), w_bytes)))
        if has("bitsandbytes") and has("peft"):
            def peft_bnb():
                model, nbytes = _peft_bnb_layer(N, K, r, dtype, device)
                return _call(model, x, mode, N), nbytes
            case.impls.append(Impl("peft+bnb", peft_bnb))
    if has("peft"):
        case.impls.append(_dense_lora("dense-lora", N, K, r, x, mode))
        if device == "cpu" and dtype == torch.float32 and op == "decode":
            # on CPUs bf16 can be torch's faster dense path at decode sizes (half the bytes)
            case.impls.append(_dense_lora("dense-lora-bf16", N, K, r, x.bfloat16(), mode))
    return case


def _dense_lora(name, N, K, r, x, mode) -> Impl:
    """PEFT LoRA over a dense `nn.Linear` in x's dtype: the speed a 4-bit layer should approach."""
    return Impl(name, lambda: (_call(_peft_lora(nn.Sequential(_linear(N, K, x.dtype, x.device)), r,
                                                ["0"]), x, mode, N), N * K * x.element_size()))


def qlora_fwd(N, K, M, r, dtype, device):
    return _linear_case("qlora_fwd", N, K, M, r, dtype, device, "fwd", True)


def qlora_fwd_bwd(N, K, M, r, dtype, device):
    return _linear_case("qlora_fwd_bwd", N, K, M, r, dtype, device, "fwd+bwd", True)


def decode(N, K, M, r, dtype, device):
    return _linear_case("decode", N, K, M, r, dtype, device, "fwd", True)


def lora_fwd(N, K, M, r, dtype, device):
    return _linear_case("lora_fwd", N, K, M, r, dtype, device, "fwd", False)


def lora_fwd_bwd(N, K, M, r, dtype, device):
    return _linear_case("lora_fwd_bwd", N, K, M, r, dtype, device, "fwd+bwd", False)


# ---- mixed-adapter batches ---------------------------------------------------------------------

SAMPLES = 16  # sequences per mixed batch: M tokens in all, adapters assigned round robin


def mixed_batch(n_adapters, N, K, M, r, dtype, device) -> Case:
    """One PEFT LoRA layer holding `n_adapters` adapters, called with `adapter_names` (one per
    sequence, round robin) in inference: through `pk.enable` (grouped) and PEFT (one masked pass
    per adapter). The time should not grow with the adapter count."""
    op = f"mixed_{n_adapters}"
    elt = torch.finfo(dtype).bits // 8
    case = Case(op, N, K, M, r, dtype, device, flops=2 * M * N * K + 2 * M * r * (K + N),
                bytes=N * K * elt + n_adapters * r * (K + N) * elt + M * (K + N) * elt)
    seqs = min(SAMPLES, M)
    x = torch.randn(seqs, M // seqs, K, dtype=dtype, device=device)
    names = [f"a{i % n_adapters}" for i in range(seqs)]

    def build(enable):
        from peft import LoraConfig
        model = _peft(nn.Sequential(_linear(N, K, dtype, device)),
                      LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r))
        for i in range(n_adapters):
            model.add_adapter(f"a{i}", LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r))
        _randomize_B(model).eval()
        if enable:
            from ..integrations import peft as pk
            pk.enable(model)
        layer = model.base_model.model[0]

        def call():
            with torch.no_grad():
                return layer(x, adapter_names=names)
        return call, N * K * elt

    if has("peft"):
        case.impls = [Impl("peftkern", lambda: build(True)), Impl("peft", lambda: build(False))]
    return case
