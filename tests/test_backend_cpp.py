"""The C++ CPU backend (peftkern/ops/backends/cpp.py over csrc/cpu): the fused 4-bit decode GEMV
(every SIMD level) and the dequantized-panel path, against the float64 reference."""
import pytest
import torch

import peftkern
from peftkern import ops
from peftkern import reference as R

from helpers import assert_error_rule


# ---- the C++ CPU decode GEMV (csrc/cpu/qlora_gemv.cpp) ----------------------------------------------

HAS_CPP = "cpp" in ops.available(torch.device("cpu"))


def quantized(W, *args):
    """A 4-bit weight and its exact fp32 dequantization, made by the torch reference (under the
    interpreter the default backend is interpreted Triton: slow, and not what is tested here)."""
    with ops.use_backend("reference"):
        q = peftkern.quantize_4bit(W, *args)
        return q, peftkern.dequantize_4bit(q, torch.float32)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("simd", [3, 2, 1, 0], ids=["best", "avx512", "avx2", "scalar"])
@pytest.mark.parametrize("M, N, K, blocksize, qt, dq, bias", [
    (1, 33, 64, 64, "nf4", True, True), (7, 45, 256, 32, "fp4", False, False),
    (16, 70, 1024, 64, "nf4", True, True), (9, 5, 128, 128, "fp4", True, False),
    (0, 8, 64, 64, "nf4", False, True), (12, 17, 4096, 4096, "nf4", False, True),
    # From M=5 on both ISAs decode 4 rows x 256 codes into L1: a partial chunk and row tail
    # (K=320, N=6), a chunk shorter than 256 (K=96), and every x-row tail of AVX2's 3-row tiles
    # (M=13: 3+3+3+3+1, M=5: 3+2) and AVX-512's 6-row tiles (13: 6+6+1, 5, 16: 6+6+4, 9: 6+3,
    # 14: 6+6+2)
    (13, 6, 320, 32, "nf4", True, False), (5, 9, 96, 32, "fp4", False, True),
    (14, 6, 320, 32, "fp4", True, True)])
def test_cpu_decode_gemv_follows_error_rule(simd, M, N, K, blocksize, qt, dq, bias, gen):
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    q, Wd = quantized(W, qt, blocksize, dq)
    x = torch.randn(M, K, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    A, B = torch.randn(8, K, generator=gen) / K ** 0.5, torch.randn(N, 8, generator=gen) / 8 ** 0.5
    want = R.lora_linear(x.double(), Wd.double(), None if b is None else b.double(), A.double(), B.double(), 0.5)
    base = R.lora_linear(x, Wd, b, A, B, 0.5)
    got = ops.backends.ext.EXT.qlora_gemv(x, q.data.view(-1), q.absmax, q.absmax2, q.code8,
                                      None if q.offset is None else q.offset.reshape(1),
                                      0 if qt == "nf4" else 1, blocksize, N, b, x @ A.t(), B, 0.5, simd)
    assert_error_rule("y", got, want, base)
    if simd == 3:  # and through the public op, which dispatches here for fp32, M <= 16
        with ops.use_backend("cpp"):
            assert_error_rule("qlora_linear", ops.qlora_linear(x, q, b, A, B, 0.5), want, base)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 9])
def test_cpu_gemv_takes_16bit_activations(M, dtype, gen, gemv_calls):
    """bf16/fp16 x on CPU runs the fused GEMV (fp32 inside, one rounding) and follows the rule."""
    N, K = 37, 192
    q, Wd = quantized(torch.randn(N, K, generator=gen) / K ** 0.5, "nf4", 64, True)
    x = torch.randn(M, 2 * K, generator=gen).to(dtype)[:, ::2]  # non-contiguous
    b = torch.randn(N, generator=gen).to(dtype)
    A, B = torch.randn(4, K, generator=gen).to(dtype), torch.randn(N, 4, generator=gen).to(dtype)
    with ops.use_backend("cpp"):
        y = ops.qlora_linear(x, q, b, A, B, 0.5)
    assert gemv_calls == [M] and y.dtype == dtype
    want = R.lora_linear(x.double(), Wd.double(), b.double(), A.double(), B.double(), 0.5)
    assert_error_rule("y", y, want, R.lora_linear(x, Wd.to(dtype), b, A, B, 0.5))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("simd", [3, 2, 1, 0], ids=["best", "avx512", "avx2", "scalar"])
