"""How the suite measures: median times, the machine's roofline, peak memory, run metadata.

GPU times come from `triton.testing.do_bench` (median, L2 flushed between calls), or from its CUDA
graph variant for launch-bound ops. CPU times are the median of wall-clock repeats; a sweep's
implementations of one case are timed in alternating slices (`interleaved_median_ms`), so that a
shared host's drift moves them alike. Inputs rotate over copies larger than the last-level cache
(`copies`), so weights are read from memory.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import time

import torch

ROTATE_BYTES = 256 * 2**20   # rotate inputs until this many bytes: > the LLC of CPUs and GPUs here
MAX_COPIES = 16


def copies(bytes_per_copy: int) -> int:
    """How many input copies to rotate over so that each call reads from memory, not cache
    (0 bytes: the case opts out, as compute-bound training steps do)."""
    if bytes_per_copy <= 0:
        return 1
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(1, bytes_per_copy))))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, min_time_s: float = 0.3, graph: bool = False) -> float:
    """Median milliseconds of `fn()` after a warm-up."""
    if device == "cuda":
        import triton.testing
        fn()
        if graph:
            try:
                return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            except Exception:  # not capturable (host syncs, allocator): fall back to events
                pass
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up: first-call allocation, lazy init
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def interleaved_median_ms(fns, min_time_s: float = 0.3, rounds: int = 5, max_calls: int = 50,
                          warm_rounds: int = 1):
    """CPU: the median milliseconds of each of `fns`, timed in `rounds` slices that alternate
    between them (forward, then backward order), each slice about `min_time_s / rounds` of one fn
    and at least one call, so each gets `rounds` to `max_calls` calls. Timed one after another, a
    2-core VM's drift (a neighbour, the clock) moved a ratio between two fns by up to 1.5x from
    run to run. `warm_rounds` rounds of slices run first, untimed: right after a case's copies
    are built (hundreds of MB), the first slice ran up to 1.9x slower than the later ones. A fn
    that raises gets its exception in its place, and is not called again."""
    out: list = [[] for _ in fns]
    per_slice = max(1, max_calls // rounds)
    for r in range(warm_rounds + rounds):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            if isinstance(out[i], Exception):
                continue
            start = time.perf_counter()
            for _ in range(per_slice):
                t0 = time.perf_counter()
                try:
                    fns[i]()
                except Exception as e:  # noqa: BLE001 -- reported in its place
                    out[i] = e
                    break
                t1 = time.perf_counter()
                if r >= warm_rounds:
                    out[i].append((t1 - t0) * 1e3)
                if t1 - start >= min_time_s / rounds:
                    break
    return [t if isinstance(t, Exception) else sorted(t)[len(t) // 2] for t in out]


def peak_extra_mib(fn, device: str):
    """Peak memory one call allocates beyond what was live before it (CUDA only; else None)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def roofline(device: str, dtype: torch.dtype) -> dict:
    """Memory bandwidth and the matmul rate (TFLOP/s), measured now: in `dtype` on GPUs, in fp32 on
    CPUs (the FMA units' rate; without AMX a CPU's 16-bit GEMM is far slower than its hardware,
    0.0003 TFLOP/s in bf16 on the 2-core EPYC, which made % roofline meaningless).

    Bandwidth is measured two ways, a copy (bytes read + written) and a read-only sum; the ops
    here mostly read, and on CPUs a copy also pays for write-allocate, so `memory_GBps`, the
    roofline's bandwidth, is the larger of the two."""
    n = (1 << 30) if device == "cuda" else (256 << 20)
    a = torch.ones(n // 4, dtype=torch.float32, device=device)
    copy_ms = median_ms(lambda: a.clone(), device, min_time_s=0.5)
    read_ms = median_ms(lambda: a.sum(), device, min_time_s=0.5)
    del a
    s = 8192 if device == "cuda" else 2048
    dtype = dtype if device == "cuda" else torch.float32
    m = torch.randn(s, s, dtype=dtype, device=device)
    mm_ms = median_ms(lambda: m @ m, device, min_time_s=1.0)
    copy, read = 2 * n / copy_ms / 1e6, n / read_ms / 1e6
    return {"copy_GBps": copy, "read_GBps": read, "memory_GBps": max(copy, read),
            "matmul_TFLOPs": 2 * s**3 / mm_ms / 1e9,
            "matmul_dtype": str(dtype).replace("torch.", ""), "copy_bytes": n, "matmul_size": s}


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken on this machine
        return None


def _git_commit() -> str | None:
    """The short commit, with "+dirty" when the working tree has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
                ) or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        name = None
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def metadata(device: str) -> dict:
    driver = None
    if device == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    from .. import ops
    return {"device": device_name(device), "device_type": device, "driver": driver,
            "cuda": torch.version.cuda if device == "cuda" else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
            "peft": _version("peft"), "transformers": _version("transformers"),
            "peftkern": _version("peftkern"), "peftkern_commit": _git_commit(),
            "torch_threads": torch.get_num_threads(),
            "peftkern_backends": list(ops.available(torch.device(device))),
            "cpu_flags": cpu_flags()}


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """The host's SIMD flags that peftkern's CPU kernels care about (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return []
    have = set(line.split(":", 1)[-1].split())
    return [f for f in SIMD_FLAGS if f in have]
