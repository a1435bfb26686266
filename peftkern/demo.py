"""`python -m peftkern.demo`: quantize a layer, run it on this machine, check it, time it.

Prints the error of the 4-bit layer against the float64 reference and the time of peftkern's
dequantize against bitsandbytes' (when installed), both measured in this run.
"""
from __future__ import annotations

import argparse
import time

import torch

import peftkern
from peftkern import ops, reference


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
    backend = ops.backends.pick(dev)
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(args.out_features, args.in_features, generator=g) * 0.02).to(dev, dtype)
    x = torch.randn(args.tokens, args.in_features, generator=g).to(dev, dtype)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), "
          f"backend {backend}, W {tuple(W.shape)} {dtype}, x {tuple(x.shape)}")

    q = peftkern.quantize_4bit(W, "nf4", 64, double_quant=True)
    bits = (q.data.numel() * q.data.element_size() + q.absmax.numel() + q.absmax2.numel() * 4) * 8
    print(f"quantized NF4 + double quant: {bits / W.numel():.3f} bits per weight")

    y = x @ peftkern.dequantize_4bit(q, dtype).t()
    ref_q = reference.dequantize_4bit(q.data, reference.dequantize_absmax(
        q.absmax, q.absmax2, q.code8, q.offset), "nf4", 64, tuple(W.shape), torch.float64)
    y_ref = x.double() @ ref_q.t()
    err = (y.double() - y_ref).abs().max().item() / y_ref.abs().max().item()
    quant_err = ((x.double() @ W.double().t()) - y_ref).abs().max().item() / y_ref.abs().max().item()
    print(f"layer output vs float64 reference of the same 4-bit weight: max rel err {err:.2e}")
    print(f"4-bit quantization error vs the unquantized layer:           max rel err {quant_err:.2e}")

    ms = _median_ms(lambda: peftkern.dequantize_4bit(q, dtype), args.reps)
    line = f"dequantize: peftkern {ms:.3f} ms"
    try:
        import bitsandbytes.functional as F
        st_q = q.to_bnb()
        bnb_ms = _median_ms(lambda: F.dequantize_4bit(st_q.data, st_q.quant_state), args.reps)
        line += f", bitsandbytes {bnb_ms:.3f} ms, speedup {bnb_ms / ms:.2f}x (same run)"
    except ImportError:
        line += " (bitsandbytes not installed: no baseline)"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
