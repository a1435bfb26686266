"""Static GPU check of the Triton kernels: compile for sm_80 / sm_90a without a GPU, read the SASS.

    python -m peftkern.bench.static [--out DIR] [--quick] [--arch 80,90]

What it does. Every kernel the dispatcher can launch is compiled ahead of time for each target
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`): the fused (Q)LoRA GEMM
(`_lora_matmul_kernel`) for every tile config in `CANDIDATES` plus the non-interpreter rule
`_config(M, capability)` (`RULE`: a candidate per regime and arch family), dense / nf4 / fp4
weights with plain or nested (double-quantized) absmax, fp16 (rule configs only) / bf16 / fp32, forward and dX, the split-K
epilogue kernel, quantize (every bnb blocksize), dequantize, the AdaLoRA sensitivity update and
the DoRA weight norm (`_dora_norm_kernel`: dense, 4-bit plain and nested, each dtype) and the
mixed-adapter grouped LoRA (`_shrink_kernel`, `_expand_kernel`, each dtype), and the Gluon
4-bit kernels (kernels/qlora_wgmma.py: `_qlora_wgmma_kernel` for small M, `_qlora_wgmma_large_kernel`
and its scale decode `_block_scales_t_kernel` for large M, the dX kernel `_qlora_wgmma_dx_kernel`
(also with a dropout mask); sm_90a only, what the GLUON candidates launch; compiled through
`GluonASTSource`).
Reduced sets: bias and the DoRA output scale (forward), dropout mask (dX) and fp32 adapters only on the rule configs, dense
and nf4-nested, bf16; M = 1 (Triton makes an int == 1 a constexpr) on the small rule config.
`--configs rule`: the rule configs and the GLUON candidates. `--quick`: those, the first split-K
small and one more large candidate; dense and
nf4-nested; bf16 and fp32; no epilogue extras; quantize/dequantize at blocksize 64; AdaLoRA fp32. The arguments are the real ones: `JITFunction.run` is replaced by a
recorder, the custom ops (`peftkern.ops.lora.lora_linear_fwd`, `qlora_linear_dx`, ...; backend
forced to Triton and the tile config by `ops.use_backend` / `ops.use_config`) are called on CPU
tensors shaped like the contiguous CUDA ones, and the recorded positional args / kwargs go
through Triton's own binder (`create_function_from_signature` + `native_specialize_impl`, then
`JITFunction._pack_args`) for a backend of the target arch, so pointer dtypes, `tt.divisibility`
(ints % 16 == 0, 16-byte aligned pointers) and `== 1` ints turned constexpr are exactly Triton's.
The ptxas `-v` log (registers, stack frame, spill stores/loads), `cuobjdump -res-usage` (REG,
STACK, LOCAL) and `nvdisasm -c` (the SASS, with the names of called routines) of each cubin are
read; `metadata.shared` is the shared memory.

Main loop. In SASS the K loop is the range [target, branch] of a backward branch (BRA to a lower
address); the largest such range (most instructions) is "the main loop". Its instruction mix is
counted statically (each instruction once: a guarded slow path inside the loop counts as if
taken). A loop nested in it (the Gluon kernel's K loop inside its persistent tile loop) is
counted as running INNER_ITERS times per main-loop iteration (the config says how many; the
large Gluon kernels': Q / 128 per shape, less the dX kernel's one peeled iteration, which is in
the tile loop's own code). 64-bit integer division is counted in the PTX of the largest PTX loop (`div/rem.s64/u64`:
`main_loop_div64`) and as CALLs to the `__internal_*_div_s64`-style routines in the SASS main loop
(`main_loop_div64_calls`; `main_loop_calls` counts every CALL).

First-order bound model (a STATIC ESTIMATE, never a measurement):
  * per main-loop iteration one CTA issues  loop_instr × num_warps  warp-instructions, i.e.
    thread-instructions = loop_instr × 32 × num_warps;
  * weight elements decoded per iteration = BLOCK_K × BLOCK_N (forward: the Wᵀ tile is
    BLOCK_K(k) × BLOCK_N(n); dX: the same kernel with W addressed [N, K], the tile is
    BLOCK_K(q=n) × BLOCK_N(p=k));  instr_per_weight_elem = thread-instructions / weight elements;
  * issue cycles / CTA iteration = loop_instr × num_warps / min(4, resident warps) (4 schedulers
    per SM, each issuing one warp-instruction per cycle; a warp issues at most one per cycle);
    MMA cycles / CTA iteration = 2·BM·BN·BK / (dense 16-bit tensor FLOP per cycle per SM) when
    the loop has tensor-core MMAs (else 0: fp32 IEEE runs on FFMA, already in the issue count);
  * L1 cycles / CTA iteration = shared-memory wavefronts (32 banks × 4 B: one 128 B wavefront
    per cycle per SM): every LDS / STS / LDSM / STSM / cp.async of the loop × num_warps, as if
    conflict-free (ceil(32 lanes × width / 128); ldmatrix .xN: N), + wgmma's shared operands
    (B, and A unless in registers) per warpgroup / 128 B, + the table lookups' bank conflicts:
    BLOCK_N·BLOCK_K/2 lookups (one per packed byte) / 32 lanes × (the expected wavefronts of a
    warp's 32 uniformly random lookups into the 256-entry pair table, 4 B entries in the swapped
    16-bit forward: 3.15, else 8 B: 5.82 — `gather_wavefronts` — minus the conflict-free cost);
  * the busiest SM runs ceil(#CTAs / SMs) CTAs, `resident` = min(that, CTAs per SM) at a time
    in ceil(that / resident) waves; co-resident CTAs share the schedulers, tensor cores and the
    shared pipe, so
    compute time = (max(issue, MMA, L1) × iterations (ceil(ceil(Q / SPLIT_K) / BK)) + once) ×
    resident × waves / clock, where `once` is the code outside the main loop (staging before
    it, the epilogue after it: each SASS instruction once, max of its issue cycles and its shared
    wavefronts) run once per CTA; CTAs per SM = min(65536 registers / (registers per warp rounded to 256 ×
    warps), floor(shared limit / shared), 64 warps / warps, 32). Latency is not modelled: with
    few warps per SM the real time is longer;
  * persistent kernels (the Gluon kernels) run a tile per main-loop iteration, its K loop
    nested (the tile's instructions = the tile loop's + (K-loop iterations - 1) × the K loop's:
    the small kernel 4 per K slice, the large ones Q / 128); the busiest SM's tiles and programs
    come from the launcher's own schedule (`qlora_wgmma.tiles_per_sm`, `large_tiles_per_sm`,
    `dx_tiles_per_sm`),
    and its time is (max(issue, MMA, L1) × its tiles + once × its programs) / clock; their
    table lookups are conflict-free by construction (one lane-interleaved table copy per
    lane), so their LDS count as is;
  * HBM time = bytes once each (x or dY, the weight: dense, or packed codes + absmax (+ nested
    absmax2 and code8), L and R2, out) / bandwidth;  bound = max(compute, HBM); a split-K
    workspace that fits L2 (SPLIT_K × M × P fp32, written and read back once: 0.9-3.7 MB at
    M = 16) is not counted; a larger one (the large Gluon forward's M × P fp32 on its workspace
    path, DoRA's: 128 MB at M = 8192, P = 4096) replaces the output in the kernel's bytes, and
    the epilogue launch that reads it back (+ writes out, reads L and R2) adds its HBM time
    after the kernel's: bound = max(compute, HBM) + epilogue (the large Gluon kernels' FUSED
    variants and the dX kernel have their epilogue in them: no workspace);
  * bound_vs_dense = the 4-bit variant's bound / the dense variant's (same config, dtype, pass,
    arch, M), both estimated this way (per row at N = K = 4096 and the row's M; per shape in
    `shape_bounds` for N x K = 4096 x 4096 and 14336 x 4096, M = 1, 16, 8192, r = 16, bf16).
    A config over the shared limit has no occupancy, hence no bound.
  Hardware assumed: sm_90a = H100 SXM, 132 SMs, 1.83 GHz, 989 TFLOP/s dense bf16 → 4096
  FLOP/cycle/SM, 3.35 TB/s, 232448 B shared per CTA; sm_80 = A100, 108 SMs, 1.41 GHz, 312 TFLOP/s
  → 2048 FLOP/cycle/SM, 2.0 TB/s, 166912 B shared per CTA.

The compile itself needs the kernels imported without TRITON_INTERPRET (kernels/common.py
reads it at import): run as `-m`, this module re-executes itself in a clean environment when
TRITON_INTERPRET or PEFTKERN_NAN_FILL is set. Triton's own cache goes to a temporary directory
(so ptxas runs and its log is read); analyses are cached in ~/.cache/peftkern/static keyed by the
kernel's source hash (`JITFunction.cache_key`), the specialization, options and arch
(`--no-cache` to recompile).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

STATIC_VERSION = 5  # bump when analyze() reports new fields (cache key)
OUT_DEFAULT = os.path.join("benchmarks", "results", "static")
CACHE_DEFAULT = os.path.join(os.path.expanduser("~"), ".cache", "peftkern", "static")
RANK = 16
SHAPES = ((4096, 4096), (14336, 4096))  # N x K (out x in features)
M_OF = {"small": 16, "large": 8192}
BLOCKSIZE = 64  # bnb's default 4-bit blocksize (QLoRA); an int argument, specialized as % 16

ARCHS = {
    80: dict(gpu="A100 (sm_80)", sms=108, clock=1.41e9, mma_flop=2048, hbm=2.0e12,
             shared_limit=166912),
    90: dict(gpu="H100 SXM (sm_90a)", sms=132, clock=1.83e9, mma_flop=4096, hbm=3.35e12,
             shared_limit=232448),
}
REGS_PER_SM, WARPS_PER_SM, CTAS_PER_SM = 65536, 64, 32
WEIGHTS = ("dense", "nf4", "nf4-nested", "fp4", "fp4-nested")
DTYPES = ("fp16", "bf16", "fp32")
PASSES = ("fwd", "dx")
QUICK_WEIGHTS = ("dense", "nf4-nested")
QUICK_DTYPES = ("bf16", "fp32")
L2_BYTES = 50 * 2 ** 20  # H100 SXM's L2 (A100: 40 MB); a split-K workspace below it stays there


# ---- variants ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One launch to record: `kind` is gemm, quantize, dequantize, adalora, dora (the norm) or
    grouped (the mixed-adapter shrink and expand)."""
    kind: str
    dtype: str
    weight: str = "-"
    pass_: str = "-"
    regime: str = "-"
    index: int = -1          # position in CANDIDATES[regime]; -1: the rule's own config
    M: int = 0
    extra: str = ""          # bias, mask, lora-fp32, scale (GEMM); blocksize / tensor (others)
    blocksize: int = BLOCKSIZE


