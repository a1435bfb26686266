"""The C++ extension peftkern._C, called directly through torch.ops.peftkern_C.

The oracle below is the spec written in plain torch (bitsandbytes 0.50's CPU path): quantize and
dequantize must equal it bit for bit. Where bitsandbytes is installed the oracle is also checked
against it. The CUDA kernel is not run here (no GPU in CI); .ci/nvcc_check compiles it.
"""
import itertools
import os
import shutil
import subprocess
import zlib

import pytest
import torch

from peftkern import codes, reference

try:
    import peftkern._C  # noqa: F401  (registers torch.ops.peftkern_C)
except ImportError as e:  # built with PEFTKERN_NO_EXT=1, or not built
    pytest.skip(f"peftkern._C is not built: {e}", allow_module_level=True)

OPS = torch.ops.peftkern_C
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED = codes.NESTED_BLOCKSIZE


# ---------------------------------------------------------------------------------------------
# The spec is peftkern.reference (itself checked against bitsandbytes in test_format.py).
# ---------------------------------------------------------------------------------------------
def spec_quantize(A, quant_type, blocksize):
    return reference.quantize_4bit(A, quant_type, blocksize)


def spec_dequantize(packed, absmax, quant_type, blocksize, n, dtype, absmax2=None, code8=None,
                    offset=None):
    if absmax.dtype == torch.uint8:
        absmax = reference.dequantize_absmax(absmax, absmax2, code8, offset.reshape(()))
    return reference.dequantize_4bit(packed, absmax, quant_type, blocksize, (n,), dtype)


