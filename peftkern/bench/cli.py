"""`python -m peftkern.bench`: sweep the ops against their baselines, print, write JSON/markdown/plots."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from . import report, sweep

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _list(kind, parse):
    def convert(text):
        try:
            values = [parse(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad {kind} {text!r}: {e}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        return values
    return convert


def _shape(text):
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError("expected NxK with positive integers, for example 4096x14336")
    return int(parts[0]), int(parts[1])


def _positive(text):
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive integer")
    return int(text)


def _op(text):
    if text not in sweep.OPS and text != "all":
        raise ValueError(f"unknown op {text!r}; choose from {', '.join(sweep.OPS)} (or 'all')")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peftkern.bench", description=__doc__.splitlines()[0],
                                epilog="ops: " + "; ".join(f"{k}: {v.help}" for k, v in sweep.OPS.items()))
    p.add_argument("--ops", type=_list("op", _op), default=None,
                   help="comma-separated ops (default: all)")
    p.add_argument("--shapes", type=_list("shape", _shape), help="comma-separated NxK (out x in)")
    p.add_argument("--M", dest="Ms", type=_list("M", _positive), help="comma-separated batch sizes")
    p.add_argument("--ranks", type=_list("rank", _positive), help="comma-separated LoRA ranks")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quick", action="store_true", help="a small sweep: minutes on a CPU")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="results go to <out>/<device name>/ (default: benchmarks/results)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib PNGs")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    ops = args.ops or list(sweep.OPS)
    if "all" in (args.ops or []):
        ops = list(sweep.OPS)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device (torch "
                f"{torch.__version__}); use --device cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    meta, rows = sweep.run(ops, args.device, dtype, args.quick, args.shapes, args.Ms, args.ranks)
    meta["command"] = "python -m peftkern.bench " + shlex.join(argv)
    print(report.console(meta, rows))
    folder = report.write(args.out, meta, rows, make_plots=not args.no_plots)
    print(f"\nwrote {folder}/bench.json, bench.md" + ("" if args.no_plots else " and plots"))
    failed = [r for r in rows if r.get("error") and r["impl"].startswith("peftkern")]
    for r in failed:
        print(f"error: {r['impl']} failed on {r['op']} {r['N']}x{r['K']} M={r['M']}: {r['error']}",
              file=sys.stderr)
    return 1 if failed else 0
