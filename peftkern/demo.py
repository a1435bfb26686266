"""`python -m peftkern.demo`: quantize a layer, run it on this machine, check it, time it.

Builds a QLoRA layer (NF4 + double quant, r=16) from a random Linear, runs the fused path on
whatever device there is, and prints its error against the float64 reference and its time against
"dequantize + matmul + addmm" and bitsandbytes' dequantize, all measured in this run.
"""
from __future__ import annotations

import argparse
import time

import torch

import peftkern
from peftkern import ops, reference
from peftkern.integrations.bitsandbytes import to_bnb
from peftkern.nn import QLoRALinear


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up (compiles Triton kernels)
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    if min(args.out_features, args.in_features, args.tokens, args.reps) < 1:
        p.error("sizes and --reps must be positive")

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    backend = ops.plan("quantize_4bit", torch.empty(0, device=dev)).backend
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(args.out_features, args.in_features, generator=g) * 0.02).to(dev, dtype)
    x = torch.randn(args.tokens, args.in_features, generator=g).to(dev, dtype)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), "
          f"backend {backend}, W {tuple(W.shape)} {dtype}, x {tuple(x.shape)}")

    lin = torch.nn.Linear(args.in_features, args.out_features, bias=False, device=dev, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    layer = QLoRALinear.from_linear(lin, r=16, lora_alpha=32, compute_dtype=dtype)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    q = layer.qweight
    print(f"quantized NF4 + double quant: {q.nbytes * 8 / W.numel():.3f} bits per weight")

    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    with torch.no_grad():
        y = layer(x)
    W4 = reference.dequantize_4bit(q.data, reference.dequantize_absmax(
        q.absmax, q.absmax2, q.code8, q.offset), "nf4", 64, tuple(W.shape)).double()
    y_ref = reference.lora_linear(x.double(), W4, None, A.double(), B.double(), layer.scaling)
    y_torch = reference.lora_linear(x, W4.to(dtype), None, A, B, layer.scaling)
    scale = y_ref.abs().max().item()
    err = (y.double() - y_ref).abs().max().item() / scale
    err_torch = (y_torch.double() - y_ref).abs().max().item() / scale
    plan = ops.plan("qlora_linear_fwd", x.reshape(-1, x.shape[-1]), layer.qweight)
    print(f"QLoRA layer (backend {plan.backend}: {plan.reason}) vs float64 "
          f"reference: max rel err {err:.2e} (plain torch in {dtype}: {err_torch:.2e})")

    with torch.no_grad():
        ms = _median_ms(lambda: layer(x), args.reps)
        base_ms = _median_ms(lambda: torch.addmm(x @ peftkern.dequantize_4bit(q, dtype).t(),
                                                 x @ A.t(), B.t(), alpha=layer.scaling), args.reps)
    print(f"layer forward: peftkern {ms:.3f} ms, dequantize+matmul+addmm {base_ms:.3f} ms, "
          f"speedup {base_ms / ms:.2f}x (same run)")
    ms = _median_ms(lambda: peftkern.dequantize_4bit(q, dtype), args.reps)
    line = f"dequantize: peftkern {ms:.3f} ms"
    try:
        import bitsandbytes.functional as F
        st_q = to_bnb(q)
        bnb_ms = _median_ms(lambda: F.dequantize_4bit(st_q.data, st_q.quant_state), args.reps)
        line += f", bitsandbytes {bnb_ms:.3f} ms, speedup {bnb_ms / ms:.2f}x (same run)"
    except ImportError:
        line += " (bitsandbytes not installed: no baseline)"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
