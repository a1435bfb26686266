"""`python -m peftkern.bench.tune`: measure what runs each matmul pass and shape on this GPU.

For each weight shape (Llama-3-8B's linears), batch size M, pass (forward "fwd", input gradient
"dx") and weight kind (NF4 + double quant, dense), every candidate configuration of
kernels/lora_linear.py that this GPU can run (`candidates`, by M regime) and dequantize + cuBLAS
are timed with triton.testing.do_bench (median), each first checked against dequantize + cuBLAS
(`agrees`: a wrong result is rejected, never tuned in); the fastest becomes a "lora_matmul" entry
(backend "triton" with its config, or "cublas"). Writes <out>/<device>/tuning_lora_matmul.json (for
`peftkern.ops.tuning.adopt`) and tuning_lora_matmul_all.json (every timing). CUDA only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .. import ops
from ..kernels.lora_linear import _config, candidates, regime
from ..ops import lora as lora_ops
from ..ops import tuning
from . import cases, measure, report

MS = (1, 16, 128, 2048, 8192)
QUICK_MS = (1, 2048)


def _passes(N, K, M, r, dtype, quant):
    """{"fwd": call, "dx": call}: the custom ops themselves, as the autograd path calls them."""
    layer = cases._qlora(N, K, r, dtype, "cuda") if quant else None
    W = None if quant else torch.randn(N, K, dtype=dtype, device="cuda") / K ** 0.5
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    dy = torch.randn(M, N, dtype=dtype, device="cuda")
    A = torch.randn(r, K, dtype=dtype, device="cuda") / K ** 0.5
    B = torch.randn(N, r, dtype=dtype, device="cuda") / r ** 0.5
    dyb = dy @ B
    if quant:
        q = layer.qweight
        w = (q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type, q.blocksize)
        return {"fwd": lambda: lora_ops.qlora_linear_fwd(x, *w, N, None, A, B, 0.5, None, dtype),
                "dx": lambda: lora_ops.qlora_linear_dx(dy, *w, K, A, dyb, 0.5, None, dtype)}
    return {"fwd": lambda: lora_ops.lora_linear_fwd(x, W, None, A, B, 0.5, None),
            "dx": lambda: lora_ops.lora_linear_dx(dy, W, A, dyb, 0.5, None)}


def _time(call, backend, cfg, want=None) -> float:
    """Median ms of the call; inf if it cannot run here or disagrees with `want` (so that a
    kernel checked only statically, e.g. the Gluon one, is never tuned in with a wrong result)."""
    with ops.use_config(cfg), ops.use_backend(backend):
        try:
            if want is not None and not agrees(call(), want):
                print(f"  REJECTED {backend} {cfg}: its result differs from dequantize + cuBLAS")
                return float("inf")
            return measure.median_ms(call, "cuda")
        except Exception as e:  # a config this GPU cannot run (shared memory): not a candidate
            print(f"  skipped {backend} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            return float("inf")


def agrees(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-2) -> bool:
    """Finite and within `rel` of the reference's largest magnitude: candidates differ from one
    another by rounding only; a wrong kernel is off by O(1). A forward's (y, xa, z): y."""
    got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
    if got.shape != want.shape or not torch.isfinite(got).all():
        return False
    return (got.float() - want.float()).abs().max().item() <= rel * want.float().abs().max().item()


def tune(shapes, Ms, r, dtype) -> tuple[list[dict], list[dict]]:
    """Per shape, M, pass and weight kind: every Triton candidate this GPU can run and dequantize
    + cuBLAS, timed; the fastest becomes the entry."""
    best, timings = [], []
    keys = [(N, K, M, quant) for N, K in shapes for M in Ms for quant in (True, False)]
    cap = torch.cuda.get_device_capability()
    for i, (N, K, M, quant) in enumerate(keys, 1):
        passes = _passes(N, K, M, r, dtype, quant)
        tried = [("triton", cfg) for cfg in candidates(regime(M), cap)] + [("cublas", None)]
        for op, call in passes.items():
            with ops.use_backend("cublas"):
                want = call()
            times = [(_time(call, b, cfg, want), b, cfg) for b, cfg in tried]
            rule_ms = next(ms for ms, b, cfg in times if cfg == _config(M, cap))
            cublas_ms = times[-1][0]
            timings += [{"op": op, "quant": quant, "M": M, "N": N, "K": K, "ms": ms,
                         "backend": b, "config": cfg} for ms, b, cfg in times]
            ms, b, cfg = min(times, key=lambda t: t[0])
            best.append({"op": op, "quant": quant, "M": M, "N": N, "K": K, "backend": b,
                         **({"config": cfg} if cfg else {})})
            print(f"[{i}/{len(keys)}] {'nf4' if quant else 'dense'} {op} {N}x{K} M={M}: "
                  f"{ms:.4f} ms with {b} {cfg or ''} (Triton rule tiles {rule_ms:.4f} ms, "
                  f"dequantize + cuBLAS {cublas_ms:.4f} ms)", flush=True)
        del passes
        torch.cuda.empty_cache()
    return best, timings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftkern.bench.tune",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 at M in 1, 2048 only")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or "triton" not in ops.available(torch.device("cuda")):
        print("peftkern.bench.tune: needs a CUDA GPU with Triton", file=sys.stderr)
        return 2
    shapes = [(4096, 4096)] if args.quick else cases.LLAMA3_8B
    best, timings = tune(shapes, QUICK_MS if args.quick else MS, args.rank, torch.bfloat16)
    meta = measure.metadata("cuda")
    folder = report.device_folder(args.out, meta)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tuning_lora_matmul.json")
    tuning.write(path, meta["device"], "lora_matmul", best)
    with open(os.path.join(folder, "tuning_lora_matmul_all.json"), "w") as f:
        json.dump({"meta": meta, "timings": timings}, f, indent=1, default=str)
    print(f"wrote {path}; adopt with: python -c \"from peftkern.ops import tuning; "
          f"tuning.adopt('{path}')\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