@pytest.mark.parametrize("M, N, K, blocksize, dq", [
    # bf16 products (AVX512-BF16 hosts, tiled from M=5): 4 rows x 512 codes per L1 chunk in 64-code
    # groups, 6-row x tiles: a partial second chunk (K=640), one short chunk (K=96: a group and a
    # 32-code tail), a tail chunk of 32 codes after 4 full ones (K=2080, blocksize 32: 65 blocks
    # a row, so a row's 16 scales cross nested blocks of 256), N tails, x-row tails 5, 6+6+1,
    # 6+6+4, 6+3, 6+1; absmax blocks smaller than, equal to and longer than a chunk
    (5, 9, 96, 32, False), (13, 6, 640, 64, True), (16, 70, 1024, 1024, True),
    (9, 5, 640, 128, False), (4, 7, 64, 64, True), (7, 23, 2080, 32, True),
    (11, 10, 1536, 512, True),
    # two threads (M*N*K >= 2^20), each carrying its decode from block to block, 3 chunks a row
    # (the L1 buffers alternate across blocks), an N tail
    (6, 150, 1536, 64, True),
    # M=1-4 (avx512bf16: 4 rows of W at a time, decoded in registers, 16 blocks of scales per
    # span; M=2 and 3 among the AMX cases below, M=4 in (4, 7, 64, ...) above, with x
    # chunk-major): N tails (23, 10, 6, 5 rows), the 32-code K tail alone in the last span
    # (K=2080, blocksize 32, spans of 512 codes crossing nested blocks of 256), one span shorter
    # than 16 blocks (K=1536 at 512; K=96 at 32), plain absmax; M=0 (no rows: nothing runs)
    (1, 23, 2080, 32, True), (1, 10, 1536, 512, True), (1, 6, 640, 128, False),
    (1, 5, 96, 32, False), (0, 8, 64, 64, True),
    # AMX (every M): 16-row W tiles with an N tail, 32-code groups in fours with 1-3 left over
    # (K=544, 96, 2112), M=1, 2, 3 and 16 columns of x, nested blocks of 256 absmax crossed
    # within a row's 16 scales, and rows of 66 blocks (block scales decoded 32 at a time: 32,
    # 32, 2)
    (2, 17, 544, 32, True), (16, 33, 96, 32, False), (3, 20, 2112, 32, True),
    (1, 19, 192, 64, True)])
def test_cpu_gemv_bf16_products_follow_error_rule(simd, M, N, K, blocksize, dq, gen):
    """bf16_products=True (bf16 compute): x and the scaled weights in bf16, as bnb's bf16 path;
    where a host has no faster path for it the GEMV computes in fp32. Either way the error rule
    holds against the bf16 computation."""
    q, Wd = quantized(torch.randn(N, K, generator=gen) / K ** 0.5, "nf4", blocksize, dq)
    x = torch.randn(M, K, generator=gen).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16()
    A, B = torch.randn(8, K, generator=gen) / K ** 0.5, torch.randn(N, 8, generator=gen) / 8 ** 0.5
    xa = x.float() @ A.t()
    got = ops.backends.ext.EXT.qlora_gemv(x.float(), q.data.view(-1), q.absmax, q.absmax2, q.code8,
                                          None if q.offset is None else q.offset.reshape(1), 0,
                                          blocksize, N, b.float(), xa, B, 0.5, simd, True)
    want = R.lora_linear(x.double(), Wd.double(), b.double(), A.double(), B.double(), 0.5)
    base = R.lora_linear(x, Wd.bfloat16(), b, A.bfloat16(), B.bfloat16(), 0.5)
    assert_error_rule(f"y ({ops.backends.ext.EXT.gemv_path(M, True, simd)})", got, want, base)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("simd", [3, 2, 1], ids=["best", "avx512", "avx2"])