def nest_absmax(absmax):
    """bnb's double quantization of absmax; the C++ op takes the offset as a 1-element tensor."""
    q8, absmax2, code8, offset = reference.double_quantize(absmax)
    return q8, absmax2, code8.clone(), offset.reshape(1)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_input(n, dtype, *key):
    g = _gen(n, dtype, *key)
    x = torch.randn(n, generator=g) * torch.rand(1, generator=g).item() * 4
    if n >= 64:  # some outliers and an all-zero stretch (an all-zero block when it covers one)
        idx = torch.randint(0, n, (max(1, n // 97),), generator=g)
        x[idx] *= 20
        start = int(torch.randint(0, n - 32, (1,), generator=g))
        x[start:start + 32] = 0
    return x.to(dtype)


def sizes(blocksize):
    """numel: odd and even, multiples of blocksize and not, a partial block alone."""
    return sorted({1, 2, 64, 7 * 33, 3 * 4096, blocksize, 2 * blocksize + 1, 3 * blocksize + 6,
                   5 * blocksize - 3})


BLOCKSIZES = codes.BLOCKSIZES


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_code_table_equals_python(quant_type):
    table = OPS.code_table(codes.QUANT_TYPE_ID[quant_type])
    assert table.dtype == torch.float32 and table.device.type == "cpu" and table.shape == (16,)
    # bit-equal, -0.0 included
    assert torch.equal(table.view(torch.int32), codes.code_table(quant_type).view(torch.int32))


def test_schemas():
    assert str(OPS.quantize_4bit.default._schema) == (
        "peftkern_C::quantize_4bit(Tensor A, int quant_type, int blocksize) "
        "-> (Tensor packed, Tensor absmax)")
    assert str(OPS.dequantize_4bit.default._schema) == (
        "peftkern_C::dequantize_4bit(Tensor packed, Tensor absmax, Tensor? absmax2, "
        "Tensor? code8, Tensor? offset, int quant_type, int blocksize, int numel, "
        "ScalarType dtype, int simd_level=3) -> Tensor")
    assert str(OPS.code_table.default._schema) == (
        "peftkern_C::code_table(int quant_type) -> Tensor")


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------
def check_quantize(A, quant_type, blocksize):
    n = A.numel()
    packed, absmax = OPS.quantize_4bit(A, codes.QUANT_TYPE_ID[quant_type], blocksize)
    ref_packed, ref_absmax = spec_quantize(A, quant_type, blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // blocksize),)
    assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32)), (n, blocksize)
    mismatch = (packed != ref_packed).nonzero()
    assert mismatch.numel() == 0, f"n={n}: {mismatch.numel()} bytes differ, first at {mismatch[:4]}"
    return packed, absmax


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_equals_spec(quant_type, blocksize, dtype):
    for n in sizes(blocksize):
        check_quantize(random_input(n, dtype, quant_type, blocksize), quant_type, blocksize)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_shapes_are_flattened(quant_type):
    A = random_input(6 * 160, torch.float32, "shape").view(6, 10, 16)
    packed, absmax = check_quantize(A, quant_type, 64)
    packed2, absmax2 = OPS.quantize_4bit(A.reshape(-1), codes.QUANT_TYPE_ID[quant_type], 64)
    assert torch.equal(packed, packed2) and torch.equal(absmax, absmax2)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_bucket_edges(quant_type):
    """Values exactly on the bucket bounds (strict `<`), one ulp either side, the table values,
    +-0, tiny blocks whose max is below 1e-38, and an all-zero full block."""
    bounds = codes.bucket_bounds(quant_type)
    table = codes.code_table(quant_type)
    edges = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)),
                       torch.nextafter(bounds, torch.tensor(-2.0)), table,
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-3, -1e-3])])
    for bs in (32, 64, 128):
        pieces = []
        for i in range(0, edges.numel(), bs - 1):  # every block holds 1.0: s == x exactly
            blk = torch.ones(bs)
            chunk = edges[i:i + bs - 1]
            blk[:chunk.numel()] = chunk
            pieces.append(blk)
        pieces += [torch.zeros(bs), torch.full((bs,), 1e-40), torch.full((bs,), -3e-39)]
        x = torch.cat(pieces)
        for tail in (x[:5], x[:bs - 1], torch.tensor([1e-40, -5e-41, 0.0])):  # partial blocks
            check_quantize(torch.cat([x, tail]), quant_type, bs)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_reciprocal_vs_division(quant_type):
    """Full blocks multiply by 1/absmax, the partial last block divides by absmax: values whose
    bucket depends on which of the two is done, in both kinds of block."""
    bounds = codes.bucket_bounds(quant_type)
    for am in (0.3, 1.7, 3.0):
        am = torch.tensor(am)
        near = (bounds * am).view(torch.int32)[:, None] + torch.arange(-300, 300, dtype=torch.int32)
        x = near.view(torch.float32).reshape(-1)
        by_div = torch.bucketize((x / am).clamp(-1, 1), bounds)
        by_mul = torch.bucketize((x * (1.0 / am)).clamp(-1, 1), bounds)
        x = x[by_div != by_mul]
        assert x.numel() >= 2
        bs = 32
        vals = torch.cat([am[None], x])[:bs - 1]
        full = torch.zeros(bs)
        full[:vals.numel()] = vals
        check_quantize(torch.cat([full, vals]), quant_type, bs)  # a full, then a partial block


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_nonfinite_like_torch(quant_type):
    """The Python layer refuses NaN/Inf; the kernel still follows torch's NaN semantics."""
    bs = 64
    x = random_input(5 * bs + 7, torch.float32, "nonfinite")
    x[3] = float("nan")
    x[bs + 5] = float("inf")
    x[2 * bs + 1] = -float("inf")
    x[4 * bs + 2] = float("nan")
    x[5 * bs + 3] = float("inf")  # in the partial block
    packed, absmax = OPS.quantize_4bit(x, codes.QUANT_TYPE_ID[quant_type], bs)
    ref_packed, ref_absmax = spec_quantize(x, quant_type, bs)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax.isnan(), ref_absmax.isnan())
    assert torch.equal(absmax.nan_to_num(), ref_absmax.nan_to_num())


def test_quantize_empty():
    packed, absmax = OPS.quantize_4bit(torch.empty(0), 0, 64)
    assert packed.shape == (0,) and absmax.shape == (0,)


