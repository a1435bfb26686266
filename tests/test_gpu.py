"""CUDA: every GPU backend (Triton, CUDA extension) against the CPU backends, bit for bit, and the
CUDA decode GEMV against the float64 reference."""
import dataclasses

import pytest
import torch

import peftkern
from peftkern import codes, ops
from peftkern import reference as R

from helpers import assert_error_rule

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ops.available(torch.device("cuda")) if torch.cuda.is_available() else ()


@pytest.mark.parametrize("shape", [(1, 64), (3, 4096), (7, 33), (4096, 4096)], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_backends_match_cpu(quant_type, blocksize, shape, dtype, gen):
    W = (torch.randn(shape, generator=gen) * 3).to(dtype)
    with ops.use_backend("reference"):
        want = peftkern.quantize_4bit(W, quant_type, blocksize)
        want_deq = peftkern.dequantize_4bit(want)
    for backend in GPU_BACKENDS:
        with ops.use_backend(backend):
            if backend != "cuda":  # the CUDA extension implements dequantize only
                got = peftkern.quantize_4bit(W.cuda(), quant_type, blocksize)
                assert torch.equal(got.data.cpu(), want.data), backend
                assert torch.equal(got.absmax.cpu(), want.absmax), backend
            deq = peftkern.dequantize_4bit(want.to("cuda"))
            assert torch.equal(deq.cpu(), want_deq), backend


# ---- the CUDA decode GEMV (csrc/cuda/qlora_gemv.cu), through the public op ------------------------

needs_cuda_ext = pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="CUDA extension not built")


def _quantized(N, K, quant_type, blocksize, dq, gen):
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    with ops.use_backend("reference"):
        q = peftkern.quantize_4bit(W, quant_type, blocksize, dq)
        return q, peftkern.dequantize_4bit(q, torch.float32)


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, N, K, blocksize, qt, dq, bias, r", [
    (1, 4096, 4096, 64, "nf4", True, False, 16), (7, 333, 640, 32, "fp4", False, True, 1),
    (16, 1024, 14336, 64, "nf4", True, True, 64), (3, 5, 64, 64, "nf4", False, False, 8),
    (16, 4097, 4096, 4096, "fp4", True, True, 16), (1, 14336, 4096, 128, "nf4", True, True, 16)])
def test_cuda_decode_gemv_follows_error_rule(M, N, K, blocksize, qt, dq, bias, r, dtype, gen):
    q, Wd = _quantized(N, K, qt, blocksize, dq, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    A = (torch.randn(r, K, generator=gen) / K ** 0.5).to(dtype)
    B = (torch.randn(N, r, generator=gen) / r ** 0.5).to(dtype)
    cuda = [t if t is None else t.cuda() for t in (x, b, A, B)]
    with ops.use_backend("cuda"):
        y = ops.qlora_linear(cuda[0], q.to("cuda"), *cuda[1:], 0.5)
        again = ops.qlora_linear(cuda[0], q.to("cuda"), *cuda[1:], 0.5)
    assert torch.equal(y, again), "not deterministic"
    want = R.lora_linear(x.double(), Wd.double(), None if b is None else b.double(), A.double(),
                         B.double(), 0.5)
    base = R.lora_linear(cuda[0], Wd.to(dtype).cuda(), *cuda[1:], 0.5)  # torch in dtype, on GPU
    assert_error_rule("y", y.cpu(), want, base.cpu())


@needs_cuda_ext
def test_cuda_decode_gemv_misaligned_inputs(gen):
    """x, lora_B and the packed bytes starting off a 16-byte boundary (views into larger buffers)."""
    M, N, K, r = 5, 300, 512, 8
    q, Wd = _quantized(N, K, "nf4", 64, False, gen)
    qc = q.to("cuda")
    shifted = torch.empty(qc.data.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted[1:] = qc.data.reshape(-1)
    qc = dataclasses.replace(qc, data=shifted[1:].view(qc.data.shape))
    x = torch.randn(M * K + 1, generator=gen).half()[1:].view(M, K)
    B = torch.randn(N * r + 1, generator=gen).half()[1:].view(N, r)
    A = (torch.randn(r, K, generator=gen) / K ** 0.5).half()
    with ops.use_backend("cuda"):
        y = ops.qlora_linear(x.cuda(), qc, None, A.cuda(), B.cuda(), 1.0)
    want = R.lora_linear(x.double(), Wd.double(), None, A.double(), B.double(), 1.0)
    base = R.lora_linear(x.cuda(), Wd.half().cuda(), None, A.cuda(), B.cuda(), 1.0)
    assert_error_rule("y", y.cpu(), want, base.cpu())


@needs_cuda_ext
def test_default_dispatch_follows_the_measured_crossover(gen, monkeypatch, gemv_calls):
    """Triton by default; the CUDA GEMV only where tuning.json says it won (M <= max_M)."""
    from peftkern.ops import tuning
    monkeypatch.setattr(tuning, "cuda_gemv_max_m", lambda device, N, K: 4)
    q, _ = _quantized(64, 256, "nf4", 64, True, gen)
    A, B = torch.randn(4, 256, device="cuda"), torch.randn(64, 4, device="cuda")
    for M in (1, 4, 5, 16, 17):
        ops.qlora_linear(torch.randn(M, 256, device="cuda"), q.to("cuda"), None, A, B, 1.0)
    assert gemv_calls == [1, 4]


# ---- the Gluon forwards (kernels/qlora_wgmma.py, sm_90+), through the GLUON configs ---------------

def _hopper():
    from peftkern.kernels import qlora_wgmma
    return (torch.cuda.is_available() and "triton" in GPU_BACKENDS and qlora_wgmma.AVAILABLE
            and torch.cuda.get_device_capability()[0] >= 9)


@pytest.mark.skipif(not _hopper(), reason="needs an sm_90+ GPU and Triton with Gluon")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, N, K, blocksize, qt, dq, bias, r, layout", [
    (1, 4096, 4096, 64, "nf4", True, False, 16, "2d"), (16, 4096, 4096, 64, "nf4", True, True, 16, "2d"),
    (7, 333, 1280, 128, "fp4", False, True, 8, "2d"),      # a partial n-tile, a shorter last slice
    (16, 14336, 4096, 64, "nf4", True, True, 16, "2d"),    # several tiles per program
    (3, 4096, 11008, 256, "nf4", True, False, 16, "transposed"),  # x non-contiguous
    (5, 130, 512, 512, "nf4", False, False, 4, "2d"),
    # the large kernel: whole tiles; the last m-tile shifted and a partial n-tile; more tiles
    # than programs; blocks of two sub-steps; x non-contiguous; one m-tile
    (1024, 4096, 4096, 64, "nf4", True, True, 16, "2d"), (333, 333, 1280, 128, "fp4", False, True, 8, "2d"),
    (512, 14336, 4096, 64, "nf4", True, False, 16, "2d"),
    (257, 4096, 11008, 256, "nf4", True, False, 16, "transposed"),
    (128, 130, 512, 512, "nf4", False, False, 4, "2d")])
