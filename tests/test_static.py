"""Static GPU check of the Triton kernels (`python -m peftkern.bench.static`), no GPU needed.

The kernels are compiled for sm_80 and sm_90a in a subprocess without TRITON_INTERPRET (this
suite's conftest sets it). Checks: every kernel compiles; the default (rule) configs fit the
arch's shared memory (and `launchable` says so for every config); no spills or stack; a 16-bit
GEMM main loop runs on tensor cores (HGMMA on sm_90a where BLOCK_M >= 64, the wgmma minimum, HMMA
otherwise); no 64-bit integer division in a main loop.

The fast part (rule configs and the Gluon candidate, bf16, dense and nf4-nested,
quantize/dequantize/AdaLoRA, DoRA, grouped) runs ~95 compiles (~2 min cold on 2 cores; analyses
are cached by kernel source hash in ~/.cache/peftkern/static, so reruns take ~10 s); the rest of
the `--quick` set (fp32, a split-K and a second large candidate: ~70 more compiles, ~5-9 min
cold) is marked slow and runs with PEFTKERN_STATIC_SLOW=1.

KNOWN lists the (subset, weight, dtype, pass, check) combinations that fail on today's kernels,
with the static numbers: they are strict xfails, so a fix turns them into XPASS failures, and
the entry is then removed.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from peftkern.bench import static

FAST_ARGS = ["--quick", "--configs", "rule", "--dtypes", "bf16"]
SLOW_ARGS = ["--quick"]

# Static numbers of what still fails (benchmarks/results/static/static_after.md). The shared
# memory, 64-bit division and bf16 spill failures of the old per-element decoder are gone; fp32
# GEMMs (IEEE FFMA, 32-56 registers and KBs of spills) are not launchable: cuBLAS runs fp32 on
# CUDA (ops.dispatch) unless Triton is forced.
KNOWN: dict = {}
# The quick set beyond the fast part costs ~4.5 min of cold compiles on 2 cores: it runs when
# PEFTKERN_STATIC_SLOW=1 (before a release, or after a kernel change), not in the default suite.
RUN_SLOW = os.environ.get("PEFTKERN_STATIC_SLOW") == "1"


def _report(tmp_path_factory, name, argv):
    out = tmp_path_factory.mktemp(name)
    proc = static.run_subprocess(["--out", str(out), "--stem", name, *argv], timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / f"{name}.json") as f:
        report = json.load(f)
    report["markdown"] = (out / f"{name}.md").read_text()
    return report


@pytest.fixture(scope="module")
def fast_report(tmp_path_factory):
    return _report(tmp_path_factory, "fast", FAST_ARGS)


@pytest.fixture(scope="module")
def slow_report(tmp_path_factory):
    return _report(tmp_path_factory, "slow", SLOW_ARGS)


# ---- the checks: each returns what is wrong with a row, or None ----------------------------------

def _compiled(r):
    return None if r["compiled"] else f"does not compile: {r.get('error')}"


def _shared(r):
    if not r["compiled"]:
        return None
    fits = r["shared_bytes"] <= r["shared_limit"]
    if r["launchable"] and not fits:
        return f"launchable but shared {r['shared_bytes']} > {r['shared_limit']}"
    if r["rule"] and not fits:
        return f"default config needs {r['shared_bytes']} B shared > {r['shared_limit']}"
    return None


def _local(r):  # configs the dispatcher never picks on an arch (EXCLUDED) are not checked
    if r["compiled"] and r["launchable"] and (r["spill_bytes"] or r["local_bytes"]):
        return f"spills {r['spill_bytes']} B, local/stack {r['local_bytes']} B"
    return None


def _mma(r):
    if not r["compiled"] or r["kernel"] not in static.GEMMS or r["dtype"] == "fp32":
        return None
    wgmma = r["arch"] == "sm_90a" and (r["config_dict"]["BLOCK_M"] >= 64
                                       or r["kernel"] in static.CONFLICT_FREE)
    name = "HGMMA" if wgmma else "HMMA"
    count = r["main_loop_hgmma"] if wgmma else r["main_loop_hmma"] + r["main_loop_hgmma"]
    return None if count else f"no {name} in the main loop ({r['main_loop_instructions']} instr)"


def _div64(r):
    if r["compiled"] and (r["main_loop_div64"] or r["main_loop_div64_calls"]):
        return (f"{r['main_loop_div64']} div/rem.s64 in the PTX loop, "
                f"{r['main_loop_div64_calls']} CALLs to a 64-bit division routine")
    return None


CHECKS = {"compiled": _compiled, "shared": _shared, "local": _local, "mma": _mma, "div64": _div64}


def _failures(rows, check):
    bad = []
    for r in rows:
        why = CHECKS[check](r)
        if why:
            bad.append(f"{r['kernel']} {r['arch']} {r['config']} {r['dtype']} {r['weight']} "
                       f"{r['pass']} M={r['M']}: {why}")
    return bad


def _gemm_params(subset, dtypes):
    for w in static.QUICK_WEIGHTS:
        for dt in dtypes:
            for p in static.PASSES:
                for check in CHECKS:
                    if check == "mma" and dt == "fp32":
                        continue  # fp32 is IEEE: FFMA, no tensor cores
                    marks = [pytest.mark.slow, pytest.mark.skipif(
                        not RUN_SLOW, reason="set PEFTKERN_STATIC_SLOW=1")] if subset == "slow" else []
                    reason = KNOWN.get((subset, w, dt, p, check))
                    if reason:
                        marks.append(pytest.mark.xfail(strict=True, reason=reason))
                    yield pytest.param(w, dt, p, check, marks=marks, id=f"{w}-{dt}-{p}-{check}")


def _gemm_rows(report, weight, dtype, pass_):
    return [r for r in report["rows"] if r["kernel"] in static.GEMMS + (
            "_split_k_epilogue_kernel",) and (r["weight"], r["dtype"], r["pass"]) ==
            (weight, dtype, pass_)]


@pytest.mark.parametrize("weight,dtype,pass_,check", list(_gemm_params("fast", ("bf16",))))
def test_gemm_fast(fast_report, weight, dtype, pass_, check):
    rows = _gemm_rows(fast_report, weight, dtype, pass_)
    assert rows and {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    bad = _failures(rows, check)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("weight,dtype,pass_,check",
                         list(_gemm_params("slow", static.QUICK_DTYPES)))
def test_gemm_quick_set(slow_report, weight, dtype, pass_, check):
    rows = _gemm_rows(slow_report, weight, dtype, pass_)
    cands, quick = static._candidates(), static.quick_indices(static._candidates())
    # the rule configs of both arches, a split-K small one and one more large one
    assert {r["config"] for r in rows} == {static.config_name(cands[g][i])
                                           for g, idx in quick.items() for i in idx}
    bad = _failures(rows, check)
    assert not bad, "\n".join(bad)


def test_4bit_decode_costs_at_most_six_instructions_per_weight_element(fast_report):
    """Issue 13's bar for the default tiles on sm_90a (bf16): the 4-bit forward and dX main
    loops issue at most 6 thread-instructions per decoded weight element."""
    rows = [r for r in fast_report["rows"] if r["kernel"] == "_lora_matmul_kernel" and r["rule"]
            and r["arch"] == "sm_90a" and r["weight"] != "dense" and r["extra"] is None]
    assert {(r["regime"], r["pass"]) for r in rows} == {(g, p) for g in ("small", "large")
                                                        for p in ("fwd", "dx")}
    over = [f"{r['config']} {r['pass']} M={r['M']}: {r['instr_per_weight_elem']}" for r in rows
            if r["instr_per_weight_elem"] > 6]
    assert not over, over


def test_gluon_forward_is_memory_bound_at_small_m(fast_report):
    """Issue 13's small-M bar, met by kernels/qlora_wgmma.py (sm_90a, bf16, NF4 + double quant):
    the estimated issue and shared-pipe time, staging included, is at most the time to read the
    bytes at HBM bandwidth at M = 1 and 16, 4096x4096 and 14336x4096. Its decoded values reach
    wgmma's register operand without shared memory (no STS / STSM / LDSM in the K loop; HGMMA
    with A in registers), its lookups are one LDS per byte, at most 6 instructions per weight
    element, no spills, the occupancy its launcher assumes (RESIDENT), and the only contracted
    FMAs are the accumulator's (the scale decode rounds twice, as bnb)."""
    from peftkern.kernels import qlora_wgmma as G
    rows = [r for r in fast_report["rows"] if r["kernel"] == "_qlora_wgmma_kernel"]
    assert [(r["arch"], r["weight"], r["pass"]) for r in rows] == [("sm_90a", "nf4-nested", "fwd")]
    r = rows[0]
    assert r["launchable"] and not r["spill_bytes"] and not r["local_bytes"]
    assert static.ctas_per_sm(r["registers"], r["shared_bytes"], 4, 90) >= G.RESIDENT
    assert r["instr_per_weight_elem"] <= 6
    inner = r["inner_loop_mix"]
    assert not any(op.startswith(("STS", "LDSM", "STSM", "LDGSTS")) for op in inner["widths"])
    assert inner["categories"]["mma"] == 8 * G.STEPS  # 2 m64 tiles x 4 k16 per sub-step
    assert r["inner_loop_wgmma_shared_bytes"] == 8 * G.STEPS * 16 * 16 * 2  # B only: A in regs
    assert inner["widths"] == {"LDG.E.64": 4 * G.STEPS, "LDS": (32 + 4) * G.STEPS}
    assert r["ptx_fma_f32"] == 16 * G.STEPS
    bounds = [b for b in fast_report["shape_bounds"] if b["kernel"] == "_qlora_wgmma_kernel"]
    assert {(b["M"], b["N"], b["K"]) for b in bounds} == {(M, N, K) for M in (1, 16)
                                                         for N, K in static.SHAPES}
    over = [f"M={b['M']} {b['N']}x{b['K']}: {b['compute_s']:.3g} s > {b['hbm_s']:.3g} s"
            for b in bounds if b["compute_s"] > b["hbm_s"]]
    assert not over, over


