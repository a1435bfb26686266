"""The C++/CUDA extension: tables agree with Python, its own argument checks, the nvcc build."""
import os
import shutil
import subprocess

import pytest
import torch

from peftkern import codes
from peftkern.ops import backends

pytestmark = pytest.mark.skipif(backends.EXT is None, reason=f"no extension: {backends.EXT_ERROR}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_code_tables_equal_python():
    for qt, qid in codes.QUANT_TYPE_ID.items():
        assert torch.equal(backends.EXT.code_table(qid), codes.code_table(qt))


def test_extension_refuses_bad_arguments():
    ext = backends.EXT
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        ext.quantize_4bit(torch.ones(64), 0, 48)
    with pytest.raises(RuntimeError, match="quant_type must be 0"):
        ext.quantize_4bit(torch.ones(64), 7, 64)
    with pytest.raises(RuntimeError, match="A must be float32, float16 or bfloat16"):
        ext.quantize_4bit(torch.ones(64, dtype=torch.float64), 0, 64)
    packed, absmax = ext.quantize_4bit(torch.randn(128), 0, 64)
    with pytest.raises(RuntimeError, match="packed has 64 bytes, expected 32"):
        ext.dequantize_4bit(packed, absmax, None, None, None, 0, 64, 64, torch.float32)
    with pytest.raises(RuntimeError, match="uint8 absmax needs absmax2"):
        ext.dequantize_4bit(packed, absmax.to(torch.uint8), None, None, None, 0, 64, 128,
                            torch.float32)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc not installed")
def test_cuda_sources_compile_without_spills():
    """The CI compile check: every csrc/cuda/*.cu for sm_80 and sm_90a, ptxas report, no spills."""
    run = subprocess.run(["bash", os.path.join(ROOT, ".ci", "nvcc_check")], capture_output=True,
                         text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "nvcc_check: OK (no spills)" in run.stdout
    assert "sm_90a" in run.stdout and "sm_80" in run.stdout