def test_gluon_forward_follows_error_rule(M, N, K, blocksize, qt, dq, bias, r, layout, dtype, gen,
                                          monkeypatch):
    from peftkern.kernels import lora_linear as L
    from peftkern.kernels import qlora_wgmma
    calls = []
    for name in ("forward_partials", "large_linear"):  # small M; large M with its epilogue
        real = getattr(qlora_wgmma, name)
        monkeypatch.setattr(qlora_wgmma, name, lambda *a, real=real: calls.append(1) or real(*a))
    q, Wd = _quantized(N, K, qt, blocksize, dq, gen)
    x = torch.randn(M, K, generator=gen) if layout == "2d" else torch.randn(K, M, generator=gen).t()
    x = x.to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    A = (torch.randn(r, K, generator=gen) / K ** 0.5).to(dtype)
    B = (torch.randn(N, r, generator=gen) / r ** 0.5).to(dtype)
    cuda = [t if t is None else t.cuda() for t in (x, b, A, B)]
    cfg = next(c for c in L.CANDIDATES[L.regime(M)] if c.get("GLUON"))
    with ops.use_backend("triton"), ops.use_config(cfg):
        y = ops.qlora_linear(cuda[0], q.to("cuda"), *cuda[1:], 0.5)
        again = ops.qlora_linear(cuda[0], q.to("cuda"), *cuda[1:], 0.5)
    assert calls == [1, 1], "the Gluon kernel did not run"
    assert torch.equal(y, again), "not deterministic"
    want = R.lora_linear(x.double(), Wd.double(), None if b is None else b.double(), A.double(),
                         B.double(), 0.5)
    base = R.lora_linear(cuda[0], Wd.to(dtype).cuda(), *cuda[1:], 0.5)  # torch in dtype, on GPU
    assert_error_rule("y", y.cpu(), want, base.cpu())