@pytest.mark.parametrize("M, rank", [(1, 16), (1, 33), (3, 1), (7, 20), (16, 16), (16, 48)])
def test_cpu_gemv_low_rank_term_at_every_rank(simd, M, rank, gen):
    """The low-rank term s·xa·Bᵀ inside the GEMV (the AVX512-BF16 paths add it to their
    accumulators, 16 ranks a vector: ranks below, at and past 16, and not a multiple of it;
    elsewhere the scalar epilogue), with bias; and gemv_lora_in_kernel names those paths."""
    ext = ops.backends.ext.EXT
    N, K = 13, 256
    q, Wd = quantized(torch.randn(N, K, generator=gen) / K ** 0.5, "nf4", 64, True)
    x = torch.randn(M, K, generator=gen).bfloat16()
    b = torch.randn(N, generator=gen)
    A, B = torch.randn(rank, K, generator=gen) / K ** 0.5, torch.randn(N, rank, generator=gen) / rank ** 0.5
    xa = x.float() @ A.t()
    got = ext.qlora_gemv(x.float(), q.data.view(-1), q.absmax, q.absmax2, q.code8,
                         q.offset.reshape(1), 0, 64, N, b, xa, B, 0.75, simd, True)
    want = R.lora_linear(x.double(), Wd.double(), b.double(), A.double(), B.double(), 0.75)
    base = R.lora_linear(x, Wd.bfloat16(), b.bfloat16(), A.bfloat16(), B.bfloat16(), 0.75)
    path = ext.gemv_path(M, True, simd)
    assert_error_rule(f"y ({path}, r={rank})", got, want, base)
    assert ext.gemv_lora_in_kernel(M, True, simd) == path.startswith("avx512bf16")


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_cpu_gemv_path_is_reported():
    """The GEMV's run-time choice is one named path, and plan(...) says which."""
    ext = ops.backends.ext.EXT
    paths = {"scalar", "avx2", "avx2-tiled", "avx512", "avx512-tiled", "avx512bf16",
             "avx512bf16-tiled"}
    for M in range(1, 17):
        for bf16 in (False, True):
            assert ext.gemv_path(M, bf16, 0) == "scalar"
            assert ext.gemv_path(M, bf16, 1) in {"scalar", "avx2", "avx2-tiled"}
            assert ext.gemv_path(M, bf16, 2) in paths
            assert ext.gemv_path(M, bf16).startswith("avx512bf16") <= bf16  # only if asked for
    if "avx512f" in _cpu_flags() and "avx2" in _cpu_flags():  # fp32, chosen per host class
        amd = _cpu_vendor() == "AuthenticAMD"
        assert [ext.gemv_path(M, False, 2) for M in (1, 16)] == ["avx512", "avx512-tiled"]
        assert [ext.gemv_path(M, False, 3) for M in (1, 16)] == \
            (["avx512", "avx2-tiled"] if amd else ["avx2", "avx512-tiled"])
    q = peftkern.quantize_4bit(torch.randn(8, 64), "nf4", 64)
    with ops.use_backend("cpp"):
        plan = ops.plan("qlora_linear_fwd", torch.empty(9, 64, dtype=torch.bfloat16), q)
    assert plan.config == "gemv" and f"{ext.gemv_path(9, True)} path" in plan.reason


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_cpu_gemv_dispatch_falls_back_outside_its_range(gen):
    """M > 16 or blocks spanning rows: the panel path, still correct."""
    for M, K, dtype in [(17, 64, torch.float32), (17, 64, torch.float16), (3, 96, torch.float32)]:
        q, Wd = quantized(torch.randn(9, K, generator=gen), "nf4", 64)
        x = torch.randn(M, K, generator=gen).to(dtype)
        A, B = torch.randn(2, K, generator=gen).to(dtype), torch.randn(9, 2, generator=gen).to(dtype)
        with ops.use_backend("cpp"):
            y = ops.qlora_linear(x, q, None, A, B, 1.0)
        want = R.lora_linear(x.double(), Wd.double(), None, A.double(), B.double(), 1.0)
        assert_error_rule(f"M={M} K={K} {dtype}", y, want, R.lora_linear(x, Wd.to(dtype), None, A, B, 1.0))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("N, K, blocksize, qt, dq, dtype", [
    (300, 96, 32, "nf4", True, torch.float32), (33, 64, 64, "fp4", False, torch.float32),
    (100, 256, 32, "nf4", True, torch.float16), (41, 200, 64, "nf4", False, torch.float16),
    (1100, 80, 64, "fp4", True, torch.float32), (9, 40, 128, "nf4", False, torch.float32)])
def test_cpu_panel_path_forward_and_dx_follow_error_rule(N, K, blocksize, qt, dq, dtype, gen,
                                                         monkeypatch):
    """M > 16 on CPU: the weight is dequantized panel by panel (tiny panels here, so there are many,
    with blocks and nested blocks spanning rows and a short last panel)."""
    monkeypatch.setattr(ops.backends.cpp, "PANEL_ELEMS", 64)
    with ops.use_backend("cpp"):  # the interpreted Triton quantizer would only make this slow
        q, Wd = quantized(torch.randn(N, K, generator=gen) / K ** 0.5, qt, blocksize, dq)
    x = torch.randn(2, 11, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    A = (torch.randn(4, K, generator=gen) / K ** 0.5).to(dtype)
    B = (torch.randn(N, 4, generator=gen) / 2).to(dtype)
    gy = torch.randn(2, 11, N, generator=gen).to(dtype)
    got_x, ref_x = x.clone().requires_grad_(), x.double().requires_grad_()
    with ops.use_backend("cpp"):
        y = ops.qlora_linear(got_x, q, b, A, B, 0.5)
        (dx,) = torch.autograd.grad(y, got_x, gy)
    want = R.lora_linear(ref_x, Wd.double(), b.double(), A.double(), B.double(), 0.5)
    (want_dx,) = torch.autograd.grad(want, ref_x, gy.double())
    base_x = x.clone().requires_grad_()
    base = R.lora_linear(base_x, Wd.to(dtype), b, A, B, 0.5)
    (base_dx,) = torch.autograd.grad(base, base_x, gy)
    assert_error_rule("y", y, want, base)
    assert_error_rule("dx", dx, want_dx, base_dx)


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("vendor_id")).split(":")[1].strip()
    except (OSError, StopIteration):
        return ""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.skipif("amx_bf16" not in _cpu_flags(), reason="no AMX-BF16 on this host")
def test_cpu_gemv_takes_amx_for_bf16_at_every_m():
    """On an AMX host the bf16 GEMV's best path is the AMX one at every M (so the cases above run
    it), and level 2 still reaches the AVX512-BF16 path."""
    path = ops.backends.ext.EXT.gemv_path
    assert [path(M, True, 3) for M in (1, 2, 16)] == ["amx-tiled"] * 3
    assert path(16, True, 2) == "avx512bf16-tiled" and path(16, False, 3) == "avx512-tiled"  # Intel