def test_gluon_forward_meets_the_large_m_bound(fast_report):
    """Issue 13's large-M bar, met by `_qlora_wgmma_large_kernel` (sm_90a, bf16, NF4 + double
    quant, its epilogue in the kernel): its estimated bound at M = 8192, 4096x4096 and
    14336x4096 is at most 1.15x the dense tile's (the rule config, compiled and estimated the
    same way); at most 6 instructions per weight element (a tile's: its K loop and the
    once-per-tile code); the decoded values reach wgmma's register operand (B only from shared
    memory), no spills, the occupancy its launcher assumes; its workspace path (DoRA's scale),
    other blocksizes and K compile without spills too."""
    from peftkern.kernels import qlora_wgmma as G
    rows = [r for r in fast_report["rows"] if r["kernel"] == "_qlora_wgmma_large_kernel"]
    assert {(r["extra"], r["config_dict"]["FUSED"]) for r in rows} == {
        (None, True), ("scale", False)} | {(f"K={k} bs={bs}", True) for k, bs in static.LARGE_EXTRA}
    # (the launcher takes every multiple of 64 as blocksize)
    others = [r for r in rows if r["extra"]]
    assert all(G.supported(G.LARGE_M, k, bs, torch.bfloat16) for k, bs in static.LARGE_EXTRA)
    bad = [f"{r['extra']} bs={r['blocksize']}: {r['spill_bytes']} B spilled" for r in others
           if not r["launchable"] or r["spill_bytes"] or r["local_bytes"]]
    assert not bad, bad
    rows = [r for r in rows if not r["extra"]]
    assert [(r["arch"], r["weight"], r["pass"]) for r in rows] == [("sm_90a", "nf4-nested", "fwd")]
    r = rows[0]
    assert r["launchable"] and not r["spill_bytes"] and not r["local_bytes"]
    assert static.ctas_per_sm(r["registers"], r["shared_bytes"], G.LARGE_WARPS, 90) >= G.LARGE_RESIDENT
    assert r["instr_per_weight_elem"] <= 6
    _assert_register_a(r, 4 * G.STEPS)  # m64n128k16: 4 per sub-step
    bounds = _large_m_bounds(fast_report, "_qlora_wgmma_large_kernel")
    assert not any(b["epilogue_s"] for b in bounds)  # no workspace: the epilogue is in it