@pytest.mark.skipif(not _hopper(), reason="needs an sm_90+ GPU and Triton with Gluon")
@pytest.mark.parametrize("M, N, K", [(1024, 4096, 4096), (333, 333, 1280)])
def test_gluon_large_forward_workspace_path(M, N, K, gen, monkeypatch):
    """The large forward's workspace path (DoRA's output scale and its pre-scale z, which the
    kernel's own epilogue does not take): `forward_partials` + the split-K epilogue kernel."""
    from peftkern.kernels import lora_linear as L
    from peftkern.kernels import qlora_wgmma
    from peftkern.ops.backends import triton as tb
    calls = []
    real = qlora_wgmma.forward_partials
    monkeypatch.setattr(qlora_wgmma, "forward_partials", lambda *a: calls.append(1) or real(*a))
    q, Wd = _quantized(N, K, "nf4", 64, True, gen)
    dt = torch.bfloat16
    x = torch.randn(M, K, generator=gen).to(dt)
    A = (torch.randn(16, K, generator=gen) / K ** 0.5).to(dt)
    B = (torch.randn(N, 16, generator=gen) / 4).to(dt)
    bias = torch.randn(N, generator=gen).to(dt)
    scale = torch.rand(N, generator=gen) + 0.5
    qc = q.to("cuda")
    wq = tb._qstate(qc.absmax, qc.absmax2, qc.code8, qc.offset, "nf4", 64, torch.device("cuda"), dt)
    xa = x.cuda() @ A.cuda().t()
    cfg = next(c for c in L.CANDIDATES["large"] if c.get("GLUON"))
    out, z = L.lora_matmul(x.cuda(), qc.data.reshape(-1), wq, xa, B.cuda().t(), 0.5, None,
                           bias.cuda(), stride_wq=1, stride_wp=K, P=N, config=cfg,
                           scale=scale.cuda(), keep_z=True)
    assert calls == [1], "the Gluon kernel did not run"
    zd = x.double() @ Wd.double().t() + 0.5 * xa.double().cpu() @ B.double().t()
    zb = x.cuda() @ Wd.to(dt).cuda().t() + (xa @ B.cuda().t()) * 0.5
    assert_error_rule("z", z.float().cpu(), zd, zb.float().cpu())
    want = zd * scale.double() + bias.double()
    assert_error_rule("out", out.float().cpu(), want,
                      (zb.float() * scale.cuda() + bias.cuda().float()).to(dt).float().cpu())


@pytest.mark.skipif(not _hopper(), reason="needs an sm_90+ GPU and Triton with Gluon")
@pytest.mark.parametrize("M, N, K, blocksize, qt, dq, r, dropout, out_dtype", [
    (1024, 4096, 4096, 64, "nf4", True, 16, False, torch.bfloat16),
    (333, 384, 1280, 128, "fp4", False, 8, True, torch.bfloat16),    # the last m-tile shifted
    (512, 14336, 4096, 64, "nf4", True, 64, True, torch.float32),    # more tiles than programs
    (257, 4096, 11008, 256, "nf4", True, 16, False, torch.bfloat16),
    (128, 128, 512, 512, "nf4", False, 4, False, torch.bfloat16)])   # one m-tile, one K step
def test_gluon_dx_follows_error_rule(M, N, K, blocksize, qt, dq, r, dropout, out_dtype, gen,
                                     monkeypatch):
    """The dX kernel (`_qlora_wgmma_dx_kernel`, its epilogue included) through the GLUON config:
    dX = dY·W + s·(dY·B)·A [⊙ dropout mask], bf16 dY, against float64 and torch in bf16."""
    from peftkern.kernels import lora_linear as L
    from peftkern.kernels import qlora_wgmma
    from peftkern.ops.backends import triton as tb
    calls = []
    real = qlora_wgmma.dx_linear
    monkeypatch.setattr(qlora_wgmma, "dx_linear", lambda *a: calls.append(1) or real(*a))
    q, Wd = _quantized(N, K, qt, blocksize, dq, gen)
    dt = torch.bfloat16
    dy = torch.randn(M, N, generator=gen).to(dt)
    dyb = torch.randn(M, r, generator=gen).to(dt)
    A = (torch.randn(r, K, generator=gen) / r ** 0.5).to(dt)
    mask = (torch.rand(M, K, generator=gen) > 0.1).to(dt) / 0.9 if dropout else None
    qc = q.to("cuda")
    qw = (qc.data, qc.absmax, qc.absmax2, qc.code8, qc.offset, qc.quant_type, qc.blocksize)
    cfg = next(c for c in L.CANDIDATES["large"] if c.get("GLUON"))
    args = (dy.cuda().to(out_dtype), qw, K, A.cuda(), dyb.cuda(), 0.5,
            None if mask is None else mask.cuda(), dt)
    got = tb.qlora_linear_dx(*args, config=cfg)
    again = tb.qlora_linear_dx(*args, config=cfg)
    assert calls == [1, 1], "the Gluon dX kernel did not run"
    assert torch.equal(got, again), "not deterministic"
    assert got.dtype == out_dtype
    m = 1 if mask is None else mask.double()
    want = dy.double() @ Wd.double() + 0.5 * (dyb.double() @ A.double()) * m
    mc = 1 if mask is None else mask.cuda()
    base = dy.cuda() @ Wd.to(dt).cuda() + (dyb.cuda() @ A.cuda()) * 0.5 * mc  # torch in bf16
    assert_error_rule("dX", got.float().cpu(), want, base.float().cpu())


