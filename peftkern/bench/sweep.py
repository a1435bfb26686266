"""The sweep: which cases each op runs by default, and the loop that times every implementation."""
from __future__ import annotations

import functools
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import cases, measure, steps

L8B = cases.LLAMA3_8B
SQ = [(4096, 4096)]


@dataclass(frozen=True)
class OpSpec:
    build: Callable
    help: str
    shapes: dict          # "cuda" / "cpu" / "quick" -> [(N, K)]
    Ms: dict
    ranks: dict


def _by(cuda, cpu, quick):
    return {"cuda": cuda, "cpu": cpu, "quick": quick}


OPS = {
    "dequantize": OpSpec(cases.dequantize, "NF4 + double-quant weight to the compute dtype",
                         _by(L8B, SQ + [(14336, 4096)], SQ), _by([0], [0], [0]), _by([0], [0], [0])),
    "decode": OpSpec(cases.decode, "QLoRA forward at decode batch sizes (memory-bound)",
                     _by(L8B, SQ + [(14336, 4096)], SQ), _by([1, 4, 16], [1, 16], [1, 16]),
                     _by([16], [16], [16])),
    "qlora_fwd": OpSpec(cases.qlora_fwd, "QLoRA forward at prefill/training batch sizes",
                        _by(L8B, SQ, SQ), _by([128, 2048, 8192], [128], [64]), _by([16], [16], [16])),
    "qlora_fwd_bwd": OpSpec(cases.qlora_fwd_bwd, "QLoRA forward + backward (dX, dA, dB)",
                            _by(L8B, SQ, SQ), _by([2048, 8192], [128], [64]),
                            _by([8, 16, 64], [16], [16])),
    "lora_fwd": OpSpec(cases.lora_fwd, "LoRA forward over a dense weight",
                       _by(L8B, SQ, SQ), _by([1, 16, 2048, 8192], [16, 128], [16]),
                       _by([16], [16], [16])),
    "lora_fwd_bwd": OpSpec(cases.lora_fwd_bwd, "LoRA forward + backward over a dense weight",
                           _by(L8B, SQ, SQ), _by([2048, 8192], [128], [64]), _by([16], [16], [16])),
    "adalora_step": OpSpec(steps.adalora_step, "AdaLoRA layer step: fwd + bwd + rank allocator",
                           _by(SQ, SQ, [(1024, 1024)]), _by([4096], [256], [64]), _by([12], [12], [12])),
    "dora_step": OpSpec(steps.dora_step, "DoRA layer fwd + bwd (dense base) vs LoRA and PEFT",
                        _by(L8B, SQ, [(1024, 1024)]), _by([2048, 8192], [128], [64]),
                        _by([16], [16], [16])),
    "qdora_step": OpSpec(steps.qdora_step, "QDoRA layer fwd + bwd (bnb 4-bit base) vs QLoRA and "
                         "PEFT", _by(L8B, SQ, [(1024, 1024)]), _by([2048, 8192], [128], [64]),
                         _by([16], [16], [16])),
    **{f"mixed_{n}": OpSpec(functools.partial(cases.mixed_batch, n),
                            f"LoRA inference, a batch of 16 sequences mixing {n} adapter(s) "
                            "(adapter_names)", _by(SQ, SQ, [(1024, 1024)]),
                            _by([16, 4096], [16, 512], [64]), _by([16], [16], [16]))
       for n in (1, 4, 16)},
    "moe_step": OpSpec(steps.moe_step, "MoE experts block (8 experts, top-2) fwd + bwd with LoRA "
                       "on its expert weights (NxK = expert intermediate x hidden, M tokens)",
                       _by([(1536, 4096)], [(512, 1024)], [(128, 256)]), _by([4096], [256], [64]),
                       _by([16], [16], [8])),
    "model_step": OpSpec(steps.model_step, "small random Llama QLoRA training step (NxK = "
                         "intermediate x hidden, M tokens)",
                         _by([(5632, 2048)], [(1376, 512)], [(688, 256)]), _by([4096], [256], [128]),
                         _by([16], [16], [16])),
}


def plan(ops, device, quick, shapes=None, Ms=None, ranks=None) -> list[tuple]:
    """[(op, N, K, M, r)]: each op's defaults, with any axis given on the command line replaced."""
    key = "quick" if quick else device
    out = []
    for op in ops:
        spec = OPS[op]
        fixed_M = spec.Ms[key] == [0]      # ops without a batch (dequantize) or a rank ignore those
        out += [(op, N, K, M, r) for (N, K), M, r in itertools.product(
            shapes or spec.shapes[key], spec.Ms[key] if fixed_M else (Ms or spec.Ms[key]),
            spec.ranks[key] if spec.ranks[key] == [0] else (ranks or spec.ranks[key]))]
    return out