def _assert_register_a(r, mma):
    """The K loop's `mma` m64n128k16 take A from registers: only B (LARGE_M x rows x 16) from
    shared memory, and no ldmatrix / stmatrix trip of a decoded tile."""
    from peftkern.kernels import qlora_wgmma as G
    inner = r["inner_loop_mix"]
    assert inner["categories"]["mma"] == mma
    assert r["inner_loop_wgmma_shared_bytes"] == mma * G.LARGE_M * 16 * 2
    assert not any(op.startswith(("LDSM", "STSM")) for op in inner["widths"])


def _large_m_bounds(report, kernel):
    """The kernel's bounds at M = 8192 for every shape, each at most 1.15x the dense tile's."""
    bounds = [b for b in report["shape_bounds"] if b["kernel"] == kernel]
    assert {(b["M"], b["N"], b["K"]) for b in bounds} == {(8192, N, K) for N, K in static.SHAPES}
    over = [f"{b['N']}x{b['K']}: {b['bound_vs_dense']}" for b in bounds
            if not b["bound_vs_dense"] or b["bound_vs_dense"] > 1.15]
    assert not over, over
    return bounds


def test_gluon_dx_meets_the_large_m_bound(fast_report):
    """Issue 13's large-M bar for dX, met by `_qlora_wgmma_dx_kernel` (sm_90a, bf16, NF4 +
    double quant, its epilogue with and without a dropout mask): at most 6 instructions per
    weight element (a tile's: its K loop, its staging and its epilogue), no 64-bit division, no
    spills, two programs per SM, the decoded values as wgmma's register operand (only dY from
    shared memory), and an estimated bound at M = 8192, 4096x4096 and 14336x4096 at most 1.15x
    the dense tile's (the rule config, compiled and estimated the same way)."""
    from peftkern.kernels import qlora_wgmma as G
    rows = [r for r in fast_report["rows"] if r["kernel"] == "_qlora_wgmma_dx_kernel"]
    assert sorted((r["arch"], r["weight"], r["pass"], r["extra"] or "") for r in rows) == [
        ("sm_90a", "nf4-nested", "dx", ""), ("sm_90a", "nf4-nested", "dx", "mask")]
    for r in rows:
        assert r["launchable"] and not r["spill_bytes"] and not r["local_bytes"], r["extra"]
        assert static.ctas_per_sm(r["registers"], r["shared_bytes"], 4, 90) >= G.DX_RESIDENT
        assert r["main_loop_div64"] == 0
    r = next(r for r in rows if not r["extra"])
    assert r["instr_per_weight_elem"] <= 6
    _assert_register_a(r, 8)  # m64n128k16: 4 per 64-row sub-step
    _large_m_bounds(fast_report, "_qlora_wgmma_dx_kernel")


