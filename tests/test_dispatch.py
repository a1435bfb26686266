"""peftkern.ops.dispatch: every decision of which backend and config runs, explained by plan().
No GPU is needed: plan() reads the device type, the tuned table and the arch, never launches."""
import pytest
import torch

import peftkern
from peftkern import ops
from peftkern.ops import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CAN_PLAN_CUDA = "triton" in ops.available(CUDA)  # Triton installed: a CUDA plan needs no GPU



class _OnCuda:
    """A stand-in tensor on a CUDA device: plan() reads only .device, .dtype and .shape."""

    def __init__(self, M, K, dtype):
        self.device, self.dtype, self.shape = CUDA, dtype, (M, K)


@pytest.fixture
def gpu_x(monkeypatch, tmp_path):
    """A simulated H100 ("GPU X", sm_90) with an empty tuning table."""
    from peftkern.ops import tuning
    table = tmp_path / "tuning.json"
    table.write_text('{"devices": {}}')
    monkeypatch.setattr(tuning, "TABLE", str(table))
    tuning.clear_caches()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    yield table
    tuning.clear_caches()


@pytest.mark.skipif(not CAN_PLAN_CUDA, reason="needs Triton installed")
def test_untuned_gpu_runs_fused_4bit_at_small_m_and_dequantize_cublas_above(gpu_x):
    from peftkern.kernels import lora_linear as L
    q = peftkern.quantize_4bit(torch.randn(32, 64))
    for op in ("qlora_linear_fwd", "qlora_linear_dx"):
        for M in (1, 16):
            p = ops.plan(op, _OnCuda(M, 64, torch.bfloat16), q)
            assert p.backend == "triton" and "fused 4-bit decode for M <= 16" in p.reason, p
            assert p.config == L.CANDIDATES["small"][L.RULE["small"][90]]
        p = ops.plan(op, _OnCuda(17, 64, torch.bfloat16), q)
        assert p.backend == "cublas" and p.config == "triton" and "dequantize + cuBLAS" in p.reason
    for op in ("lora_linear_fwd", "lora_linear_dx"):  # a dense weight: PEFT's own path, cuBLAS
        for M in (1, 8192):
            assert ops.plan(op, _OnCuda(M, 64, torch.float16), torch.empty(32, 64)).backend == "cublas"


@pytest.mark.skipif(not CAN_PLAN_CUDA, reason="needs Triton installed")
def test_a_tuned_gpu_follows_its_table(gpu_x):
    import json
    from peftkern.ops import tuning
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    entries = [{"op": "fwd", "quant": True, "M": 8192, "N": 32, "K": 64, "backend": "triton",
                "config": cfg},
               {"op": "fwd", "quant": True, "M": 1, "N": 32, "K": 64, "backend": "cublas"}]
    gpu_x.write_text(json.dumps({"devices": {"GPU X": {"lora_matmul": entries}}}))
    tuning.clear_caches()
    q = peftkern.quantize_4bit(torch.randn(32, 64))
    p = ops.plan("qlora_linear_fwd", _OnCuda(8192, 64, torch.bfloat16), q)
    assert (p.backend, p.config) == ("triton", cfg) and "tuning.json" in p.reason, p
    p = ops.plan("qlora_linear_fwd", _OnCuda(1, 64, torch.bfloat16), q)
    assert p.backend == "cublas" and "tuning.json" in p.reason, p
    with ops.use_backend("triton"):  # forced Triton with a cuBLAS entry: the rule tiles
        assert ops.plan("qlora_linear_fwd", _OnCuda(1, 64, torch.bfloat16), q).config["SWAP"]


@pytest.mark.skipif(not CAN_PLAN_CUDA, reason="needs Triton installed")
def test_fp32_matmuls_on_cuda_run_cublas_unless_triton_is_forced(gpu_x):
    q = peftkern.quantize_4bit(torch.randn(32, 64))
    for op, w in (("lora_linear_fwd", torch.empty(32, 64)), ("qlora_linear_fwd", q),
                  ("qlora_linear_dx", q)):
        for M in (1, 40):
            p = ops.plan(op, _OnCuda(M, 64, torch.float32), w)
            assert p.backend == "cublas" and "fp32 on CUDA" in p.reason, (op, p)
        with ops.use_backend("triton"):
            assert ops.plan(op, _OnCuda(40, 64, torch.float32), w).backend == "triton"
    # elementwise kernels keep Triton in fp32
    assert ops.plan("adalora_update_ipt", _OnCuda(8, 64, torch.float32)).backend == "triton"


