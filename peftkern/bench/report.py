"""What the suite writes: a table per op (console and markdown), JSON with metadata, PNG plots."""
from __future__ import annotations

import json
import math
import os
import re

from ..ops import tuning

COLUMNS = ["shape", "M", "r", "impl", "ms", "TFLOP/s", "GB/s", "% roofline", "peak extra MiB",
           "peftkern ×"]


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _cells(r):
    return [f"{r['N']}x{r['K']}", _fmt(r["M"] or None), _fmt(r["r"] or None),
            r["impl"] + (" (failed)" if r.get("error") else ""), _fmt(r["ms"]), _fmt(r["TFLOPs"]),
            _fmt(r["GBps"]), _fmt(r["pct_roofline"], 2), _fmt(r["peak_extra_MiB"]),
            _fmt(r["peftkern_speedup"], 3)]


def by_op(rows) -> dict:
    out = {}
    for r in rows:
        out.setdefault(r["op"], []).append(r)
    return out


def header(meta) -> str:
    roof = meta["roofline"]
    return (f"{meta['device']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
            f"bitsandbytes {meta['bitsandbytes']}, peft {meta['peft']}, transformers "
            f"{meta['transformers']}, peftkern commit {meta['peftkern_commit']}"
            + (f", driver {meta['driver']}" if meta.get("driver") else "") + ". Roofline measured "
            f"in this run: copy {roof['copy_GBps']:.1f} GB/s, read {roof['read_GBps']:.1f} GB/s, {roof['matmul_dtype']} matmul "
            f"{roof['matmul_TFLOPs']:.3g} TFLOP/s.")


def console(meta, rows) -> str:
    out = [header(meta)]
    for op, rs in by_op(rows).items():
        table = [COLUMNS] + [_cells(r) for r in rs]
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        out += ["", f"== {op}"] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(out)


def markdown(meta, rows, plots=()) -> str:
    out = [f"# peftkern benchmark: {meta['device']}", "", header(meta), "",
           "`ms` is the median time of one call. `peftkern ×` is this row's time over peftkern's, "
           "from the same run: above 1, peftkern is that many times faster. `% roofline` is the "
           "time the memory bandwidth (the larger of copy and read) and the matmul rate of this machine allow for the op's "
           "compulsory bytes and FLOPs, over the measured time. NF4 with double quantization, "
           f"blocksize 64. Command: `{meta.get('command', 'python -m peftkern.bench')}`.", ""]
    for p in plots:
        out += [f"![{p}]({p})", ""]
    for op, rs in by_op(rows).items():
        out += [f"## {op}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(_cells(r)) + " |" for r in rs]
        errors = [f"- {r['impl']} at {r['N']}x{r['K']} M={r['M']}: {r['error']}" for r in rs if r.get("error")]
        out += ([""] + errors if errors else []) + [""]
    return "\n".join(out)


def device_folder(out: str, meta) -> str:
    return os.path.join(out, re.sub(r"[^A-Za-z0-9._-]+", "_", meta["device"]).strip("_"))


def plots(folder, rows) -> list[str]:
    """speedup_vs_M.png and roofline.png; returns the file names written (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    sweeps = {op: rs for op, rs in by_op(rows).items() if len({r["M"] for r in rs}) > 1}
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.6), squeeze=False)
        for ax, (op, rs) in zip(axes[0], sweeps.items()):
            first = (rs[0]["N"], rs[0]["K"], rs[0]["r"])
            for impl in dict.fromkeys(r["impl"] for r in rs if r["impl"] != "peftkern"):
                pts = sorted((r["M"], r["peftkern_speedup"]) for r in rs if r["impl"] == impl
                             and (r["N"], r["K"], r["r"]) == first and r["peftkern_speedup"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"vs {impl}")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="peftkern speedup",
                   title=f"{op} {first[0]}x{first[1]} r={first[2]}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "speedup_vs_M.png"), dpi=110)
        plt.close(fig)
        written.append("speedup_vs_M.png")
    ours = [r for r in rows if r["impl"] == "peftkern" and r["pct_roofline"]]
    if ours:
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(ours) + 1.2))
        labels = [f"{r['op']} {r['N']}x{r['K']}" + (f" M={r['M']}" if r["M"] else "") for r in ours]
        ax.barh(range(len(ours)), [r["pct_roofline"] for r in ours], color="tab:blue")
        ax.set(yticks=range(len(ours)), xlabel="% of measured roofline (peftkern)", xlim=(0, 100))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "roofline.png"), dpi=110)
        plt.close(fig)
        written.append("roofline.png")
    return written


def write(out, meta, rows, make_plots=True) -> str:
    folder = device_folder(out, meta)
    os.makedirs(folder, exist_ok=True)
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
             for r in rows]   # strict JSON: no NaN
    with open(os.path.join(folder, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": clean}, f, indent=1)
    entries = tuning.cuda_gemv_entries(rows)  # CUDA GEMV vs Triton, when both were timed on decode
    if entries:
        tuning.write(os.path.join(folder, "tuning_cuda_gemv.json"), meta["device"], "cuda_gemv",
                     entries)
    names = plots(folder, rows) if make_plots else []
    with open(os.path.join(folder, "bench.md"), "w") as f:
        f.write(markdown(meta, rows, names))
    return folder
