"""Choices measured on each GPU, never guessed: where the CUDA decode GEMV beats Triton, and which
Triton tile configuration is fastest for a shape.

`tuning.json` holds, per GPU name (torch.cuda.get_device_name):
- "cuda_gemv": [{"N", "K", "max_M"}]: the largest M up to which the CUDA GEMV was faster than
  Triton at every measured M (`python -m peftkern.bench --ops decode` writes these);
- "lora_matmul": [{"op", "quant", "M", "N", "K", "backend", "config"}]: the fastest for the forward
  ("fwd") or input-gradient ("dx") pass of the fused Triton kernel's candidate configurations
  (backend "triton", with its "config") and dequantize + cuBLAS ("cublas")
  (`python -m peftkern.bench.tune` writes these).
A GPU without an entry keeps the defaults (`dispatch.plan`: fused for a 4-bit weight at M <= 16,
cuBLAS otherwise; rule-based tiles). A shape between measured ones
takes the entry nearest in log-size (M, then the weight). Both tools write a file
{"device": name, <section>: [...]} next to their results; `adopt(path)` merges it into the table
shipped with the package. One fixed choice per shape keeps results the same from run to run.
"""
from __future__ import annotations

import functools
import json
import math
import os

import torch

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning.json")
SECTIONS = ("cuda_gemv", "lora_matmul")


@functools.lru_cache(maxsize=None)
def _devices() -> dict:
    with open(TABLE) as f:
        return json.load(f)["devices"]


def _entries(name: str, section: str) -> list[dict]:
    return _devices().get(name, {}).get(section, [])


def _log_gap(a: float, b: float) -> float:
    return abs(math.log(max(a, 1) / max(b, 1)))


def cuda_gemv_max_m(device, N: int, K: int) -> int:
    """The largest M for which the CUDA GEMV is the measured winner on this GPU (0: never)."""
    return _gemv_max_m(torch.cuda.get_device_name(device), N, K)


def lora_matmul_entry(device, op: str, quant: bool, M: int, N: int, K: int) -> dict | None:
    """The measured winner for this pass and shape on this GPU: {"backend": "triton" (with its
    "config") or "cublas"}, or None when the GPU has no entry."""
    return _matmul_entry(torch.cuda.get_device_name(device), op, quant, M, N, K)


def lora_matmul_config(device, op: str, quant: bool, M: int, N: int, K: int) -> dict | None:
    """The tuned Triton configuration for this pass and shape on this GPU, or None."""
    entry = lora_matmul_entry(device, op, quant, M, N, K)
    return None if entry is None else entry.get("config")


# Cached per GPU name and shape: the ops ask on every call.
@functools.lru_cache(maxsize=4096)
def _gemv_max_m(name: str, N: int, K: int) -> int:
    entries = _entries(name, "cuda_gemv")
    if not entries:
        return 0
    return min(entries, key=lambda e: _log_gap(e["N"] * e["K"], N * K))["max_M"]


@functools.lru_cache(maxsize=4096)
def _matmul_entry(name: str, op: str, quant: bool, M: int, N: int, K: int) -> dict | None:
    entries = [e for e in _entries(name, "lora_matmul") if e["op"] == op and e["quant"] == quant]
    if not entries:
        return None
    return min(entries, key=lambda e: (_log_gap(e["M"], M), _log_gap(e["N"] * e["K"], N * K)))


generation = 0  # bumped by clear_caches, so that callers caching on the table know it changed


def clear_caches() -> None:
    """Forget the loaded table (after it changed on disk)."""
    global generation
    generation += 1
    for cached in (_devices, _gemv_max_m, _matmul_entry):
        cached.cache_clear()


def cuda_gemv_entries(rows: list[dict]) -> list[dict]:
    """"cuda_gemv" entries from benchmark rows: per decode shape, the largest M up to which
    "peftkern[cuda]" was faster than "peftkern[triton]" at every measured M."""
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


def write(path: str, device_name: str, section: str, entries: list[dict]) -> None:
    """A file for adopt(): one section of one GPU's entries."""
    with open(path, "w") as f:
        json.dump({"device": device_name, section: entries}, f, indent=1)


def adopt(path: str) -> None:
    """Merge a file written by write() into TABLE (its sections replace the GPU's old ones)."""
    with open(path) as f:
        new = json.load(f)
    with open(TABLE) as f:
        table = json.load(f)
    device = table["devices"].setdefault(new["device"], {})
    for section in SECTIONS:
        if section in new:
            device[section] = new[section]
    with open(TABLE, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    clear_caches()
