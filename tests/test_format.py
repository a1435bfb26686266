"""The 4-bit format: byte-identical to bitsandbytes on every backend, bad input refused."""
import json

import pytest
import torch

import peftkern
from peftkern import QuantizedWeight, codes, ops

from helpers import CPU_BACKENDS

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = codes.BLOCKSIZES
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd shapes; the interpreted Triton backend gets the small ones only.
SHAPES = [(1, 64), (3, 4096), (7, 33), (33, 129)]


def _weight(gen, shape, dtype, scale=None):
    scale = torch.rand(1, generator=gen).item() * 4 + 0.01 if scale is None else scale
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _bnb_dequantize(packed, st, dtype=None):
    """bnb's pure-torch dequantization (its format definition).

    Not `F.dequantize_4bit`: on AVX512 CPUs bnb 0.50.2's native kernel returns wrong weights when
    in_features is not a multiple of blocksize (e.g. 40x96 at blocksize 64).
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    with torch._dynamo.config.patch(disable=True):  # bnb compiles per odd shape: slow, not tested
        return _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax,
                                        F.get_4bit_type(st.quant_type, device="cpu"), st.blocksize,
                                        st.shape, dtype or st.dtype)


def _bnb_quantize(W, qt, bs, double):
    packed, st = F.quantize_4bit(W, blocksize=bs, quant_type=qt, compress_statistics=double)
    return packed, st, _bnb_dequantize(packed, st)


def _assert_same_as_bnb(q: QuantizedWeight, packed, st):
    assert torch.equal(q.data.view(-1), packed.view(-1)), "packed bytes differ"
    assert torch.equal(q.absmax, st.absmax), "absmax differs"
    if st.nested:
        assert q.nested
        assert torch.equal(q.absmax2, st.state2.absmax), "nested absmax differs"
        assert torch.equal(q.offset, st.offset), "offset differs"
        assert torch.equal(q.code8, st.state2.code), "nested table differs"
    else:
        assert not q.nested


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
def test_matches_bitsandbytes(backend, quant_type, double, blocksize, shape, gen):
    dtype = DTYPES[(blocksize + shape[0]) % 3]  # rotate input dtypes across the matrix
    W = _weight(gen, shape, dtype)
    packed, st, deq = _bnb_quantize(W, quant_type, blocksize, double)
    with ops.use_backend(backend):
        q = peftkern.quantize_4bit(W, quant_type, blocksize, double_quant=double)
        _assert_same_as_bnb(q, packed, st)
        out = peftkern.dequantize_4bit(q)
    assert out.dtype == dtype and out.shape == W.shape
    assert torch.equal(out, deq), "dequantized weight differs from bitsandbytes"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_dequantize_dtypes_match_bitsandbytes(backend, out_dtype, double, gen):
    W = _weight(gen, (5, 320), torch.float32)
    packed, st, _ = _bnb_quantize(W, "nf4", 64, double)
    q = peftkern.from_bnb(bnb.nn.Params4bit(packed, quant_state=st, bnb_quantized=True))
    with ops.use_backend(backend):
        out = peftkern.dequantize_4bit(q, out_dtype)
    assert torch.equal(out, _bnb_dequantize(packed, st, out_dtype))


def test_large_weight_matches_bitsandbytes(gen):
    """4096x11008 trimmed to 1024 rows; the fastest CPU backend only (the interpreter is too slow)."""
    W = _weight(gen, (1024, 11008), torch.bfloat16)
    packed, st, deq = _bnb_quantize(W, "nf4", 64, True)
    with ops.use_backend("cpp" if "cpp" in CPU_BACKENDS else "reference"):
        q = peftkern.quantize_4bit(W)
        _assert_same_as_bnb(q, packed, st)
        assert torch.equal(peftkern.dequantize_4bit(q), deq)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs_quantize_like_contiguous_copies(backend, gen):
    base = _weight(gen, (96, 130), torch.float16)
    views = {"transposed": base.t(), "strided": base[::2, 1:], "expanded": base[:1].expand(5, 130)}
    with ops.use_backend(backend):
        for name, W in views.items():
            assert not W.is_contiguous()
            a, b = peftkern.quantize_4bit(W, "fp4", 32), peftkern.quantize_4bit(W.contiguous(), "fp4", 32)
            assert torch.equal(a.data, b.data) and torch.equal(a.absmax, b.absmax), name
            assert peftkern.dequantize_4bit(a).shape == W.shape


def test_edge_values(gen):
    """All-zero blocks, a single element, exact table values and ties between buckets."""
    W = torch.zeros(4, 64)
    W[1, :16] = codes.code_table("nf4")
    W[2] = codes.bucket_bounds("nf4").repeat(5)[:64]  # values exactly on the midpoints
    W[3, 0] = 1e-30
    for qt, double in [("nf4", True), ("fp4", False), ("fp4", True)]:
        packed, st, deq = _bnb_quantize(W, qt, 64, double)
        for backend in CPU_BACKENDS:
            with ops.use_backend(backend):
                q = peftkern.quantize_4bit(W, qt, 64, double_quant=double)
                _assert_same_as_bnb(q, packed, st)
                assert torch.equal(peftkern.dequantize_4bit(q), deq)
    one = torch.tensor([[0.37]])
    packed, st, deq = _bnb_quantize(one, "nf4", 64, False)
    _assert_same_as_bnb(peftkern.quantize_4bit(one, double_quant=False), packed, st)


def test_reference_tables_match_bitsandbytes():
    for qt in codes.QUANT_TYPES:
        assert torch.equal(codes.code_table(qt), F.get_4bit_type(qt, device="cpu"))
    assert torch.equal(codes.dynamic_map(), F.create_dynamic_map())



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
def test_byte_pair_tables_hold_both_nibbles(quant_type, dtype):
    """The fused GEMM's byte lookup: entry b holds the values of b's high nibble (low half, the
    even column) and low nibble (high half), each rounded once to `dtype`."""
    t = codes.code_table(quant_type).to(dtype)
    pairs = codes.byte_pair_table(quant_type, dtype)
    assert pairs.dtype == (torch.int64 if dtype == torch.float32 else torch.int32)
    both = pairs.view(dtype).reshape(256, 2)
    b = torch.arange(256)
    assert torch.equal(both[:, 0], t[b >> 4]) and torch.equal(both[:, 1], t[b & 15])
    assert torch.equal(codes.byte_pair_table(quant_type),
                       codes.byte_pair_table(quant_type, torch.float32))


# ---- bitsandbytes interop -------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", codes.QUANT_TYPES)
@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_params4bit_round_trip_shares_bytes(quant_type, double, gen):
    lin = bnb.nn.Linear4bit(96, 40, bias=False, quant_type=quant_type,
                            compress_statistics=double, compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(_weight(gen, (40, 96), torch.float32), requires_grad=False,
                                   quant_type=quant_type, compress_statistics=double)
    lin = lin.to("cpu")  # bnb quantizes on the move
    p = lin.weight
    ref = _bnb_dequantize(p.data, p.quant_state)
    q = peftkern.from_bnb(lin)
    assert q.data.data_ptr() == p.data.data_ptr()
    for backend in CPU_BACKENDS:
        with ops.use_backend(backend):
            assert torch.equal(peftkern.dequantize_4bit(q), ref)
    back = peftkern.to_bnb(q)
    assert back.data_ptr() == p.data_ptr()
    assert torch.equal(_bnb_dequantize(back.data, back.quant_state), ref)


def test_quant_storage_bf16_round_trips(gen):
    W = _weight(gen, (8, 64), torch.bfloat16)
    q = peftkern.quantize_4bit(W, quant_storage=torch.bfloat16)
    assert q.data.dtype == torch.bfloat16 and q.data.shape == (128, 1)
    assert torch.equal(peftkern.dequantize_4bit(q), peftkern.dequantize_4bit(peftkern.quantize_4bit(W)))
    back = peftkern.from_bnb(peftkern.to_bnb(q))
    assert back.quant_storage == torch.bfloat16 and torch.equal(peftkern.dequantize_4bit(back), peftkern.dequantize_4bit(q))


# ---- serialization ----------------------------------------------------------------------------


@pytest.mark.parametrize("double", [True, False], ids=["dq", "plain"])
def test_safetensors_round_trip(tmp_path, double, gen):
    W = _weight(gen, (17, 96), torch.float16)
    q = peftkern.quantize_4bit(W, "fp4", 32, double_quant=double)
    path = str(tmp_path / "w.safetensors")
    q.save(path)
    r = QuantizedWeight.load(path)
    assert (r.shape, r.dtype, r.blocksize, r.quant_type, r.nested) == \
        (q.shape, q.dtype, q.blocksize, q.quant_type, q.nested)
    assert torch.equal(peftkern.dequantize_4bit(r), peftkern.dequantize_4bit(q))


def test_state_dict_is_a_bnb_linear4bit_checkpoint(gen):
    """Our state dict loads the way transformers loads a bnb checkpoint, and bnb's loads into ours."""
    W = _weight(gen, (24, 64), torch.float32)
    q = peftkern.quantize_4bit(W)
    sd = q.state_dict()
    p = bnb.nn.Params4bit.from_prequantized(sd["weight"], {k: v for k, v in sd.items() if k != "weight"},
                                            device="cpu")
    assert torch.equal(_bnb_dequantize(p.data, p.quant_state), peftkern.dequantize_4bit(q))
    lin = bnb.nn.Linear4bit(64, 24, bias=False, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4")
    bnb_sd = lin.to("cpu").state_dict()
    assert set(bnb_sd) == set(sd)
    r = QuantizedWeight.from_state_dict(bnb_sd)
    assert torch.equal(peftkern.dequantize_4bit(r), peftkern.dequantize_4bit(q))


def test_to_device_moves_every_tensor(gen):
    q = peftkern.quantize_4bit(_weight(gen, (8, 64), torch.float32))
    assert q.to("cpu") is q
    m = q.to("meta")
    assert all(t.device.type == "meta" for t in m._tensors().values())
    assert m.shape == q.shape and m.nested


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1.0, float("nan")]]), "weight contains 1 NaN/Inf"),
    (torch.tensor([[1.0, float("inf")]]), "weight contains 1 NaN/Inf"),
    (torch.ones(2, 64, dtype=torch.int32), "weight must have dtype"),
    (torch.ones(2, 64, dtype=torch.float64), "weight must have dtype"),
    (torch.ones(64), "weight must have 2 dimensions, got 1"),
    (torch.ones(2, 2, 64), "weight must have 2 dimensions, got 3"),
    (torch.ones(0, 64), "weight must not be empty"),
    ([[1.0]], "weight must be a torch.Tensor"),
])
def test_bad_weight_is_refused(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        peftkern.quantize_4bit(bad)


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0, -64, 64.0, True, "64"])
def test_bad_blocksize_is_refused(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two in"):
        peftkern.quantize_4bit(torch.ones(2, 64), blocksize=blocksize)


def test_bad_quant_type_and_storage_are_refused():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        peftkern.quantize_4bit(torch.ones(2, 64), quant_type="int4")
    with pytest.raises(ValueError, match="quant_storage"):
        peftkern.quantize_4bit(torch.ones(1, 3), quant_storage=torch.float32)
    with pytest.raises(TypeError, match="qweight must be a peftkern.QuantizedWeight"):
        peftkern.dequantize_4bit(torch.ones(2, 2))
    with pytest.raises(ValueError, match="dtype must be one of"):
        peftkern.dequantize_4bit(peftkern.quantize_4bit(torch.ones(2, 64)), torch.int8)


def _corrupt(sd, key, fn):
    sd = dict(sd)
    sd[key] = fn(sd[key])
    return sd


@pytest.mark.parametrize("damage, match", [
    (lambda sd: {k: v for k, v in sd.items() if k != "weight.absmax"}, "missing 'weight.absmax'"),
    (lambda sd: _corrupt(sd, "weight", lambda t: t[:-1]), "data holds 383 bytes, expected 384"),
    (lambda sd: _corrupt(sd, "weight.absmax", lambda t: t[:-1]), "absmax has 11 elements"),
    (lambda sd: _corrupt(sd, "weight.absmax", lambda t: t.float()), "absmax must have dtype"),
    (lambda sd: _corrupt(sd, "weight.nested_absmax", lambda t: t * float("nan")), "nested absmax contains"),
    (lambda sd: _corrupt(sd, "weight.quant_map", lambda t: t.flip(0)), "not the standard nf4 table"),
    (lambda sd: _corrupt(sd, "weight.quant_state.bitsandbytes__nf4", lambda t: t[:-3]),
     "corrupted quant_state metadata"),
    (lambda sd: _corrupt(sd, "weight.quant_state.bitsandbytes__nf4", lambda t: torch.tensor(
        list(json.dumps({**json.loads(bytes(t.tolist())), "blocksize": 48}).encode()),
        dtype=torch.uint8)), "blocksize must be a power of two"),
    (lambda sd: _corrupt(sd, "weight.quant_state.bitsandbytes__nf4", lambda t: torch.tensor(
        list(json.dumps({**json.loads(bytes(t.tolist())), "shape": [3, 64]}).encode()),
        dtype=torch.uint8)), "data holds 384 bytes, expected 96"),
])
def test_corrupted_state_dict_is_refused(damage, match):
    q = peftkern.quantize_4bit(torch.randn(12, 64))
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        QuantizedWeight.from_state_dict(damage(q.state_dict()))


def test_truncated_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    peftkern.quantize_4bit(torch.randn(12, 64)).save(str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        QuantizedWeight.load(str(path))


def test_forced_backend_must_exist():
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("magic"):
            pass
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        with ops.use_backend("cuda"):
            peftkern.quantize_4bit(torch.ones(2, 64))
