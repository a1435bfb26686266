"""Benchmark the (Q)LoRA linear, forward and forward+backward, against its baselines.

    python benchmarks/bench_lora.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

Baselines, all measured in the same run: PEFT LoRA over bnb `Linear4bit` ("peft+bnb"), the
unsloth pattern "dequantize to a buffer, then matmul, then addmm" ("dequant+mm"), and dense LoRA
in the compute dtype ("dense"). Each figure is printed with its ratio to each baseline. On a GPU
the run also measures the roofline (copy bandwidth, bf16 matmul rate) and peak extra memory.
Writes `<out>/<device-name>/lora.json` and `lora.md`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

import peftkern
from peftkern import ops
from peftkern.nn import QLoRALinear

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # Llama-3-8B (N, K)


def median_ms(fn, device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def roofline(device) -> dict:
    """Copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s) measured now."""
    if device != "cuda":
        a = torch.empty(64 * 2**20, dtype=torch.uint8)
        ms = median_ms(lambda: a.clone(), device, 5)
        return {"copy_GBps": 2 * a.numel() / ms / 1e6}
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    ms = median_ms(lambda: a.clone(), device, 0)
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm = median_ms(lambda: m @ m, device, 0)
    return {"copy_GBps": 2 * a.numel() / ms / 1e6, "bf16_TFLOPs": 2 * 8192**3 / mm / 1e9}


def _layers(N, K, r, dtype, device):
    lin = torch.nn.Linear(K, N, bias=False, dtype=dtype, device="cpu")
    ours = QLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, compute_dtype=dtype).to(device)
    torch.nn.init.normal_(ours.lora_B.weight, std=0.01)
    base = {}
    A = ours.lora_A.weight.detach().clone().requires_grad_()
    B = ours.lora_B.weight.detach().clone().requires_grad_()
    W = lin.weight.detach().to(device)
    q = ours.qweight
    s = ours.scaling

    def dense(x):
        return torch.nn.functional.linear(x, W) + s * ((x @ A.t()) @ B.t())

    def dequant_mm(x):  # unsloth pattern: dequantize into a buffer, matmul, addmm
        w = peftkern.dequantize_4bit(q, dtype)
        return torch.addmm(x @ w.t(), x @ A.t(), B.t(), alpha=s)

    base["dense"] = dense
    base["dequant+mm"] = dequant_mm
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
        b4 = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4")
        b4.weight = q.to("cpu").to_bnb() if device == "cpu" else q.to_bnb()
        b4.weight.quant_state = q.to_bnb().quant_state
        model = get_peft_model(torch.nn.Sequential(b4), LoraConfig(target_modules=["0"], r=r,
                                                                   lora_alpha=2 * r))
        model = model.to(device)
        base["peft+bnb"] = model
    except ImportError:
        pass
    return ours, base


def run(device: str, quick: bool, out: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    Ms = [1, 16] if quick or device == "cpu" else [1, 16, 128, 2048, 8192]
    shapes = SHAPES[:1] if quick else (SHAPES if device == "cuda" else SHAPES[:3:2])
    ranks = [16] if quick or device == "cpu" else [8, 16, 64]
    reps = 5 if device == "cpu" else 0
    rows, total = [], len(shapes) * len(ranks) * len(Ms)
    roof = roofline(device)
    print(f"roofline: {roof}", flush=True)
    for i, ((N, K), r, M) in enumerate((s, r, m) for s in shapes for r in ranks for m in Ms):
        ours, base = _layers(N, K, r, dtype, device)
        x = torch.randn(M, K, dtype=dtype, device=device)
        row = {"N": N, "K": K, "r": r, "M": M, "dtype": str(dtype).replace("torch.", "")}
        for mode in ("fwd", "fwd+bwd"):
            def step(layer):
                if mode == "fwd":
                    with torch.no_grad():
                        return lambda: layer(x)
                xg = x.clone().requires_grad_()
                return lambda: layer(xg).sum().backward()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = median_ms(step(ours), device, reps)
            row[f"peftkern_{mode}_ms"] = t
            if device == "cuda":
                row[f"peftkern_{mode}_peak_extra_MiB"] = (torch.cuda.max_memory_allocated() -
                                                          torch.cuda.memory_allocated()) / 2**20
            for name, layer in base.items():
                tb = median_ms(step(layer), device, reps)
                row[f"{name}_{mode}_ms"] = tb
                row[f"speedup_vs_{name}_{mode}"] = tb / t
        bytes_read = ours.qweight.data.numel() * ours.qweight.data.element_size()
        row["fwd_weight_GBps"] = bytes_read / row["peftkern_fwd_ms"] / 1e6
        row["fwd_pct_copy_bw"] = 100 * row["fwd_weight_GBps"] / roof["copy_GBps"]
        rows.append(row)
        print(f"[{i + 1}/{total}] N={N} K={K} r={r} M={M}: fwd {row['peftkern_fwd_ms']:.3f} ms "
              + " ".join(f"x{row[k]:.2f} vs {k.split('_vs_')[1]}" for k in row if k.startswith("speedup")),
              flush=True)
    meta = metadata(device, roof)
    write(out, meta, rows)
    return {"meta": meta, "rows": rows}


def metadata(device, roof) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except ImportError:
            return None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    else:
        name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l),
                    platform.processor()) + f" ({os.cpu_count()} cores)"
        driver = None
    return {"device": name, "driver": driver, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": version("triton"), "bitsandbytes": version("bitsandbytes"),
            "peft": version("peft"), "peftkern_commit": commit,
            "backend": f"lora {ops.backends.pick(torch.device(device), ('triton', 'reference'))}, "
                       f"dequantize {ops.backends.pick(torch.device(device))}",
            "roofline": roof}


def write(out, meta, rows):
    folder = os.path.join(out, re.sub(r"[^A-Za-z0-9._-]+", "_", meta["device"]).strip("_"))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lora.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    speed_cols = [k for k in rows[0] if k.startswith("speedup")]
    lines = [f"# (Q)LoRA linear on {meta['device']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bitsandbytes']}, "
             f"peft {meta['peft']}, peftkern backend `{meta['backend']}`, commit {meta['peftkern_commit']}. "
             f"Roofline measured in the same run: {meta['roofline']}.", "",
             "Speedup = baseline time / peftkern time, same run (>1: peftkern faster). NF4 + double quant.", "",
             "| N×K | r | M | fwd ms | fwd+bwd ms | " + " | ".join(speed_cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(speed_cols)]
    for r in rows:
        lines.append(f"| {r['N']}×{r['K']} | {r['r']} | {r['M']} | {r['peftkern_fwd_ms']:.3f} | "
                     f"{r['peftkern_fwd+bwd_ms']:.3f} | " + " | ".join(f"{r[c]:.2f}" for c in speed_cols) + " |")
    with open(os.path.join(folder, "lora.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {folder}/lora.json and lora.md")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one shape, M in {1, 16}, r=16")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    run(args.device, args.quick, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
