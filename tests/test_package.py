"""Packaging: import works without optional dependencies or the extension; ops trace in compile."""
import subprocess
import sys

import pytest
import torch

import peftkern
from peftkern import ops


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_without_bitsandbytes_peft_transformers():
    code = ("import sys\n"
            "for m in ('bitsandbytes', 'peft', 'transformers'): sys.modules[m] = None\n"
            "import torch, peftkern\n"
            "q = peftkern.quantize_4bit(torch.randn(4, 64))\n"
            "print(peftkern.dequantize_4bit(q).shape)\n"
            "try:\n    q.to_bnb()\nexcept ImportError as e:\n    print('to_bnb:', e)\n")
    run = _run(code)
    assert run.returncode == 0, run.stderr
    assert "torch.Size([4, 64])" in run.stdout and "to_bnb() needs bitsandbytes" in run.stdout


def test_import_without_extension_warns_once_and_falls_back():
    code = ("import sys, warnings\n"
            "sys.modules['peftkern._C'] = None\n"
            "import torch, peftkern\n"
            "from peftkern import ops\n"
            "assert ops.available(torch.device('cpu')) == ('reference',), ops.available(torch.device('cpu'))\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3): peftkern.quantize_4bit(torch.randn(4, 64))\n"
            "print(len(w), w[0].message)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("1 peftkern: the C++ extension is not available"), run.stdout


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if "cpp" in ops.available(torch.device("cpu")) else []))
def test_ops_compile_fullgraph(backend):
    """The custom ops have fake implementations: torch.compile traces them with no graph break."""
    q = peftkern.quantize_4bit(torch.randn(8, 64))

    def f(x, data, absmax, absmax2, code8, offset):
        w = ops.dequantize_4bit(data, absmax, absmax2, code8, offset, "nf4", 64, [8, 64], torch.float32)
        packed, amax = ops.quantize_4bit(w, "nf4", 64)
        return x @ w.t(), packed, amax

    args = (torch.randn(3, 64), q.data, q.absmax, q.absmax2, q.code8, q.offset)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        for got, want in zip(compiled(*args), f(*args)):
            assert torch.equal(got, want)
