"""Regression timings of the suite's ops, for pytest-benchmark (not part of the correctness tests):

    pytest benchmarks/ --benchmark-only                      # CPU, small shapes
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep a run; --benchmark-compare later

Each test times one implementation of one case built by `peftkern.bench` (the same code the sweep
runs), so a slowdown here is a slowdown there. Shapes are small on CPU and the DESIGN.md layer
shapes on CUDA.
"""
import pytest
import torch

from peftkern.bench import sweep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPE = (4096, 4096) if DEVICE == "cuda" else (1024, 1024)
CASES = {  # op -> (M, r)
    "dequantize": (0, 0), "decode": (1, 16), "qlora_fwd": (128, 16), "qlora_fwd_bwd": (128, 16),
    "lora_fwd": (128, 16), "lora_fwd_bwd": (128, 16), "adalora_step": (128, 12),
}


def _case(op):
    return sweep.OPS[op].build(*SHAPE, *CASES[op], DTYPE, DEVICE)


PARAMS = [(op, impl.name) for op in CASES for impl in _case(op).impls]  # what is installed here


@pytest.mark.parametrize("op,impl", PARAMS)
def test_op(benchmark, op, impl):
    M, r = CASES[op]
    call, _ = next(i for i in _case(op).impls if i.name == impl).make()
    call()
    benchmark.extra_info.update(op=op, impl=impl, N=SHAPE[0], K=SHAPE[1], M=M, r=r)
    if DEVICE == "cuda":
        benchmark(lambda: (call(), torch.cuda.synchronize()))
    else:
        benchmark(call)


def test_model_step(benchmark):
    case = sweep.OPS["model_step"].build(688, 256, 128, 16, DTYPE, DEVICE)
    if not case.impls:
        pytest.skip("model_step needs peft, transformers and bitsandbytes")
    call, _ = case.impls[0].make()
    call()
    benchmark(call)
