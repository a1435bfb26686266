"""Shared test setup. Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before peftkern.kernels is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PEFTKERN_NAN_FILL", "1")  # kernel outputs start as NaN: unwritten ones fail

from peftkern import ops  # noqa: E402

from helpers import CPU_BACKENDS, GPU  # noqa: E402


def pytest_collection_modifyitems(items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if GPU else "none"
    return f"peftkern CPU backends: {', '.join(CPU_BACKENDS)}; GPU: {dev}"


@pytest.fixture
def gen():
    """A seeded generator; each test draws fresh random inputs from it."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def gemv_calls(monkeypatch):
    """The row counts M of every call of the C++/CUDA decode GEMV the 4-bit ops make (the calls
    still run)."""
    calls, real = [], ops.backends.ext.EXT

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)
            if name != "qlora_gemv":
                return op
            return lambda *args: calls.append(args[0].shape[0]) or op(*args)

    monkeypatch.setattr(ops.backends.ext, "EXT", Spy())
    return calls


@pytest.fixture
def shared_dropout_masks(monkeypatch):
    """PEFT's nn.Dropout and peftkern's mask draw the same mask for the same input size."""
    def mask(numel, p, dtype):
        g = torch.Generator().manual_seed(numel)
        return torch.empty(numel).bernoulli_(1 - p, generator=g).div_(1 - p).to(dtype)

    real_dropout = torch.nn.functional.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return real_dropout(x, p, training, inplace)
        return x * mask(x.numel(), p, x.dtype).view(x.shape)

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    monkeypatch.setattr(ops.lora, "_mask", lambda x2, p, given, dtype: None if p == 0 else
                        mask(x2.numel(), p, dtype).view(x2.shape))