# ---------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------
def random_packed(n, blocksize, *key):
    g = _gen(n, blocksize, *key)
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(-(-n // blocksize), generator=g) * 3
    absmax[::7] = 0
    return packed, absmax


SIMD_LEVELS = (2, 1, 0)  # the best the CPU has, at most AVX2, scalar: every path on any machine


def check_dequantize(packed, absmax, quant_type, blocksize, n, dtype, nested=None):
    absmax2, code8, offset = nested if nested is not None else (None, None, None)
    ref = spec_dequantize(packed, absmax, quant_type, blocksize, n, dtype, absmax2, code8, offset)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    nan = ref.isnan()  # bit for bit, except that NaN payloads may differ (torch's own paths do)
    for simd in SIMD_LEVELS:
        out = OPS.dequantize_4bit(packed, absmax, absmax2, code8, offset,
                                  codes.QUANT_TYPE_ID[quant_type], blocksize, n, dtype, simd)
        key = (quant_type, blocksize, n, dtype, simd)
        assert out.dtype == dtype and out.shape == (n,)
        assert torch.equal(out.isnan(), nan), key
        assert torch.equal(out.view(bits)[~nan], ref.view(bits)[~nan]), key


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_equals_spec(quant_type, blocksize):
    for n, dtype in itertools.product(sizes(blocksize), FLOAT_DTYPES):
        packed, absmax = random_packed(n, blocksize, quant_type)
        check_dequantize(packed, absmax, quant_type, blocksize, n, dtype)


@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_nested_absmax_equals_spec(quant_type, blocksize):
    # enough blocks for several absmax2 groups of 256 blocks, and a partial last group
    for n, dtype in itertools.product((1, 7 * 33, 600 * blocksize + 17, 3 * 4096), FLOAT_DTYPES):
        packed, absmax = random_packed(n, blocksize, quant_type, "nested")
        q, absmax2, code8, offset = nest_absmax(absmax)
        check_dequantize(packed, q, quant_type, blocksize, n, dtype, (absmax2, code8, offset))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_nonfinite_absmax(quant_type):
    """A NaN or infinite absmax (a corrupt checkpoint) decodes as torch rounds it: NaN stays NaN
    in every dtype (a NaN payload carried into bf16's sign bit by the rounding add gave -0.0)."""
    n, blocksize = 4 * 64, 64
    packed = torch.randint(0, 256, (n // 2,), generator=_gen("nonfinite"), dtype=torch.uint8)
    nan_payload = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    absmax = torch.cat([torch.tensor([float("nan"), float("inf"), 1.5]), nan_payload])
    for dtype in FLOAT_DTYPES:
        check_dequantize(packed, absmax, quant_type, blocksize, n, dtype)


def test_dequantize_nested_is_not_fused():
    """(code8[q] * absmax2) + offset rounds twice: with a = b = 1 + 2^-23 and offset
    -(1 + 2^-22) the product rounds to 1 + 2^-22 and the sum is exactly 0; a fused multiply-add
    would give 2^-46."""
    a = 1.0 + 2.0**-23
    code8 = torch.full((256,), a)
    absmax2 = torch.tensor([a])
    offset = torch.tensor([-(1.0 + 2.0**-22)])
    assert (code8[:1] * absmax2 + offset).item() == 0.0
    q = torch.zeros(2, dtype=torch.uint8)
    packed = torch.full((32,), 0xFF, dtype=torch.uint8)  # NF4 code 15 = 1.0
    for dtype in FLOAT_DTYPES:
        check_dequantize(packed, q, "nf4", 32, 64, dtype, (absmax2, code8, offset))
        out = OPS.dequantize_4bit(packed, q, absmax2, code8, offset, 0, 32, 64, dtype)
        assert (out == 0).all()


def test_dequantize_roundtrip():
    A = random_input(4096 + 33, torch.float32, "roundtrip")
    for qt in QUANT_TYPES:
        packed, absmax = OPS.quantize_4bit(A, codes.QUANT_TYPE_ID[qt], 64)
        out = OPS.dequantize_4bit(packed, absmax, None, None, None, codes.QUANT_TYPE_ID[qt], 64,
                                  A.numel(), torch.float32)
        assert (out - A).abs().max() <= absmax.max() * 0.2


# ---------------------------------------------------------------------------------------------
# Against bitsandbytes itself (skipped when it is not installed)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bnbF():
    F = pytest.importorskip("bitsandbytes.functional")
    # bnb wraps its default CPU path in torch.compile (one recompile per shape: slow for a test);
    # eager runs the same torch ops.
    with torch._dynamo.config.patch(disable=True):
        yield F


@pytest.mark.parametrize("blocksize", (32, 64, 2048, 4096))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_against_bitsandbytes(bnbF, quant_type, blocksize):
    qid = codes.QUANT_TYPE_ID[quant_type]
    for n, dtype in itertools.product((1, 7 * 33, 3 * 4096, 2 * blocksize + 6), FLOAT_DTYPES):
        A = random_input(n, dtype, "bnb", quant_type, blocksize)
        packed, absmax = OPS.quantize_4bit(A, qid, blocksize)
        bp, st = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=False)
        assert torch.equal(packed, bp.reshape(-1)) and torch.equal(absmax, st.absmax)
        out = OPS.dequantize_4bit(packed, absmax, None, None, None, qid, blocksize, n, dtype)
        assert torch.equal(out, bnbF.dequantize_4bit(bp, st).reshape(-1))
        # nested absmax
        bp, st = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=True)
        out = OPS.dequantize_4bit(bp.reshape(-1), st.absmax, st.state2.absmax, st.state2.code,
                                  st.offset.reshape(1), qid, blocksize, n, dtype)
        assert torch.equal(out, bnbF.dequantize_4bit(bp, st).reshape(-1))


# ---------------------------------------------------------------------------------------------
# Safety-net checks of the extension
# ---------------------------------------------------------------------------------------------
def test_refuses_bad_arguments():
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        OPS.quantize_4bit(torch.ones(64), 0, 48)
    with pytest.raises(RuntimeError, match="quant_type must be 0"):
        OPS.quantize_4bit(torch.ones(64), 7, 64)
    with pytest.raises(RuntimeError, match="A must be float32, float16 or bfloat16"):
        OPS.quantize_4bit(torch.ones(64, dtype=torch.float64), 0, 64)
    with pytest.raises(RuntimeError, match="A must be contiguous"):
        OPS.quantize_4bit(torch.ones(8, 16).t(), 0, 64)
    packed, absmax = OPS.quantize_4bit(torch.randn(128), 0, 64)
    with pytest.raises(RuntimeError, match="packed has 64 elements, expected 32"):
        OPS.dequantize_4bit(packed, absmax, None, None, None, 0, 64, 64, torch.float32)
    with pytest.raises(RuntimeError, match="absmax has 2 elements, expected 3"):
        OPS.dequantize_4bit(torch.zeros(70, dtype=torch.uint8), absmax, None, None, None, 0, 64,
                            140, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16"):
        OPS.dequantize_4bit(packed, absmax, None, None, None, 0, 64, 128, torch.float64)
    with pytest.raises(RuntimeError, match="absmax must be Float"):
        OPS.dequantize_4bit(packed, absmax.half(), None, None, None, 0, 64, 128, torch.float32)
    with pytest.raises(RuntimeError, match="needs absmax2, code8 and offset"):
        OPS.dequantize_4bit(packed, absmax.to(torch.uint8), None, None, None, 0, 64, 128,
                            torch.float32)
    with pytest.raises(RuntimeError, match="code8 has 255 elements"):
        OPS.dequantize_4bit(packed, absmax.to(torch.uint8), torch.ones(1), torch.ones(255),
                            torch.zeros(1), 0, 64, 128, torch.float32)


def test_gemv_row_limit_matches_python():
    """The GEMV's M limit (kMaxGemvRows in codes.h) is the one peftkern.codes dispatches by."""
    rows = codes.GEMV_MAX_ROWS
    packed, absmax = OPS.quantize_4bit(torch.randn(8 * 64), 0, 64)
    for M in (rows, rows + 1):
        call = lambda: OPS.qlora_gemv(torch.randn(M, 64), packed, absmax, None, None, None, 0, 64,
                                      8, None, None, None, 1.0)
        if M <= rows:
            assert call().shape == (M, 8)
        else:
            with pytest.raises(RuntimeError, match=f"takes at most {rows} rows"):
                call()


# ---------------------------------------------------------------------------------------------
# The CUDA compile check: part of the README's test command, so CI runs it.
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc not installed")
def test_cuda_sources_compile_without_spills():
    """Every csrc/cuda/*.cu for sm_80 and sm_90a; the ptxas report must show no spills."""
    run = subprocess.run(["bash", os.path.join(ROOT, ".ci", "nvcc_check")], capture_output=True,
                         text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sm_80" in run.stdout and "sm_90a" in run.stdout


CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")


@pytest.mark.skipif(shutil.which("g++") is None or
                    not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_runtime.h")),
                    reason="g++ or the CUDA headers not installed")
def test_cuda_bindings_compile(tmp_path):
    """csrc/bindings.cpp as the GPU build compiles it (PEFTKERN_WITH_CUDA), syntax only, so that a
    CPU machine catches a broken binding of the CUDA kernels before a GPU session does. The CPU
    torch wheel ships the c10/cuda headers but not the generated cuda_cmake_macros.h: an empty one
    stands in."""
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("")
    includes = [str(tmp_path), *include_paths(), CUDA_INCLUDE, os.path.join(ROOT, "csrc"),
                os.path.join(ROOT, "csrc", "include"), sysconfig.get_paths()["include"]]
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-w", "-DPEFTKERN_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=_C", *[f"-I{p}" for p in includes],
           os.path.join(ROOT, "csrc", "bindings.cpp")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