@pytest.mark.skipif(not CAN_PLAN_CUDA, reason="needs Triton installed")
def test_cuda_rule_tiles_follow_the_arch(gpu_x, monkeypatch):
    from peftkern.kernels import lora_linear as L
    from peftkern.ops import tuning
    w = torch.empty(4096, 4096)
    for cap, fam in (((9, 0), 90), ((8, 0), 80), ((8, 9), 80), ((10, 0), 90)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        tuning.clear_caches()  # plans are cached per GPU: a new arch is a new GPU
        for M, regime in ((1, "small"), (16, "small"), (17, "large"), (8192, "large")):
            with ops.use_backend("triton"):
                p = ops.plan("lora_linear_fwd", _OnCuda(M, 4096, torch.bfloat16), w)
            assert p.config == L.CANDIDATES[regime][L.RULE[regime][fam]], (cap, M, p)
            assert "rule tiles" in p.reason


def test_bf16_matmuls_never_run_on_the_triton_interpreter():
    if not dispatch.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    x = torch.empty(4, 64, dtype=torch.bfloat16)
    p = ops.plan("lora_linear_fwd", x, torch.empty(32, 64, dtype=torch.bfloat16))
    assert p.backend != "triton" and "bf16 under the Triton interpreter" in p.reason
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="refuses bfloat16"):
        ops.plan("lora_linear_fwd", x, torch.empty(32, 64, dtype=torch.bfloat16))
    # quantize/dequantize only convert bf16: exact on the interpreter, so Triton stays
    assert ops.plan("quantize_4bit", x).backend == "triton"


@pytest.mark.skipif("cpp" not in ops.available(CPU), reason="needs the C++ extension")
def test_cpp_4bit_forward_is_the_gemv_within_its_range_else_panels():
    q = peftkern.quantize_4bit(torch.randn(32, 128), blocksize=64)
    with ops.use_backend("cpp"):
        assert ops.plan("qlora_linear_fwd", torch.empty(16, 128), q).config == "gemv"
        assert ops.plan("qlora_linear_fwd", torch.empty(17, 128), q).config == "panels"
        q2 = peftkern.quantize_4bit(torch.randn(32, 96), blocksize=64)  # blocks span rows
        assert ops.plan("qlora_linear_fwd", torch.empty(1, 96), q2).config == "panels"


def test_reference_4bit_matmul_names_its_dequantizer():
    q = peftkern.quantize_4bit(torch.randn(32, 64))
    with ops.use_backend("reference"):
        p = ops.plan("qlora_linear_fwd", torch.empty(3, 64), q)
    assert p == ("reference", "reference", p.reason) and "forced" in p.reason


def test_forcing_a_backend_that_cannot_run_raises_and_bad_ops_are_named():
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' is not available"):
        ops.plan("quantize_4bit", torch.empty(4, 64))
    with pytest.raises(ValueError, match="op must be one of"):
        ops.plan("matmul", torch.empty(4, 64))
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("tpu"):
            pass


def test_every_op_has_a_plan_on_cpu():
    q = peftkern.quantize_4bit(torch.randn(32, 64))
    weights = {"lora_linear_fwd": torch.empty(32, 64), "lora_linear_dx": torch.empty(32, 64),
               "qlora_linear_fwd": q, "qlora_linear_dx": q}
    for op, impls in dispatch.IMPLEMENTS.items():
        p = ops.plan(op, torch.empty(4, 64), weights.get(op))
        assert p.backend in impls and p.backend in ops.available(CPU) and p.reason, (op, p)


@pytest.mark.skipif(not CAN_PLAN_CUDA, reason="needs triton installed to plan a CUDA call")
def test_grouped_lora_runs_torch_ops_when_recorded_or_traced(gpu_x, monkeypatch):
    """Mixed-adapter batches: the Triton shrink/expand on CUDA, torch ops (which have a backward
    and need no host read of the row counts) when autograd records the call or compile traces it."""
    x = _OnCuda(64, 128, torch.bfloat16)
    assert dispatch.plan_grouped_lora(x, 256, 128, torch.bfloat16, False).backend == "triton"
    recorded = dispatch.plan_grouped_lora(x, 256, 128, torch.bfloat16, True)
    assert recorded.backend == "reference" and "autograd" in recorded.reason
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = dispatch.plan_grouped_lora(x, 256, 128, torch.bfloat16, False)
    assert traced.backend == "reference" and "compile" in traced.reason
