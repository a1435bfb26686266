"""Where the CUDA decode GEMV beats the Triton kernel, as measured (never guessed).

`crossover.json` holds, per GPU name, the decode shapes `python -m peftkern.bench --ops decode`
measured and the largest batch M up to which the CUDA GEMV (csrc/cuda/qlora_gemv.cu) won at every
measured M. A GPU without an entry runs Triton. Shapes between measured ones take the entry with
the nearest weight size. The bench writes `crossover.json` next to its results; `adopt(path)`
merges such a file into the table shipped with the package.
"""
from __future__ import annotations

import functools
import json
import math
import os

import torch

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crossover.json")


@functools.lru_cache(maxsize=None)
def _devices() -> dict:
    with open(TABLE) as f:
        return json.load(f)["devices"]


def cuda_gemv_max_m(device: torch.device, N: int, K: int) -> int:
    """The largest M for which the CUDA GEMV is the measured winner on this GPU (0: never)."""
    entries = _devices().get(torch.cuda.get_device_name(device))
    if not entries:
        return 0
    nearest = min(entries, key=lambda e: abs(math.log(e["N"] * e["K"] / (N * K))))
    return nearest["max_M"]


def measured(rows: list[dict]) -> list[dict]:
    """Entries from benchmark rows: per decode shape, the largest M up to which "peftkern[cuda]"
    was faster than "peftkern[triton]" at every measured M."""
    times: dict[tuple, dict] = {}
    for r in rows:
        if r["op"] == "decode" and r["impl"] in ("peftkern[cuda]", "peftkern[triton]"):
            times.setdefault((r["N"], r["K"]), {}).setdefault(r["M"], {})[r["impl"]] = r["ms"]
    entries = []
    for (N, K), by_m in sorted(times.items()):
        max_m = 0
        for M in sorted(by_m):
            t = by_m[M]
            if not t.get("peftkern[cuda]", math.inf) < t.get("peftkern[triton]", -math.inf):
                break
            max_m = M
        entries.append({"N": N, "K": K, "max_M": max_m})
    return entries


def adopt(path: str) -> None:
    """Merge a bench-written crossover file ({"device": name, "entries": [...]}) into TABLE."""
    with open(path) as f:
        new = json.load(f)
    with open(TABLE) as f:
        table = json.load(f)
    table["devices"][new["device"]] = new["entries"]
    with open(TABLE, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    _devices.cache_clear()