class Progress:
    """A one-line progress bar on stderr (a line per item when stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.start, self.tty = total, time.time(), sys.stderr.isatty()

    def show(self, i: int, what: str):
        done = int(30 * i / max(1, self.total))
        line = f"[{'#' * done}{'.' * (30 - done)}] {i}/{self.total} {time.time() - self.start:5.0f}s {what}"
        print(("\r" + line.ljust(110)) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _copies(impl):
    """The implementation's rotating call (over copies past the caches), its first copy, and how
    many copies it rotates over."""
    call, nbytes = impl.make()
    calls = [call] + [impl.make()[0] for _ in range(measure.copies(nbytes) - 1)]
    for c in calls:  # warm every copy: first calls may allocate or cache per layer
        c()
    it = itertools.cycle(calls)
    return (lambda: next(it)()), call, len(calls)


def _time_impl(case, impl, min_time_s):
    rotate, call, n = _copies(impl)
    ms = measure.median_ms(rotate, case.device, min_time_s, graph=case.graph)
    return ms, measure.peak_extra_mib(call, case.device), n


def _row(case, impl, ms, peak, n, roof):
    tflops = case.flops / ms / 1e9 if case.flops else None
    gbps = case.bytes / ms / 1e6 if case.bytes else None
    bound = max(case.bytes / roof["memory_GBps"] / 1e6, case.flops / roof["matmul_TFLOPs"] / 1e9)
    return {"op": case.op, "N": case.N, "K": case.K, "M": case.M, "r": case.r,
            "dtype": str(case.dtype).replace("torch.", ""), "impl": impl, "ms": ms,
            "TFLOPs": tflops, "GBps": gbps, "pct_roofline": 100 * bound / ms if bound else None,
            "peak_extra_MiB": peak, "copies": n}


def _error_row(case, name, e, roof):
    return {**_row(case, name, float("nan"), None, 0, roof), "error": f"{type(e).__name__}: {e}"[:300]}


def _cpu_rows(case, roof, min_time_s):
    """CPU: every implementation's copies built first, then all timed in alternating slices."""
    built, rows = [], {}
    for impl in case.impls:
        try:
            built.append((impl.name, *_copies(impl)))
        except Exception as e:  # report and go on: one broken baseline must not sink the sweep
            rows[impl.name] = _error_row(case, impl.name, e, roof)
    times = measure.interleaved_median_ms([b[1] for b in built], min_time_s)
    for (name, _, _, n), ms in zip(built, times):
        rows[name] = _error_row(case, name, ms, roof) if isinstance(ms, Exception) \
            else _row(case, name, ms, None, n, roof)
    return [rows[impl.name] for impl in case.impls]


def run_case(case, roof, min_time_s) -> list[dict]:
    if case.device == "cpu":
        rows = _cpu_rows(case, roof, min_time_s)
    else:
        rows = []
        for impl in case.impls:
            try:
                ms, peak, n = _time_impl(case, impl, min_time_s)
                rows.append(_row(case, impl.name, ms, peak, n, roof))
            except Exception as e:  # report and go on: one broken baseline must not sink the sweep
                rows.append(_error_row(case, impl.name, e, roof))
            if case.device == "cuda":
                torch.cuda.empty_cache()
    ours = next((r["ms"] for r in rows if r["impl"] == "peftkern"), float("nan"))
    for r in rows:   # > 1: peftkern is that many times faster than this implementation
        r["peftkern_speedup"] = r["ms"] / ours if ours == ours and r["ms"] == r["ms"] else None
    return rows


def run(ops, device, dtype, quick=False, shapes=None, Ms=None, ranks=None) -> tuple[dict, list]:
    items = plan(ops, device, quick, shapes, Ms, ranks)
    meta = measure.metadata(device)
    print(f"measuring the roofline of {meta['device']} ...", file=sys.stderr, flush=True)
    meta["roofline"] = measure.roofline(device, dtype)
    meta["quick"] = quick
    bar, rows = Progress(len(items)), []
    for i, (op, N, K, M, r) in enumerate(items):
        case = OPS[op].build(N, K, M, r, dtype, device)
        bar.show(i, case.label)
        rows += run_case(case, meta["roofline"], 0.1 if quick else 0.3)
        del case
    bar.show(len(items), "done")
    bar.close()
    return meta, rows