def _torch_dtype(name):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _candidates():
    from peftkern.kernels import lora_linear
    return lora_linear.CANDIDATES


def rule_configs() -> dict:
    """The GPU default tiles per (regime, arch) (`lora_linear.RULE`)."""
    from peftkern.kernels import lora_linear
    return {(r, a): lora_linear.rule_config(r, (a // 10, a % 10)) for r in M_OF for a in ARCHS}


def rule_indices(regime) -> list[int]:
    """The candidates that are the rule on some arch."""
    cands = _candidates()[regime]
    return sorted({cands.index(c) for (r, _), c in rule_configs().items() if r == regime})


def quick_indices(cands) -> dict:
    """The quick subset's configs: the rule, the first split-K small candidate, the Gluon
    candidates, the first large candidate that is not the rule."""
    rule = rule_and_gluon(cands)
    split = next(i for i, c in enumerate(cands["small"]) if c.get("SPLIT_K", 1) > 1)
    large = next(i for i in range(len(cands["large"])) if i not in rule["large"])
    return {"small": sorted(set(rule["small"]) | {split}), "large": rule["large"] + [large]}


def rule_and_gluon(cands) -> dict:
    """The rule configs and the Gluon candidates (kernels/qlora_wgmma.py), per regime."""
    return {r: sorted(set(rule_indices(r)) | {i for i, c in enumerate(cands[r]) if c.get("GLUON")})
            for r in cands}


def gemm_variants(configs, weights, dtypes, extras, fp16_rule_only=False) -> list[Variant]:
    """GEMM variants; `fp16_rule_only` (the full set's default) compiles fp16 for the rule
    configs only: it differs from bf16 in the MMA and conversion types alone."""
    cands = _candidates()
    rule = {r: rule_indices(r) for r in cands}
    pick = {"rule": rule_and_gluon(cands), "quick": quick_indices(cands),
            "all": {r: list(range(len(c))) for r, c in cands.items()}}[configs]
    out = []
    for regime, idxs in pick.items():
        for i in idxs:
            for w in weights:
                for dt in dtypes:
                    if dt == "fp16" and i not in rule[regime] and fp16_rule_only:
                        continue
                    out += [Variant("gemm", dt, w, p, regime, i, M_OF[regime]) for p in PASSES]
    out += _gluon_large_variants(pick["large"], weights, dtypes)
    if extras:
        out += _extra_variants(weights, dtypes)
    return out


def _gluon_large_variants(indices, weights, dtypes) -> list[Variant]:
    """The large Gluon forward at its launcher's other blocksizes (a constexpr: a compile each)
    and at K = 14336, recorded as extra "K=... bs=..." rows: each must compile without spills
    like the one at N = K = 4096; its workspace path (DoRA's scale and z) and the dX kernel
    with a dropout mask."""
    gluon = [i for i in indices if _candidates()["large"][i].get("GLUON")]
    if not gluon or "nf4-nested" not in weights or "bf16" not in dtypes:
        return []
    return [Variant("gemm", "bf16", "nf4-nested", "fwd", "large", i, M_OF["large"],
                    f"K={k} bs={bs}", bs) for i in gluon for k, bs in LARGE_EXTRA] + [
        # DoRA's scale and z: the large forward's workspace path (FUSED off); the dX kernel's
        # epilogue with a dropout mask (its own specialization)
        Variant("gemm", "bf16", "nf4-nested", p, "large", i, M_OF["large"], extra)
        for i in gluon for p, extra in (("fwd", "scale"), ("dx", "mask"))]


# (K, blocksize) of the large Gluon forward's extra rows: bnb's blocksizes past 64 (the kernel
# takes any multiple of 64) and the 14336-wide down projection
LARGE_EXTRA = ((4096, 128), (4096, 512), (4096, 4096), (14336, 64))


def _extra_variants(weights, dtypes) -> list[Variant]:
    """The reduced set of epilogue variants: rule configs, dense and nf4-nested, bf16 (or the first
    dtype selected): forward + bias, dX + dropout mask, fp32 adapters (LORA_IEEE), and M = 1
    (M == 1 is specialized to a constexpr) for every weight and dtype of the small rule config."""
    out = []
    w2 = [w for w in ("dense", "nf4-nested") if w in weights]
    dt = "bf16" if "bf16" in dtypes else dtypes[0]
    for regime in ("small", "large"):
        for i, w in itertools.product(rule_indices(regime), w2):
            out += [Variant("gemm", dt, w, "fwd", regime, i, M_OF[regime], "bias"),
                    Variant("gemm", dt, w, "fwd", regime, i, M_OF[regime], "scale"),
                    Variant("gemm", dt, w, "dx", regime, i, M_OF[regime], "mask")]
            out += [Variant("gemm", dt, w, p, regime, i, M_OF[regime], "lora-fp32")
                    for p in PASSES if dt != "fp32"]
    out += [Variant("gemm", d, w, p, "small", i, 1) for i in rule_indices("small")
            for w in weights for d in dtypes for p in PASSES]
    return out


def other_variants(kinds, quick) -> list[Variant]:
    out = []
    sizes = (BLOCKSIZE,) if quick else (32, 64, 128, 256, 512, 1024, 2048, 4096)
    qdt = ("bf16", "fp32") if quick else DTYPES
    if "quant" in kinds:
        out += [Variant("quantize", d, qt, blocksize=b) for qt in (("nf4",) if quick else
                ("nf4", "fp4")) for d in qdt for b in sizes]
        out += [Variant("dequantize", d, w) for d in qdt
                for w in (QUICK_WEIGHTS[1:] + ("nf4",) if quick else WEIGHTS[1:])]
    if "adalora" in kinds:
        out += [Variant("adalora", d, extra=t) for d in ("fp32",) + (() if quick else ("bf16",))
                for t in ("lora_A", "lora_E", "lora_B", "lora_B mixed")]
    if "dora" in kinds:  # the norm per weight kind, and the scale's gradient (column_dot)
        out += [Variant("dora", d, w) for d in qdt
                for w in (QUICK_WEIGHTS + ("nf4",) if quick else WEIGHTS) + ("column_dot",)]
    if "grouped" in kinds:
        out += [Variant("grouped", d) for d in qdt]
    return out


# ---- recording the launches ----------------------------------------------------------------------

@dataclass
class Launch:
    fn: object
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def recording(config=None):
    """Replace `JITFunction.run` with a recorder (no launch), force the Triton backend in the ops
    and inject `config` where they ask for the tuned one; yield the list of launches."""
    from unittest import mock

    from triton import knobs
    from triton.runtime.jit import JITFunction

    from peftkern.ops import dispatch
    launches = []

    def run(self, *args, grid, warmup, **kwargs):  # the first lines of JITFunction.run
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        launches.append(Launch(self, args, kwargs, grid))

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(JITFunction, "run", run))
        stack.enter_context(mock.patch.object(dispatch, "available",
                                              lambda device: ("triton", "reference")))
        stack.enter_context(dispatch.use_backend("triton"))
        stack.enter_context(dispatch.use_config(config))
        stack.callback(dispatch._cached.cache_clear)  # plans made with the patched availability
        dispatch._cached.cache_clear()
        yield launches


def _cpu(shape, dtype):
    import torch
    return torch.empty(shape, dtype=dtype)


def _qstate(weight, N, K, bs):
    """CPU tensors shaped like a QuantizedWeight: packed codes, absmax (uint8 + absmax2, code8,
    offset when nested), quant type."""
    import torch
    nb = N * K // bs
    nested = weight.endswith("nested")
    absmax = _cpu(nb, torch.uint8 if nested else torch.float32)
    extra = (_cpu(-(-nb // 256), torch.float32), _cpu(256, torch.float32),
             _cpu((), torch.float32)) if nested else (None, None, None)
    return (_cpu((N * K // 2, 1), torch.uint8), absmax) + extra + (weight.split("-")[0],)


def call_gemm(v: Variant, N: int, K: int):
    """Call the public op for this variant (launches recorded, nothing runs on a GPU)."""
    from peftkern.ops import lora
    dt = _torch_dtype(v.dtype)
    ldt = _torch_dtype("fp32") if v.extra == "lora-fp32" else dt
    A, B = _cpu((RANK, K), ldt), _cpu((N, RANK), ldt)
    if v.pass_ == "fwd":
        x = _cpu((v.M, K), dt)
        bias = _cpu(N, dt) if v.extra in ("bias", "scale") else None
        scale = _cpu(N, _torch_dtype("fp32")) if v.extra == "scale" else None  # DoRA's m / norm
        keep = scale is not None  # and the pre-scale result, as training keeps it
        if v.weight == "dense":
            return lora.lora_linear_fwd(x, _cpu((N, K), dt), bias, A, B, 2.0, None, scale, None,
                                        keep)
        data, am, am2, c8, off, qt = _qstate(v.weight, N, K, v.blocksize)
        return lora.qlora_linear_fwd(x, data, am, am2, c8, off, qt, v.blocksize, N, bias, A, B,
                                     2.0, None, dt, scale, None, keep)
    dy, dyb = _cpu((v.M, N), dt), _cpu((v.M, RANK), ldt)
    mask = _cpu((v.M, K), ldt) if v.extra == "mask" else None
    if v.weight == "dense":
        return lora.lora_linear_dx(dy, _cpu((N, K), dt), A, dyb, 2.0, mask)
    data, am, am2, c8, off, qt = _qstate(v.weight, N, K, v.blocksize)
    return lora.qlora_linear_dx(dy, data, am, am2, c8, off, qt, v.blocksize, K, A, dyb, 2.0, mask,
                                dt)


def call_other(v: Variant, N: int = 4096, K: int = 4096):
    from peftkern import ops
    from peftkern.ops import dora, quant
    import torch
    dt = _torch_dtype(v.dtype)
    if v.kind == "grouped":  # 4 adapters of rank 16 over 64 rows, every row adapter 0
        from peftkern.kernels import multi_lora
        T, n = 64, 4
        A, B = _cpu((n, RANK, K), dt), _cpu((n, N, RANK), dt)
        return multi_lora.add_grouped_lora(_cpu((T, N), dt), _cpu((T, K), dt), A, B,
                                           _cpu(n, torch.float32), torch.zeros(T, dtype=torch.long))
    if v.kind == "dora" and v.weight == "column_dot":  # dY and z of 64 rows
        from peftkern.kernels import dora_norm
        return dora_norm.column_dot(_cpu((64, N), dt), _cpu((64, N), dt))
    if v.kind == "dora":  # the norm's custom-op body; adapters in the variant's dtype
        A, B = _cpu((RANK, K), dt), _cpu((N, RANK), dt)
        if v.weight == "dense":
            return dora._norm(_cpu((N, K), dt), None, None, None, None, None, "nf4", 0, A, B, 2.0,
                              N, K)
        data, am, am2, c8, off, qt = _qstate(v.weight, N, K, v.blocksize)
        return dora._norm(None, data, am, am2, c8, off, qt, v.blocksize, A, B, 2.0, N, K)
    if v.kind == "quantize":
        return quant.quantize_blocks(_cpu((N, K), dt), v.weight, v.blocksize)
    if v.kind == "dequantize":
        data, am, am2, c8, off, qt = _qstate(v.weight, N, K, v.blocksize)
        return quant.dequantize_blocks(data, am, am2, c8, off, qt, v.blocksize, [N, K], dt)
    shape, rank_dim = {"lora_A": ((RANK, K), 0), "lora_E": ((RANK, 1), 0),
                       "lora_B": ((N, RANK), 1), "lora_B mixed": ((N, RANK), 1)}[v.extra]
    t = [_cpu(shape, dt) for _ in range(4)]
    if v.extra.endswith("mixed"):  # per-tensor strides: a transposed EMA (the SAME=False path)
        t[3] = _cpu(shape[::-1], dt).t()
    return ops.adalora_update_ipt(*t, 0.85, 0.85, rank_dim)


def config_of(v: Variant) -> dict | None:
    if v.kind != "gemm":
        return None
    return _candidates()[v.regime][v.index] if v.index >= 0 else rule_configs()[(v.regime, 90)]


def record(v: Variant, N: int = 4096, K: int = 4096) -> list[Launch]:
    with recording(config_of(v)) as launches:
        call_gemm(v, N, K) if v.kind == "gemm" else call_other(v, N, K)
    return launches


# ---- compiling with Triton's own specialization --------------------------------------------------

def specialize(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as `JITFunction.run` builds them, for a
    backend of `arch` instead of the active driver's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    return fn._pack_args(backend, dict(launch.kwargs), bound, spec, options)


def compile_key(launch: Launch, arch: int, spec) -> str:
    import triton
    signature, constexprs, attrs, options = spec[1], spec[2], spec[3], spec[0]
    text = repr((STATIC_VERSION, triton.__version__, launch.fn.__name__, launch.fn.cache_key,
                 sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted((k, repr(v)) for k, v in options.__dict__.items()), arch))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compile_launch(launch: Launch, arch: int, spec):
    """Compile; return (kernel, ptxas log)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    options, signature, constexprs, attrs = spec
    if launch.fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    else:
        from triton.compiler import ASTSource
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    return kernel, log.getvalue()


# ---- reading the binaries ------------------------------------------------------------------------

def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_tool(name, flags, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(name), *flags, f.name], check=True, capture_output=True,
                              text=True).stdout


def res_usage(cubin: bytes, name: str) -> dict:
    """REG / STACK / LOCAL of the entry function `name` (`cuobjdump -res-usage` also lists the
    internal routines it calls, e.g. the 64-bit division, with their own counts)."""
    found = re.findall(r"Function ([^\s:]+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                       _run_tool("cuobjdump", ["-res-usage"], cubin))
    fields = next(f[1:] for f in found if f[0] == name)
    return dict(zip(("registers", "stack_bytes", "static_shared", "local_mem"), map(int, fields)))


def ptxas_log(log: str) -> dict:
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:
        return {}
    return dict(zip(("stack_frame", "spill_bytes", "spill_load_bytes"), map(int, m.groups())))


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
LABEL = re.compile(r"^\s*([.$\w]+):\s*$")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """[(address, opcode with modifiers, operands)] from `nvdisasm -c`; branch / call targets
    `(.L_x_N)` become `0x<address> <label>`, so calls keep their routine's name."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = SASS_LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            instrs.append((addr, m.group(2), m.group(3).strip()))
    resolve = lambda r: re.sub(r"`\(([^)]+)\)", lambda t: f"{labels.get(t.group(1), -1):#x} "  # noqa
                                                          f"{t.group(1)}", r)
    return [(a, op, resolve(r)) for a, op, r in instrs]


def sass_main_loop(instrs, within=None) -> list[tuple[int, str, str]]:
    """The instructions of the largest [target, branch] range of a backward branch (`within`:
    the largest strictly inside that range: a nested loop)."""
    best = []
    lo, hi = (within[0][0], within[-1][0]) if within else (-1, float("inf"))
    for addr, op, rest in instrs:
        m = re.match(r"0x([0-9a-f]+)", rest)
        if op.split(".")[0] in ("BRA", "BRX", "JMP") and m and int(m.group(1), 16) < addr \
                and lo <= int(m.group(1), 16) and addr <= hi and (lo, hi) != (int(m.group(1), 16), addr):
            body = [i for i in instrs if int(m.group(1), 16) <= i[0] <= addr]
            best = body if len(body) > len(best) else best
    return best


DIV64_ROUTINE = re.compile(r"(div|rem)_[su]64")


CATEGORIES = (
    ("mma", ("HMMA", "HGMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA")),
    ("global_load", ("LDG",)), ("global_store", ("STG", "RED", "ATOM", "ATOMG")),
    ("shared_load", ("LDS", "LDSM")), ("shared_store", ("STS", "STSM")),
    ("cp_async", ("LDGSTS", "UTMALDG", "UBLKCP", "LDGDEPBAR")),
    ("local", ("LDL", "STL")), ("constant", ("LDC", "ULDC")),
    ("int_alu", ("IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP",
                 "IMNMX", "IABS", "SEL", "PRMT", "BMSK", "POPC", "FLO", "BREV", "IMUL", "VIADD",
                 "VIMNMX", "SGXT", "PLOP3", "P2R", "R2P", "IDP", "IDP4A", "IMAD.WIDE", "ICMP")),
    ("fp_alu", ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU", "HFMA2", "HMUL2",
                "HADD2", "HMNMX2", "HSETP2", "FSWZADD", "DADD", "DMUL", "DFMA", "FMNMX3")),
    ("conversion", ("F2F", "F2I", "I2F", "I2FP", "F2FP", "I2I", "FRND", "F2IP")),
    ("branch", ("BRA", "BRX", "JMP", "BSSY", "BSYNC", "WARPSYNC", "EXIT", "BREAK", "YIELD")),
    ("call", ("CALL", "RET")),
    ("sync", ("BAR", "DEPBAR", "WARPGROUP", "MEMBAR", "SYNCS", "ARRIVES", "FENCE", "ERRBAR")),
    ("move", ("MOV", "S2R", "CS2R", "S2UR", "SHFL", "R2UR", "VOTE", "NOP", "UMOV", "MOV32I")),
)
_CATEGORY_OF = {op: cat for cat, ops in CATEGORIES for op in ops}
WIDTHS = ("global_load", "global_store", "shared_load", "shared_store", "cp_async", "local")


def category(op: str) -> str:
    base = op.split(".")[0]
    if base in _CATEGORY_OF:
        return _CATEGORY_OF[base]
    if base.startswith("U"):  # the uniform datapath (UIADD3, ULOP3, USHF, ...)
        return "uniform"
    return "other"


def instruction_mix(body) -> dict:
    """Counts per category, and the memory instructions with their widths (e.g. LDG.E.128)."""
    mix, widths = {}, {}
    for _, op, _ in body:
        cat = category(op)
        mix[cat] = mix.get(cat, 0) + 1
        if cat in WIDTHS:
            widths[op] = widths.get(op, 0) + 1
    return {"categories": dict(sorted(mix.items())), "widths": dict(sorted(widths.items()))}


PTX_DIV64 = re.compile(r"\b(?:div|rem)\.(?:s|u)64\b")


def ptx_loop_div64(ptx: str) -> tuple[int, int]:
    """(64-bit div/rem in the largest PTX loop, in the whole kernel)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"(\$L__BB\d+_\d+):", l))}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    inside = sum(bool(PTX_DIV64.search(l)) for l in lines[best[0]:best[1] + 1])
    return inside, sum(bool(PTX_DIV64.search(l)) for l in lines)


def analyze(kernel, log: str) -> dict:
    """Resources, spills, local memory and the main-loop mix of a compiled kernel."""
    res = res_usage(kernel.asm["cubin"], kernel.metadata.name)
    instrs = parse_sass(_run_tool("nvdisasm", ["-c"], kernel.asm["cubin"]))
    body = sass_main_loop(instrs)
    mix = instruction_mix(body)
    spill = ptxas_log(log) or {"spill_bytes": _stl_bytes(instrs), "spill_load_bytes": None,
                               "spill_source": "sass STL"}
    in_loop, total = ptx_loop_div64(kernel.asm["ptx"])
    ptx = kernel.asm["ptx"]
    md = kernel.metadata
    return dict(
        shared_bytes=md.shared, num_warps=md.num_warps, num_stages=md.num_stages,
        registers=res["registers"], local_bytes=res["stack_bytes"] + res["local_mem"], **spill,
        sass_instructions=len(instrs), main_loop_instructions=len(body),
        main_loop_mma=mix["categories"].get("mma", 0),
        main_loop_div64=in_loop, div64_total=total,
        main_loop_calls=mix["categories"].get("call", 0),
        main_loop_div64_calls=sum(bool(DIV64_ROUTINE.search(r)) for _, op, r in body
                                  if op.startswith("CALL")),
        main_loop_hgmma=_count(body, "HGMMA"), main_loop_hmma=_count(body, "HMMA"),
        main_loop_mix=mix, **shared_traffic(body),
        **_inner_loop(instrs, body),
        outside_loop_instructions=len(instrs) - len(body),
        outside_loop_shared_wavefronts=_outside_wavefronts(instrs, body),
        # bnb's roundings: IEEE division in quantize, no contracted FMAs where it rounds twice
        ptx_div_approx=len(re.findall(r"\bdiv\.(?:full|approx)\.f32", ptx)),
        ptx_fma_f32=len(re.findall(r"\bfma\.rn\.f32", ptx)),
        **({} if body else {"kernel_mix": instruction_mix(instrs)}))


# Shared-memory (L1) pipe: 32 banks x 4 B, one 128 B wavefront per cycle per SM. A conflict-free
# warp access of W bytes per lane takes ceil(32 W / 128) wavefronts; ldmatrix / stmatrix .xN move
# N 8x8 16-bit matrices (N wavefronts); cp.async writes its width into shared memory.
_WAVEFRONTS = {"": 1, "U8": 1, "S8": 1, "U16": 1, "S16": 1, "32": 1, "64": 2, "128": 4}


def _wavefronts(op: str) -> int:
    parts = op.split(".")
    if parts[0] in ("LDSM", "STSM"):  # LDSM.16.M88.4: .x4; no count suffix: .x1
        return int(parts[-1]) if parts[-1].isdigit() else 1
    if parts[0] in ("LDS", "STS", "LDGSTS"):
        sizes = [p for p in parts[1:] if p in _WAVEFRONTS and p]
        return _WAVEFRONTS[sizes[-1]] if sizes else 1
    return 0


def _inner_loop(instrs, body) -> dict:
    """The largest loop nested in the main loop (the persistent Gluon kernel's K loop inside its
    tile loop): its instructions and shared traffic, counted once in the main loop's."""
    inner = sass_main_loop(instrs, within=body) if body else []
    if not inner:
        return {}
    t = shared_traffic(inner)
    return dict(inner_loop_instructions=len(inner), inner_loop_mix=instruction_mix(inner),
                inner_loop_shared_wavefronts=t["main_loop_shared_wavefronts"],
                inner_loop_wgmma_shared_bytes=t["main_loop_wgmma_shared_bytes"])


def per_iteration(row: dict, field: str) -> float:
    """A main-loop count per iteration: the nested loop runs INNER_ITERS times per iteration
    (the config says how many; its body is in the main loop's count once)."""
    extra = row.get("config_dict", {}).get("INNER_ITERS", 1) - 1
    return row.get("main_loop_" + field, 0) + extra * row.get("inner_loop_" + field, 0)


def _outside_wavefronts(instrs, body) -> int:
    """Shared wavefronts one warp issues outside the main loop (staging, epilogue): once per CTA."""
    inside = {a for a, _, _ in body}
    return shared_traffic([i for i in instrs if i[0] not in inside])["main_loop_shared_wavefronts"]


def shared_traffic(body) -> dict:
    """Per main-loop iteration: shared-memory wavefronts one warp issues (LDS / STS / LDSM /
    STSM / cp.async, each as if conflict-free), and the shared bytes each warpgroup's wgmma reads
    (B, and A unless it comes from registers; 16-bit operands)."""
    waves, wgmma = 0, 0
    for _, op, rest in body:
        waves += _wavefronts(op)
        if op.startswith("HGMMA"):
            m = re.match(r"x(\d+)x(\d+)", rest)
            n, k = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
            a_in_regs = re.match(r"\S+\s+R\d+,\s*R\d+", rest) is not None
            wgmma += k * n * 2 + (0 if a_in_regs else 64 * k * 2)
    return dict(main_loop_shared_wavefronts=waves, main_loop_wgmma_shared_bytes=wgmma)


@functools.lru_cache(maxsize=None)
def gather_wavefronts(entries: int, entry_bytes: int, trials: int = 4000) -> float:
    """Expected wavefronts of one warp's table lookup (tl.gather from shared memory) with 32
    uniformly random indices into `entries` entries: per 128 B wavefront (32 lanes of 4 B, 16 of
    8 B), the most distinct words any one bank serves (same word: a broadcast). NF4 codes are
    equiprobable for normal weights, so the bytes are close to uniform. Fixed seed: a constant."""
    import numpy as np
    lanes = 128 // entry_bytes
    idx = np.random.default_rng(0).integers(0, entries, size=(trials * 32 // lanes, lanes))
    words = entry_bytes // 4
    bank = (idx * words) % 32  # an entry's first bank; its other words follow in order
    distinct = np.zeros((idx.shape[0], 32), dtype=np.int64)
    for row in range(idx.shape[0]):
        seen = {}
        for b, e in zip(bank[row], idx[row]):
            seen.setdefault(b, set()).add(e)
        for b, es in seen.items():
            distinct[row, b] = len(es)
    return float(distinct.max(axis=1).mean() * 32 / lanes)


def gather_lookups(row: dict) -> tuple[int, int, int]:
    """(lookups per CTA iteration, table entries, entry bytes) of a 4-bit GEMM's byte-pair table
    (rows of whole blocks: one lookup per packed byte); (0, 0, 0) for a dense weight."""
    if row["weight"] == "dense" or row["kernel"] in CONFLICT_FREE:
        return 0, 0, 0
    cfg = row["config_dict"]
    mma_dtype = row["pass"] == "fwd" and cfg.get("SWAP") and row["dtype"] != "fp32"
    return cfg["BLOCK_N"] * cfg["BLOCK_K"] // 2, 256, 4 if mma_dtype else 8


# Kernels whose table lookups are conflict-free by construction (a lane-interleaved copy per
# lane: kernels/qlora_wgmma.py): their LDS count as is.
CONFLICT_FREE = ("_qlora_wgmma_kernel", "_qlora_wgmma_large_kernel", "_qlora_wgmma_dx_kernel")
GEMMS = ("_lora_matmul_kernel",) + CONFLICT_FREE
HOPPER_ONLY = ("_block_scales_t_kernel",)  # launched only before the large Gluon kernel


def shared_cycles(row: dict) -> float:
    """Shared-pipe cycles per CTA iteration: the warps' wavefronts, wgmma's operand reads, and
    the expected extra wavefronts of the table lookups' bank conflicts."""
    warps = row["num_warps"]
    waves = per_iteration(row, "shared_wavefronts") * warps
    waves += per_iteration(row, "wgmma_shared_bytes") * max(1, warps // 4) / 128
    lookups, entries, ebytes = gather_lookups(row)
    if lookups:
        per_warp = 32  # lanes; a conflict-free lookup costs ebytes / 4 wavefronts per warp
        waves += lookups / per_warp * (gather_wavefronts(entries, ebytes) - ebytes / 4)
    return waves


def _count(body, base: str) -> int:
    return sum(op.split(".")[0] == base for _, op, _ in body)


def _stl_bytes(instrs) -> int:
    width = {"64": 8, "128": 16}
    return sum(width.get(op.split(".")[-1], 4) for _, op, _ in instrs if op.startswith("STL"))


def analyze_launch(launch: Launch, arch: int, cache_dir: str | None, memo: dict) -> dict:
    try:
        spec = specialize(launch, arch)
    except Exception as e:  # noqa: BLE001 -- reported, and the test fails on it
        return {"compiled": False, "error": f"specialize: {type(e).__name__}: {e}"[:400]}
    key = compile_key(launch, arch, spec)
    if key in memo:
        return dict(memo[key])
    path = cache_dir and os.path.join(cache_dir, key + ".json")
    if path and os.path.exists(path):
        with open(path) as f:
            memo[key] = json.load(f) | {"from_cache": True}
        return dict(memo[key])
    memo[key] = _compile_and_analyze(launch, arch, spec, key)
    if path and memo[key]["compiled"]:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(memo[key], f)
    return dict(memo[key])


def _compile_and_analyze(launch, arch, spec, key) -> dict:
    t = time.perf_counter()
    try:
        kernel, log = compile_launch(launch, arch, spec)
        out = {"compiled": True, **analyze(kernel, log)}
    except Exception as e:  # noqa: BLE001
        out = {"compiled": False, "error": f"{type(e).__name__}: {e}"[-600:]}
    sig = spec[1]
    out.update(compile_key=key, compile_s=round(time.perf_counter() - t, 2),
               signature=",".join(f"{k}:{v}" for k, v in sig.items() if v != "constexpr"),
               constexprs={launch.fn.arg_names[p[0]]: _plain(v) for p, v in spec[2].items()})
    return out


def _plain(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


# ---- bound model ---------------------------------------------------------------------------------

def ctas_per_sm(registers: int, shared: int, warps: int, arch: int) -> int:
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps) if per_warp else CTAS_PER_SM
    by_shared = ARCHS[arch]["shared_limit"] // shared if shared else CTAS_PER_SM
    return min(by_regs, by_shared, WARPS_PER_SM // warps, CTAS_PER_SM)


def weight_bytes(weight: str, N: int, K: int, elt: int, bs: int = BLOCKSIZE) -> int:
    if weight == "dense":
        return N * K * elt
    nb = N * K // bs
    scales = nb + 4 * -(-nb // 256) + 4 * 256 if weight.endswith("nested") else 4 * nb
    return N * K // 2 + scales


def gemm_bound(row: dict, M: int, N: int, K: int) -> dict | None:
    """The static first-order estimate (seconds) for this compiled GEMM variant at M x N x K."""
    if not row.get("compiled") or not row.get("main_loop_instructions"):
        return None
    hw, cfg = ARCHS[row["arch"]], row["config_dict"]
    Q, P = (K, N) if row["pass"] == "fwd" else (N, K)
    if "TILE_K" in cfg:  # the large Gluon kernel: an iteration is a tile over all of Q
        cfg = cfg | {"BLOCK_K": Q, "INNER_ITERS": Q // cfg["TILE_K"] - cfg.get("PEELED", 0)}
        row = row | {"config_dict": cfg}
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg.get("SPLIT_K", 1)
    split = -(-Q // cfg["KSPAN"]) if "KSPAN" in cfg else split  # the Gluon kernel's K slices
    occ = ctas_per_sm(row["registers"], row["shared_bytes"], row["num_warps"], row["arch"])
    if occ == 0:
        return None
    warps = row["num_warps"]
    iters = math.ceil(math.ceil(Q / split) / bk)
    ctas = math.ceil(M / bm) * math.ceil(P / bn) * split
    on_sm = math.ceil(ctas / hw["sms"])  # CTAs on the busiest SM
    persistent = "KSPAN" in cfg or "TILE_K" in cfg
    if persistent:  # the Gluon kernels: an iteration is a tile; the launcher's own schedule
        from peftkern.kernels import qlora_wgmma
        if row["kernel"] == "_qlora_wgmma_dx_kernel":
            iters, on_sm = qlora_wgmma.dx_tiles_per_sm(M, P, hw["sms"])
            ctas = qlora_wgmma.dx_programs(M, P, hw["sms"])
        elif "TILE_K" in cfg:
            iters, on_sm = qlora_wgmma.large_tiles_per_sm(M, P, hw["sms"])
            ctas = qlora_wgmma.large_programs(M, P, hw["sms"])
        else:
            iters, on_sm = qlora_wgmma.tiles_per_sm(P, Q, hw["sms"])
            ctas = qlora_wgmma.programs(P, Q, hw["sms"])
    resident = min(occ, on_sm)
    waves = math.ceil(on_sm / resident)
    # Co-resident CTAs share the SM's 4 schedulers and its tensor cores; a warp issues at most one
    # instruction per cycle, so fewer than 4 resident warps cannot use all 4 schedulers.
    issue = per_iteration(row, "instructions") * warps / min(4, resident * warps)
    mma = 2 * bm * bn * bk / hw["mma_flop"] if row["main_loop_mma"] else 0.0
    l1 = shared_cycles(row)
    # once per CTA: the code outside the main loop (staging before it, the epilogue after it),
    # each instruction once, its shared traffic as if conflict-free
    once = max(row.get("outside_loop_instructions", 0) * warps / min(4, resident * warps),
               row.get("outside_loop_shared_wavefronts", 0) * warps)
    if persistent:  # the busiest SM's tiles and programs, all resident at once
        compute = (max(issue, mma, l1) * iters + once * on_sm) * waves / hw["clock"]
    else:
        compute = (max(issue, mma, l1) * iters + once) * resident * waves / hw["clock"]
    elt = {"fp16": 2, "bf16": 2, "fp32": 4}[row["dtype"]]
    lelt = 4 if row.get("extra") == "lora-fp32" else elt
    lora = (M + P) * RANK * lelt
    # a workspace that does not stay in L2 (the large Gluon forward's fp32 [M, P] when not
    # FUSED) is written here and read back by the epilogue launch, which runs after: its time adds
    spilled = (row["kernel"] == "_qlora_wgmma_large_kernel" and M * P * 4 > L2_BYTES
               and not cfg.get("FUSED"))
    out_bytes = M * P * 4 if spilled else M * P * elt
    hbm = (M * Q * elt + weight_bytes(row["weight"], N, K, elt) + out_bytes + lora) / hw["hbm"]
    epilogue = (M * P * 4 + M * P * elt + lora) / hw["hbm"] if spilled else 0.0
    limiter = max((issue, "issue"), (mma, "mma"), (l1, "l1"))[1] if compute >= hbm else "hbm"
    return dict(issue_cycles_per_iter=issue, mma_cycles_per_iter=mma, l1_cycles_per_iter=l1,
                iterations=iters, once_cycles_per_cta=once, ctas=ctas, ctas_per_sm=occ, waves=waves, compute_s=compute,
                hbm_s=hbm, epilogue_s=epilogue, bound_s=max(compute, hbm) + epilogue,
                limiter=limiter)


# ---- the report ----------------------------------------------------------------------------------

def config_name(cfg: dict) -> str:
    s = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}/w{cfg['num_warps']}/s{cfg['num_stages']}"
    return (s + (f"/sk{cfg['SPLIT_K']}" if cfg.get("SPLIT_K", 1) > 1 else "")
            + ("/swap" if cfg.get("SWAP") else "") + ("/gluon" if cfg.get("GLUON") else ""))


def variant_rows(v: Variant, archs, cache_dir, memo, rule) -> list[dict]:
    launches = record(v, K=_recorded_k(v))
    cfg = config_of(v)
    rows = []
    for launch in launches:
        for arch in archs:
            if (launch.fn.is_gluon() or launch.fn.__name__ in HOPPER_ONLY) and arch < 90:
                continue  # Hopper's kernels (qlora_wgmma.hopper)
            a = analyze_launch(launch, arch, cache_dir, memo)
            rows.append(_row(v, launch, arch, cfg, rule, a))
    return rows


def _recorded_k(v: Variant) -> int:
    """K of the recorded call: N = K = 4096, or a variant's own ("K=... bs=...")."""
    return int(v.extra.split()[0][2:]) if v.extra.startswith("K=") else SHAPES[0][1]


def _row(v, launch, arch, cfg, rule, a) -> dict:
    limit = ARCHS[arch]["shared_limit"]
    row = dict(kernel=launch.fn.__name__, arch=f"sm_{arch}{'a' if arch == 90 else ''}",
               config=config_name(cfg) if cfg else _other_config(v, launch),
               dtype=v.dtype, regime=v.regime, weight=v.weight, **{"pass": v.pass_},
               M=v.M or None, extra=v.extra or None,
               **({"blocksize": v.blocksize} if v.kind == "gemm" else {}),
               rule=bool(cfg) and cfg == rule.get((v.regime, arch)), shared_limit=limit, **a)
    row["arch_num"] = arch
    row["launchable"] = (bool(a.get("compiled")) and a["shared_bytes"] <= limit
                         and not _excluded(v, arch))
    if cfg:
        row["config_dict"] = dict(cfg)
        if launch.fn.is_gluon():  # its own tiles: a loop iteration = STEPS sub-steps of SUB_K
            from peftkern.kernels import qlora_wgmma as G
            if launch.fn.__name__ == "_qlora_wgmma_large_kernel":  # a tile sums all of K
                K = _recorded_k(v)  # gemm_bound re-derives it per shape
                row["config_dict"].update(BLOCK_M=G.LARGE_M, BLOCK_N=G.ROWS_PER_CTA, BLOCK_K=K,
                                          TILE_K=G.SUB_K * G.STEPS, INNER_ITERS=K // (G.SUB_K * G.STEPS),
                                          num_warps=G.LARGE_WARPS,
                                          FUSED=bool(launch.kwargs["FUSED"]))  # else a workspace
            elif launch.fn.__name__ == "_qlora_wgmma_dx_kernel":  # a tile sums all of N
                N = SHAPES[0][0]
                # its last K-loop iteration is peeled (it stages the next tile): in the tile loop
                row["config_dict"].update(BLOCK_M=G.LARGE_M, BLOCK_N=G.DX_ROWS, BLOCK_K=N,
                                          TILE_K=2 * G.DX_SUB, PEELED=1,
                                          INNER_ITERS=N // (2 * G.DX_SUB) - 1, num_warps=4)
            else:
                row["config_dict"].update(BLOCK_N=G.ROWS_PER_CTA, BLOCK_K=G.KSPAN, KSPAN=G.KSPAN,
                                          INNER_ITERS=G.KSPAN // (G.SUB_K * G.STEPS), num_warps=4)
    return row


def _excluded(v: Variant, arch: int) -> bool:
    """A GEMM the dispatcher never picks on this arch: a candidate in lora_linear.EXCLUDED, or
    fp32 (cuBLAS runs fp32 on CUDA unless Triton is forced: ops.dispatch)."""
    from peftkern.kernels import lora_linear
    return v.kind == "gemm" and (v.dtype == "fp32" or v.index in lora_linear.EXCLUDED[arch][v.regime])


def _other_config(v, launch) -> str:
    k = launch.kwargs
    if v.kind == "quantize":
        return f"BLOCKSIZE={k['BLOCKSIZE']}"
    if v.kind == "dora":
        return f"{k['BLOCK_N']}x{k.get('BLOCK_K', k.get('BLOCK_M'))}x{k.get('BLOCK_R', '-')}"
    if v.kind == "grouped":
        return f"{k['BLOCK_M']}x{k.get('BLOCK_K', k.get('BLOCK_N'))}x{k['BLOCK_R']}"
    return f"BLOCK={k.get('BLOCK')}" + (f"/{v.extra}" if v.extra else "")


def add_model(rows: list[dict]) -> None:
    """instr_per_weight_elem, the 4096x4096 bound and bound_vs_dense on every GEMM row."""
    dense = {}
    for r in rows:
        if r["kernel"] in GEMMS and r.get("compiled"):
            _gemm_model(r)
            if r["weight"] == "dense":
                dense[_dense_key(r)] = r
    for r in rows:
        if r["kernel"] not in GEMMS or r["weight"] == "dense":
            continue
        d = dense.get(_dense_key(r))
        r["bound_vs_dense"] = None  # not launchable (no occupancy), or no dense row selected
        if r.get("bound") and d and d.get("bound"):
            r["bound_vs_dense"] = round(r["bound"]["bound_s"] / d["bound"]["bound_s"], 3)


def _dense_key(r):
    return (r["config"], r["dtype"], r["pass"], r["arch"], r["M"], r["extra"])


def _gemm_model(r):
    cfg = r["config_dict"]
    n = per_iteration(r, "instructions")
    r["instr_per_weight_elem"] = round(n * 32 * r["num_warps"] / (cfg["BLOCK_K"] * cfg["BLOCK_N"]), 3)
    r["bound"] = gemm_bound(r | {"arch": r["arch_num"]}, r["M"], *SHAPES[0])  # N = K = 4096


def shape_bounds(rows: list[dict]) -> list[dict]:
    """Per-shape bounds (bf16, r=16, the rule config and the Gluon kernel) for N x K in SHAPES
    and M = 1, 16, 8192."""
    out = []
    has_m1 = any(r["M"] == 1 for r in rows)
    for r in rows:
        if not (r["kernel"] in GEMMS and (r["rule"] or r["kernel"] in CONFLICT_FREE)
                and r["dtype"] == "bf16"
                and r["extra"] is None and r.get("compiled") and not r["weight"].startswith("fp4")):
            continue
        for M in ((1, 16) if r["regime"] == "small" else (8192,)):
            if M == 16 and r["M"] == 1 or M == 1 and r["M"] == 16 and has_m1:
                continue  # M = 1 is its own specialization: its own compile where selected
            for N, K in SHAPES:
                b = gemm_bound(r | {"arch": r["arch_num"]}, M, N, K)
                out.append(dict(kernel=r["kernel"], arch=r["arch"], weight=r["weight"],
                                **{"pass": r["pass"]},
                                M=M, N=N, K=K, config=r["config"], compiled_M=r["M"],
                                launchable=r["launchable"],
                                **(b or {"bound_s": None})))
    _ratio_to_dense(out)
    return out


def _ratio_to_dense(out):
    """Against the rule config's dense variant (the Gluon kernel has no dense one)."""
    key = lambda b: (b["arch"], b["pass"], b["M"], b["N"], b["K"])  # noqa: E731
    dense = {key(b): b for b in out if b["weight"] == "dense" and b["kernel"] not in CONFLICT_FREE
             and "/gluon" not in b["config"]}
    for b in out:
        d = dense.get(key(b))
        if b["bound_s"] and d and d["bound_s"]:
            b["bound_vs_dense"] = round(b["bound_s"] / d["bound_s"], 3)


# ---- output --------------------------------------------------------------------------------------

MODEL_MD = __doc__[__doc__.index("First-order bound model"):__doc__.index("The compile itself")]


def write_report(rows, bounds, specs, meta, out_dir, stem):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "shape_bounds": bounds, "specializations": specs},
                  f, separators=(",", ":"))
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(markdown(rows, bounds, meta))


COLUMNS = ("kernel", "arch", "config", "rule", "dtype", "regime", "M", "weight", "pass", "extra",
           "compiled", "launchable", "shared_bytes", "shared_limit", "registers", "spill_bytes",
           "local_bytes", "main_loop_instructions", "main_loop_mma", "main_loop_div64",
           "main_loop_calls", "instr_per_weight_elem", "bound_vs_dense")


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def markdown(rows, bounds, meta) -> str:
    lines = [f"# Static GPU check of the Triton kernels ({meta['stem']})", "",
             f"Generated by `python -m peftkern.bench.static {' '.join(meta['argv'])}` "
             f"(Triton {meta['triton']}; {meta['n_compiled']} distinct compiles, "
             f"{meta['compile_s_total']} s of compile + analysis when cold; this run "
             f"{meta['wall_s']} s, {meta['n_from_cache']} analyses from the cache). "
             "All times and bounds below are STATIC ESTIMATES from compiled code, not "
             "measurements.", "", "## Model", "", MODEL_MD.strip(), "", *meta["notes"], ""]
    lines += _summary_md(rows) + _bounds_md(bounds) + _mix_md(rows)
    lines += ["", "## Every compiled variant", "", "| " + " | ".join(COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


SUMMARY = ("kernel", "arch", "config", "dtype", "M", "weight", "pass", "launchable", "shared_bytes",
           "shared_limit", "registers", "spill_bytes", "local_bytes", "main_loop_instructions",
           "main_loop_mma", "main_loop_div64", "main_loop_div64_calls", "instr_per_weight_elem",
           "bound_vs_dense")


def _summary_md(rows) -> list[str]:
    """The default (rule) configs, no epilogue extras; bound_vs_dense at N = K = 4096."""
    out = ["## Default configs: findings (static)", "", "| " + " | ".join(SUMMARY) + " |",
           "|" + "---|" * len(SUMMARY)]
    for r in rows:
        if (r["kernel"] == "_lora_matmul_kernel" and r["rule"] or r["kernel"] in CONFLICT_FREE) \
                and r["extra"] is None and not r["weight"].startswith("fp4"):
            out.append("| " + " | ".join(_cell(r.get(c)) for c in SUMMARY) + " |")
    return out + [""]


def _bounds_md(bounds) -> list[str]:
    head = ("kernel", "arch", "weight", "pass", "M", "N", "K", "config", "compiled_M",
            "launchable",
            "ctas_per_sm", "waves",
            "issue_cycles_per_iter", "mma_cycles_per_iter", "l1_cycles_per_iter", "compute_s",
            "hbm_s", "epilogue_s", "bound_s",
            "limiter", "bound_vs_dense")
    out = ["## Per-shape bounds (static estimate; bf16, r=16, rule config and Gluon kernel)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in bounds:
        out.append("| " + " | ".join(_fmt(b.get(h)) for h in head) + " |")
    return out + [""]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if v < 1e-2 or v >= 1e3 or v == 0 else f"{v:.4g}"
    return _cell(v)


def _mix_md(rows) -> list[str]:
    cats = [c for c, _ in CATEGORIES] + ["uniform", "other"]
    out = ["## Main-loop instruction mix per iteration (rule configs, static SASS counts)", "",
           "| kernel | arch | config | dtype | weight | pass | M | instr | " + " | ".join(cats)
           + " | memory instructions (widths) |", "|" + "---|" * (9 + len(cats))]
    for r in rows:
        if (r.get("rule") or r["kernel"] in CONFLICT_FREE) and r.get("compiled") \
                and r.get("extra") is None \
                and "main_loop_mix" in r:  # fp4 rows sharing nf4's code are left out
            mix = r["main_loop_mix"]
            out.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {r['dtype']} | "
                       f"{r['weight']} | {r['pass']} | {r['M']} | {r['main_loop_instructions']} | "
                       + " | ".join(str(mix["categories"].get(c, 0)) for c in cats)
                       + " | " + ", ".join(f"{k}:{v}" for k, v in mix["widths"].items()) + " |")
    return out


# ---- command line --------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m peftkern.bench.static", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=OUT_DEFAULT, help="output folder (default %(default)s)")
    p.add_argument("--stem", default="static", help="file names: STEM.json, STEM.md")
    p.add_argument("--quick", action="store_true",
                   help="the dispatcher's default subset: rule configs + one small (split-K) and one "
                        "large candidate; dense and nf4-nested; bf16 and fp32; quantize/dequantize")
    p.add_argument("--arch", default="80,90", help="comma-separated: 80 (sm_80), 90 (sm_90a)")
    p.add_argument("--configs", choices=("rule", "quick", "all"),
                   help="override the config set (rule: the rule configs and the GLUON candidate)")
    p.add_argument("--dtypes", help=f"comma-separated subset of {','.join(DTYPES)}")
    p.add_argument("--weights", help=f"comma-separated subset of {','.join(WEIGHTS)}")
    p.add_argument("--kernels", default="gemm,quant,adalora,dora,grouped",
                   help="gemm, quant, adalora, dora (the DoRA weight norm), grouped (the "
                        "mixed-adapter shrink / expand)")
    p.add_argument("--no-cache", action="store_true", help="recompile everything")
    p.add_argument("--cache-dir", default=CACHE_DEFAULT)
    return p.parse_args(argv)


def selection(args):
    quick = args.quick
    configs = args.configs or ("quick" if quick else "all")
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else (QUICK_DTYPES if quick else DTYPES)
    weights = tuple(args.weights.split(",")) if args.weights else (
        QUICK_WEIGHTS if quick else WEIGHTS)
    kinds = tuple(args.kernels.split(","))
    variants = gemm_variants(configs, weights, dtypes, extras=not quick,
                             fp16_rule_only=not (quick or args.dtypes)) if "gemm" in kinds else []
    return variants + other_variants(kinds, quick)


def notes(rows) -> list[str]:
    out = ["Notes:", "",
           "- N x K only enters the compiled code through `% 16` / `== 1` specialization; 4096 and "
           "14336 specialize alike, so each variant is compiled once (recorded at N = K = 4096) "
           "and the shapes enter the bound model only.",
           "- Small-M variants are compiled at M = 16; M = 1 (a constexpr under Triton's `== 1` "
           "rule) is compiled for the small rule config when the full set is selected.",
           "- fp16 (full set): the rule configs only; every candidate is compiled in bf16 and "
           "fp32 (fp16 differs from bf16 in the MMA and conversion types alone).",
           "- Reduced epilogue set: bias (forward), dropout mask (dX) and fp32 adapters "
           "(LORA_IEEE) only for the rule configs, dense and nf4-nested, bf16.",
           f"- 4-bit blocksize {BLOCKSIZE} (an int argument: every bnb blocksize >= 16 specializes "
           "the same way, as % 16); the quantize kernel's BLOCKSIZE is a constexpr, so each "
           "blocksize is compiled."]
    same = _identical(rows)
    if same is not None:
        out.append(f"- fp4 vs nf4 in the GEMM and dequantize: {same} (the code table is a "
                   "runtime pointer, so fp4 only changes the quantize kernel's IS_FP4).")
    return out + ["- ptxas -v gives spills; cuobjdump -res-usage gives REG/STACK/LOCAL; "
                  "local_bytes = STACK + LOCAL."]


def _identical(rows):
    """fp4 vs nf4: how many (kernel, arch, config, dtype, pass, ...) pairs share a compile key."""
    pairs = {}
    for r in rows:
        if r["kernel"] != "_quantize_4bit_kernel" and r["weight"][:3] in ("fp4", "nf4"):
            k = (r["kernel"], r["arch"], r["config"], r["dtype"], r["pass"], r["M"], r["extra"],
                 r["weight"][3:])
            pairs.setdefault(k, {})[r["weight"][:3]] = r.get("compile_key")
    both = [p for p in pairs.values() if len(p) == 2]
    if not both:
        return None
    same = sum(p["fp4"] == p["nf4"] for p in both)
    return f"identical compiled code (same specialization key) in {same} of {len(both)} pairs"


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFTKERN_NAN_FILL")}
    env["PYTHONWARNINGS"] = "ignore::UserWarning"
    return env


def run_subprocess(argv, timeout=None) -> subprocess.CompletedProcess:
    """Run this command in a clean environment (no TRITON_INTERPRET), as the tests do."""
    return subprocess.run([sys.executable, "-m", "peftkern.bench.static", *argv], env=_clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def run(args) -> dict:
    from peftkern.kernels import common
    from triton import knobs
    if common.INTERPRET:
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1: run in a clean env")
    t0 = time.perf_counter()
    archs = [int(a) for a in args.arch.split(",")]
    rule = rule_configs()
    memo, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        knobs.cache.dir = tmp  # Triton's cache: cold, so ptxas runs and its log is read
        for v in selection(args):
            rows += variant_rows(v, archs, None if args.no_cache else args.cache_dir, memo, rule)
    add_model(rows)
    specs = {r["compile_key"]: {k: r.pop(k) for k in ("signature", "constexprs") if k in r}
             for r in rows if "compile_key" in r}
    meta = dict(stem=args.stem, argv=sys.argv[1:], triton=_triton_version(), archs=args.arch,
                n_rows=len(rows), n_compiled=len(memo), wall_s=round(time.perf_counter() - t0, 1),
                n_from_cache=sum(bool(a.get("from_cache")) for a in memo.values()),
                compile_s_total=round(sum(a.get("compile_s", 0) for a in memo.values()), 1),
                hardware=ARCHS, notes=notes(rows))
    bounds = shape_bounds(rows)
    compact(rows, bounds)
    write_report(rows, bounds, specs, meta, args.out, args.stem)
    return {"meta": meta, "rows": rows, "shape_bounds": bounds, "specializations": specs}


def compact(rows, bounds) -> None:
    """Keep the JSON small: 4 significant digits; fp4 rows that share nf4's compiled code keep
    their figures but not the instruction mix."""
    nf4 = {r["compile_key"] for r in rows if r["weight"].startswith("nf4") and "compile_key" in r}
    for r in rows:
        r.pop("from_cache", None)
        if r["weight"].startswith("fp4") and r.get("compile_key") in nf4:
            r.pop("main_loop_mix", None)
            r["same_code_as_nf4"] = True
        if r.get("bound"):
            r["bound"] = {k: _round(v) for k, v in r["bound"].items()}
    for b in bounds:
        b.update((k, _round(v)) for k, v in list(b.items()))


def _round(v):
    return float(f"{v:.4g}") if isinstance(v, float) else v


def _triton_version():
    import triton
    return triton.__version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") or os.environ.get("PEFTKERN_NAN_FILL"):
        proc = subprocess.run([sys.executable, "-m", "peftkern.bench.static", *argv],
                              env=_clean_env())
        return proc.returncode
    report = run(args)
    failed = [r for r in report["rows"] if not r.get("compiled")]
    print(f"{len(report['rows'])} rows, {report['meta']['n_compiled']} compiles, "
          f"{len(failed)} failed, {report['meta']['wall_s']} s -> "
          f"{os.path.join(args.out, args.stem)}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
