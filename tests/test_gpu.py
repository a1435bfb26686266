"""CUDA: every GPU backend (Triton, CUDA extension) against the CPU backends, bit for bit."""
import pytest
import torch

import peftkern
from peftkern import codes, ops

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
        want_deq = want.dequantize()
    for backend in GPU_BACKENDS:
        with ops.use_backend(backend):
            if backend != "cuda":  # the CUDA extension implements dequantize only
                got = peftkern.quantize_4bit(W.cuda(), quant_type, blocksize)
                assert torch.equal(got.data.cpu(), want.data), backend
                assert torch.equal(got.absmax.cpu(), want.absmax), backend
            deq = peftkern.dequantize_4bit(want.to("cuda"))
            assert torch.equal(deq.cpu(), want_deq), backend