def test_rule_configs_are_candidates_the_dispatcher_may_pick():
    from peftkern.kernels import lora_linear as L
    for regime, by_arch in L.RULE.items():
        for arch, i in by_arch.items():
            assert i not in L.EXCLUDED[arch][regime]
            assert L.CANDIDATES[regime][i] in L.candidates(regime, (arch // 10, 0))


OTHER_KERNELS = ("_quantize_4bit_kernel", "_dequantize_4bit_kernel", "_ipt_kernel", "_dora_norm_kernel",
                 "_shrink_kernel", "_expand_kernel", "_column_dot_kernel", "_block_scales_t_kernel")


@pytest.mark.parametrize("check", ["compiled", "shared", "local", "div64"])
@pytest.mark.parametrize("kernel", OTHER_KERNELS)
def test_other_kernels(fast_report, kernel, check):
    rows = [r for r in fast_report["rows"] if r["kernel"] == kernel]
    archs = {"sm_90a"} if kernel in static.HOPPER_ONLY else {"sm_80", "sm_90a"}
    assert rows and {r["arch"] for r in rows} == archs
    bad = _failures(rows, check) + [f"{r['config']} {r['arch']}: not launchable" for r in rows
                                    if check == "shared" and not r["launchable"]]
    assert not bad, "\n".join(bad)


REQUIRED = ("kernel", "arch", "config", "dtype", "regime", "weight", "pass", "launchable",
            "compiled", "shared_bytes", "shared_limit", "registers", "spill_bytes", "local_bytes",
            "main_loop_mma", "main_loop_div64", "main_loop_instructions", "main_loop_mix")


def test_report_keys(fast_report):
    rows = fast_report["rows"]
    missing = {k for r in rows for k in REQUIRED if k not in r}
    assert not missing
    gemm4 = [r for r in rows if r["kernel"] == "_lora_matmul_kernel" and r["weight"] != "dense"]
    assert gemm4 and all("instr_per_weight_elem" in r and "bound_vs_dense" in r for r in gemm4)
    assert {r["shared_limit"] for r in rows} == {166912, 232448}
    mix = rows[0]["main_loop_mix"]["categories"]
    assert mix.get("mma") and "int_alu" in mix
    shapes = {(b["M"], b["N"], b["K"]) for b in fast_report["shape_bounds"]}
    assert shapes == {(M, N, K) for M in (1, 16, 8192) for N, K in static.SHAPES}
    assert "STATIC ESTIMATE" in fast_report["markdown"]
    assert fast_report["specializations"]


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/              @!P0 CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0040*/              @P1 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
$__internal_0_$__cuda_sm20_div_s64:
        /*0060*/                   IMAD R0, R1, R2, RZ ;
        /*0070*/                   RET.REL.NODEC R2 `(_k) ;
"""
PTX = """
$L__BB0_1:
\tdiv.s64 \t%rd5, %rd4, %rd3;
\t@%p1 bra \t$L__BB0_1;
\trem.u64 \t%rd6, %rd4, %rd3;
"""


def test_sass_and_ptx_parsing():
    instrs = static.parse_sass(SASS)
    body = static.sass_main_loop(instrs)
    assert [a for a, _, _ in body] == [0x10, 0x20, 0x30, 0x40]
    mix = static.instruction_mix(body)
    assert mix["categories"] == {"branch": 1, "call": 1, "global_load": 1, "mma": 1}
    assert mix["widths"] == {"LDG.E.128": 1}
    assert sum(bool(static.DIV64_ROUTINE.search(r)) for _, op, r in body if op == "CALL.REL.NOINC")
    assert static.ptx_loop_div64(PTX) == (1, 2)


def test_shared_pipe_model():
    """Wavefronts per warp access, wgmma's shared operand bytes, and the lookup-conflict model
    (the constants the model's description quotes)."""
    body = static.parse_sass("""
.L_x_1:
        /*0000*/                   LDS R4, [R2] ;
        /*0010*/                   LDS.64 R4, [R2+0x8] ;
        /*0020*/                   STS.128 [R3], R8 ;
        /*0030*/                   LDSM.16.M88.4 R12, [R5] ;
        /*0038*/                   LDSM.16.MT88 R12, [R5] ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR4][R8.64] ;
        /*0050*/                   HGMMA.64x16x16.F32.BF16 R24, R32, gdesc[UR20], R24 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0070*/              @P1 BRA `(.L_x_1) ;
""")
    t = static.shared_traffic(static.sass_main_loop(body))
    assert t["main_loop_shared_wavefronts"] == 1 + 2 + 4 + 4 + 1 + 4
    assert t["main_loop_wgmma_shared_bytes"] == 16 * 16 * 2 + (16 * 128 * 2 + 64 * 16 * 2)
    assert static.gather_wavefronts(16, 4) == 1.0  # 16 words in 16 banks: never a conflict
    assert round(static.gather_wavefronts(256, 4), 2) == 3.15
    assert round(static.gather_wavefronts(256, 8), 2) == 5.82
    assert "3.15" in static.MODEL_MD and "5.82" in static.MODEL_MD


def test_bound_model_occupancy():
    # 154 regs x 8 warps: 40960 regs per CTA -> 1 CTA; 98304 B shared -> 2; 64 warps -> 8
    assert static.ctas_per_sm(154, 98304, 8, 90) == 1
    assert static.ctas_per_sm(64, 40960, 4, 90) == 5  # shared: 232448 // 40960
    assert static.ctas_per_sm(64, 262144, 8, 90) == 0  # over the limit: not launchable
    nb = 4096 * 4096 // 64
    assert static.weight_bytes("nf4", 4096, 4096, 2) == 4096 * 2048 + 4 * nb
    assert static.weight_bytes("nf4-nested", 4096, 4096, 2) == 4096 * 2048 + nb + 4 * nb // 256 + 1024


def test_rounding_matches_bitsandbytes_on_gpus(fast_report):
    """Quantize divides with IEEE division (Triton's `/` is an approximate div.full.f32 on GPUs)
    and the 4-bit kernels contract no FMA (`code8[q] * absmax2 + offset` rounds twice, as bnb)."""
    rows = [r for r in fast_report["rows"] if r.get("compiled")]
    quant = [r for r in rows if r["kernel"] == "_quantize_4bit_kernel"]
    four_bit = [r for r in rows if r["kernel"] == "_dequantize_4bit_kernel"
                or (r["kernel"] == "_lora_matmul_kernel" and r["weight"] != "dense")]
    assert quant and four_bit
    assert [r["config"] for r in quant if r["ptx_div_approx"]] == []
    assert [(r["config"], r["pass"], r["arch"]) for r in four_bit if r["ptx_fma_f32"]] == []
