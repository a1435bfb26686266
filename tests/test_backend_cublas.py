"""The dequantize + cuBLAS backend (peftkern/ops/backends/cublas.py). plan() sends CUDA matmuls to
it; its math is device-independent torch, so it is tested here on CPU tensors, with the weight
decoded by the extension's dequantize ("cuda" config: the same op, CPU kernel) or by Triton."""
import pytest
import torch

import peftkern
from peftkern import ops
from peftkern import reference as R
from peftkern.ops.backends import cublas

from helpers import CPU_BACKENDS, assert_error_rule

DECODERS = [d for d, b in (("cuda", "cpp"), ("triton", "triton")) if b in CPU_BACKENDS]


def _qw(q):
    return (q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type, q.blocksize)


@pytest.mark.skipif(not DECODERS, reason="needs the C++ extension or Triton")
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype, lora_dtype, dropout", [
    (torch.float32, torch.float32, False),   # in place: y.addmm_
    (torch.float16, torch.float32, True),    # fp32 adapters on a 16-bit base, dropout mask
    (torch.float16, torch.float16, False)])
def test_qlora_forward_and_dx_follow_error_rule(decoder, dtype, lora_dtype, dropout, gen):
    M, N, K, r = 7, 48, 128, 8
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    q = peftkern.quantize_4bit(W, "nf4", 64, double_quant=True)
    Wd = peftkern.dequantize_4bit(q, torch.float32)
    x = torch.randn(M, K, generator=gen).to(dtype)
    A = (torch.randn(r, K, generator=gen) / K ** 0.5).to(lora_dtype)
    B = torch.randn(N, r, generator=gen).to(lora_dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    mask = ((torch.rand(M, K, generator=gen) > 0.2).to(lora_dtype) / 0.8) if dropout else None
    y, xa, _ = cublas.qlora_linear_fwd(x, _qw(q), N, bias, A, B, 0.5, mask, dtype, config=decoder)
    want = R.lora_linear(x.double(), Wd.double(), bias.double(), A.double(), B.double(), 0.5,
                         None if mask is None else mask.double())
    base = R.lora_linear(x, Wd.to(dtype), bias, A.to(dtype), B.to(dtype), 0.5,
                         None if mask is None else mask.to(dtype))
    assert y.dtype == dtype
    assert_error_rule("y", y, want, base)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    dyb = dy.to(lora_dtype) @ B
    dx = cublas.qlora_linear_dx(dy, _qw(q), K, A, dyb, 0.5, mask, dtype, config=decoder)
    want_dx = dy.double() @ Wd.double() + 0.5 * ((dy.double() @ B.double()) @ A.double()) * (
        1 if mask is None else mask.double())
    base_dx = dy @ Wd.to(dtype) + 0.5 * ((dy @ B.to(dtype)) @ A.to(dtype)) * (
        1 if mask is None else mask.to(dtype))
    assert dx.dtype == dtype
    assert_error_rule("dx", dx, want_dx, base_dx)


def test_dense_forward_and_dx_follow_error_rule(gen):
    M, N, K, r = 5, 24, 40, 4
    W, x = torch.randn(N, K, generator=gen), torch.randn(M, K, generator=gen)
    A, B = torch.randn(r, K, generator=gen), torch.randn(N, r, generator=gen)
    y, xa, _ = cublas.lora_linear_fwd(x, W, None, A, B, 2.0, None)
    assert_error_rule("y", y, R.lora_linear(x.double(), W.double(), None, A.double(), B.double(),
                                            2.0), R.lora_linear(x, W, None, A, B, 2.0))
    dy = torch.randn(M, N, generator=gen)
    dx = cublas.lora_linear_dx(dy, W, A, dy @ B, 2.0, None)
    want = dy.double() @ W.double() + 2.0 * (dy.double() @ B.double()) @ A.double()
    assert_error_rule("dx", dx, want, dy @ W + 2.0 * (dy @ B) @ A)


def test_cublas_is_planned_only_on_cuda():
    assert "cublas" not in ops.available(torch.device("cpu"))
    with ops.use_backend("cublas"), pytest.raises(RuntimeError, match="'cublas' is not available"):
        ops.plan("lora_linear_fwd", torch.empty(2, 8), torch.empty(4, 8))
