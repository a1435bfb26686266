"""`torch.library.opcheck` on every peftkern custom op: schema, fake (meta) implementation,
autograd registration and AOT dispatch, for each CPU backend and for fp32 adapters on a 16-bit base."""
import pytest
import torch

import peftkern
from peftkern import ops
from peftkern.ops import lora as L
from peftkern.ops import quant as Q

from helpers import CPU_BACKENDS

M, K, N, R = 5, 64, 40, 8
CASES = [  # (backend, activation dtype, adapter dtype); bf16 never runs on the Triton interpreter
    (b, dt, lt) for b in CPU_BACKENDS
    for dt, lt in ((torch.float32, torch.float32), (torch.float16, torch.float32),
                   (torch.bfloat16, torch.float32), (torch.float16, torch.float16))
    if not (b == "triton" and dt == torch.bfloat16)
]


def _inputs(gen, dtype, lora_dtype):
    x = torch.randn(M, K, generator=gen).to(dtype).requires_grad_(True)
    W = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    A = (torch.randn(R, K, generator=gen) / K ** 0.5).to(lora_dtype).requires_grad_(True)
    B = torch.randn(N, R, generator=gen).to(lora_dtype).requires_grad_(True)
    mask = (torch.rand(M, K, generator=gen) > 0.1).to(lora_dtype) / 0.9
    return x, W, torch.randn(N, generator=gen).to(dtype), A, B, mask


@pytest.mark.parametrize("backend,dtype,lora_dtype", CASES, ids=str)
def test_lora_ops(gen, backend, dtype, lora_dtype):
    x, W, b, A, B, mask = _inputs(gen, dtype, lora_dtype)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    dyb = dy.to(lora_dtype) @ B.detach()
    q = peftkern.quantize_4bit(W)
    qa = (q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type, q.blocksize)
    with ops.use_backend(backend):
        if backend != "cpp":  # the dense ops have no C++ path
            torch.library.opcheck(L.lora_linear_fwd, (x, W, b, A, B, 0.5, None))
            torch.library.opcheck(L.lora_linear_fwd, (x, W, None, A, B, 0.5, mask))
            torch.library.opcheck(L.lora_linear_dx, (dy, W, A.detach(), dyb, 0.5, mask))
        torch.library.opcheck(L.qlora_linear_fwd, (x, *qa, N, b, A, B, 0.5, None, dtype))
        torch.library.opcheck(L.qlora_linear_fwd, (x, *qa, N, None, A, B, 0.5, mask, dtype))
        torch.library.opcheck(L.qlora_linear_dx, (dy, *qa, K, A.detach(), dyb, 0.5, mask, dtype))
        scale = torch.rand(N, generator=gen) + 0.5  # the epilogue scale: calls without autograd
        with torch.no_grad():
            args = [t.detach() for t in (x, A, B)]
            if backend != "cpp":
                torch.library.opcheck(L.lora_linear_fwd, (args[0], W, b, *args[1:], 0.5, None, scale))
            torch.library.opcheck(L.qlora_linear_fwd, (args[0], *qa, N, b, *args[1:], 0.5, None,
                                                       dtype, scale))
        # a trainable output scale: the pre-scale result kept, dX scaling dY in-kernel
        sg = scale.clone().requires_grad_(True)
        if backend != "cpp":
            torch.library.opcheck(L.lora_linear_fwd, (x, W, b, A, B, 0.5, None, sg, None, True))
            torch.library.opcheck(L.lora_linear_dx, (dy, W, A.detach(), dyb, 0.5, mask, scale))
        torch.library.opcheck(L.qlora_linear_fwd, (x, *qa, N, b, A, B, 0.5, mask, dtype, sg, None,
                                                   True))
        torch.library.opcheck(L.qlora_linear_dx, (dy, *qa, K, A.detach(), dyb, 0.5, mask, dtype,
                                                  scale))
        torch.library.opcheck(L.scale_grad, (dy, dy * 0.5))
        # a wide output (the widest of x's and the adapters' dtypes), with autograd
        wide = torch.promote_types(dtype, lora_dtype)
        if backend != "cpp":
            torch.library.opcheck(L.lora_linear_fwd, (x, W, None, A, B, 0.5, mask, None, wide))
        torch.library.opcheck(L.qlora_linear_fwd, (x, *qa, N, None, A, B, 0.5, mask, dtype, None,
                                                   wide))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dora_norm_op(gen, backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 never runs on the Triton interpreter")
    from peftkern.ops import dora
    W = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    A, B = torch.randn(R, K, generator=gen).to(dtype), torch.randn(N, R, generator=gen).to(dtype)
    q = peftkern.quantize_4bit(W.float())
    with ops.use_backend(backend):
        torch.library.opcheck(dora.dora_norm_op, (W, None, None, None, None, None, "nf4", 0, A, B,
                                                  0.5, N, K))
        torch.library.opcheck(dora.dora_norm_op, (None, q.data, q.absmax, q.absmax2, q.code8,
                                                  q.offset, "nf4", 64, A, B, 0.5, N, K))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_quant_ops(gen, backend, nested):
    W = torch.randn(N, K, generator=gen)
    q = peftkern.quantize_4bit(W, double_quant=nested)
    with ops.use_backend(backend):
        torch.library.opcheck(Q.quantize_blocks, (W, "nf4", 64))
        torch.library.opcheck(Q.dequantize_blocks, (q.data, q.absmax, q.absmax2, q.code8, q.offset,
                                                  "nf4", 64, [N, K], torch.bfloat16))
