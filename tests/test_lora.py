"""Fused (Q)LoRA linear: forward and every gradient vs the float64 reference (DESIGN.md rule),
on every CPU backend (Triton runs interpreted), plus the modules, PEFT parity and compile."""
import itertools
import math

import pytest
import torch

import peftkern
from peftkern import ops
from peftkern import reference as R
from peftkern.nn import LoRALinear, QLoRALinear

from helpers import assert_error_rule

BACKENDS = [b for b in ops.available(torch.device("cpu")) if b in ("triton", "reference")]
WEIGHTS = ["dense", "nf4", "nf4-dq", "fp4", "fp4-dq"]
# Each case: (M, rank, N, K, bias, dropout, layout). N, K are not multiples of the 64-wide tiles
# nor (K) of the quantization block; the list rotates across weights x dtypes so that every value
# of every axis meets every weight kind and dtype.
VARIANTS = [
    (1, 1, 45, 100, True, 0.0, "2d"),
    (7, 8, 33, 70, False, 0.1, "3d"),
    (129, 16, 45, 100, True, 0.1, "transposed"),
    (7, 64, 70, 100, False, 0.0, "3d"),
    (0, 8, 33, 70, True, 0.0, "2d"),  # empty batch
]
CASES = [(w, dt, v) for (w, dt), v in zip(itertools.product(WEIGHTS, ["fp16", "fp32"]),
                                          itertools.cycle(VARIANTS))]
CASES += [(w, dt, VARIANTS[i]) for i, (w, dt) in enumerate(itertools.product(WEIGHTS[:3], ["fp16", "fp32"]))
          if i % 2 == 0]  # a few more combinations, kept small for the interpreter
DT = {"fp16": torch.float16, "fp32": torch.float32}


def _inputs(gen, weight_kind, dtype, M, r, N, K, bias, dropout, layout, blocksize=32):
    W32 = torch.randn(N, K, generator=gen) / math.sqrt(K)
    q = None
    if weight_kind != "dense":
        qt, dq = weight_kind.split("-")[0], weight_kind.endswith("-dq")
        q = peftkern.quantize_4bit(W32, qt, blocksize, double_quant=dq)
        W32 = peftkern.dequantize_4bit(q, torch.float32)  # the exact decoded weight
    if layout == "3d":
        x = torch.randn(3, M, K, generator=gen)
    elif layout == "transposed":
        x = torch.randn(K, M, generator=gen).t()  # non-contiguous
    else:
        x = torch.randn(M, K, generator=gen)
    A = torch.randn(r, K, generator=gen) / math.sqrt(K)
    B = torch.randn(N, r, generator=gen) / math.sqrt(r)
    b = torch.randn(N, generator=gen) if bias else None
    mask = None
    if dropout:
        mask = (torch.rand(x.shape, generator=gen) >= dropout).float() / (1 - dropout)
    dy = torch.randn(*x.shape[:-1], N, generator=gen)
    return W32, q, x, A, B, b, mask, dy


def _run(fn, x, A, B, b, dy):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, A, B, b)]
    y = fn(*leaves)
    y.backward(dy)
    return [y] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_kind, dt, variant", CASES,
                         ids=[f"{w}-{d}-M{v[0]}-r{v[1]}-{v[6]}{'-drop' if v[5] else ''}" for w, d, v in CASES])
def test_forward_and_gradients_follow_error_rule(backend, weight_kind, dt, variant, gen):
    M, r, N, K, bias, dropout, layout = variant
    dtype = DT[dt]
    W32, q, x, A, B, b, mask, dy = _inputs(gen, weight_kind, dtype, M, r, N, K, bias, dropout, layout)
    s = 0.75

    def ours(x_, A_, B_, b_):
        m = None if mask is None else mask.to(dtype)
        if q is None:
            return ops.lora_linear(x_, W32.to(dtype), b_, A_, B_, s, dropout_mask=m)
        return ops.qlora_linear(x_, q, b_, A_, B_, s, dropout_mask=m)

    def ref(dtype_):
        def f(x_, A_, B_, b_):
            return R.lora_linear(x_, W32.to(dtype_), b_, A_, B_, s,
                                 None if mask is None else mask.to(dtype_))
        cast = [t.to(dtype_) if t is not None else None for t in (x, A, B, b)]
        return _run(f, *cast, dy.to(dtype_))

    with ops.use_backend(backend):
        got = _run(ours, *[t.to(dtype) if t is not None else None for t in (x, A, B, b)], dy.to(dtype))
    oracle, baseline = ref(torch.float64), ref(dtype)
    for name, g, o, t in zip(["y", "dx", "dA", "dB", "dbias"], got, oracle, baseline):
        if o is not None:
            assert g.dtype == dtype, name
            assert_error_rule(name, g, o, t)


def test_pick_keeps_fp32_matmuls_off_triton_on_cuda_and_bf16_off_the_interpreter():
    """fp32 fused matmuls on CUDA run cuBLAS (the Triton FFMA kernels spill) unless Triton is
    forced; other kernels keep Triton. No GPU is needed: pick() only reads the device type."""
    from peftkern.ops.backends import pick, use_backend
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if "triton" in ops.available(cuda):
        assert pick(cuda, ops.BACKENDS, torch.float32, matmul=True) in ("cuda", "reference")
        assert pick(cuda, ops.BACKENDS, torch.bfloat16, matmul=True) == "triton"
        assert pick(cuda, ops.BACKENDS, torch.float32) == "triton"
        with use_backend("triton"):
            assert pick(cuda, ops.BACKENDS, torch.float32, matmul=True) == "triton"
    if "triton" in ops.available(cpu):  # the interpreter
        assert pick(cpu, ops.BACKENDS, torch.bfloat16, matmul=True) != "triton"
        with use_backend("triton"), pytest.raises(RuntimeError, match="refuses bfloat16"):
            pick(cpu, ops.BACKENDS, torch.bfloat16, matmul=True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (interpreter)")
@pytest.mark.parametrize("regime, M, N, K, weight_kind, blocksize", [
    ("small", 3, 150, 300, "dense", 32), ("large", 40, 45, 100, "dense", 32),
    ("small", 3, 150, 300, "nf4-dq", 32), ("large", 40, 45, 100, "nf4-dq", 32),  # blocks span rows
    # rows of whole blocks (the tile decoder): tiles narrower and wider than a block, partial tiles
    ("small", 3, 150, 384, "nf4-dq", 128), ("large", 40, 45, 320, "nf4-dq", 32),
    ("large", 20, 70, 192, "fp4", 64),
    # K and N multiples of every BLOCK_K: no K masks, dX tile rows never past the end
    ("small", 3, 256, 256, "nf4-dq", 64), ("large", 20, 128, 256, "nf4-dq", 64)])
def test_every_candidate_tile_config_is_correct(regime, M, N, K, weight_kind, blocksize, gen,
                                                monkeypatch):
    """Each configuration a GPU tuning run may pick (CANDIDATES in kernels/lora_linear.py), forced
    through the op as a tuned entry would be: forward and gradients follow the error rule (the
    interpreter checks the tiling and split-K, whose slices here span several BLOCK_K steps and
    end mid-tile in both passes; warps and stages only matter on a GPU)."""
    from peftkern.kernels.lora_linear import CANDIDATES
    W32, q, x, A, B, b, _, dy = _inputs(gen, weight_kind, torch.float32, M, 8, N, K, True, 0.0,
                                        "2d", blocksize)

    def ours(x_, A_, B_, b_):
        if q is None:
            return ops.lora_linear(x_, W32, b_, A_, B_, 0.5)
        return ops.qlora_linear(x_, q, b_, A_, B_, 0.5)

    def ref(dtype_):
        cast = [t.to(dtype_) for t in (x, A, B, b)]
        return _run(lambda *t: R.lora_linear(t[0], W32.to(dtype_), t[3], t[1], t[2], 0.5),
                    *cast, dy.to(dtype_))

    oracle, baseline = ref(torch.float64), ref(torch.float32)
    for cfg in CANDIDATES[regime]:
        monkeypatch.setattr(ops.lora, "_tuned", lambda *args, cfg=cfg: cfg)
        with ops.use_backend("triton"):
            got = _run(ours, x, A, B, b, dy)
        for name, g, o, t in zip(["y", "dx", "dA", "dB", "dbias"], got, oracle, baseline):
            assert_error_rule(f"{name} {cfg}", g, o, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_random_on_lora_branch_only(backend, gen):
    lin = torch.nn.Linear(40, 24)
    m = LoRALinear.from_linear(lin, r=4, lora_dropout=0.5)
    torch.nn.init.normal_(m.lora_B.weight)
    x = torch.randn(6, 40, generator=gen)
    with ops.use_backend(backend):
        m.eval()
        y_eval = m(x)
        m.train()
        y1, y2 = m(x), m(x)
        m.lora_dropout = 0.0
        y0 = m(x)
        m.lora_dropout = 0.5
        torch.nn.init.zeros_(m.lora_B.weight)
        y_base = m(x)  # training mode, dropout on, LoRA branch zero
    assert torch.equal(y0, y_eval)  # p = 0 and eval mode: identical, no mask
    assert not torch.allclose(y1, y2)  # fresh mask per call
    torch.testing.assert_close(y_base, lin(x))  # the base path is never dropped


# ---- modules ---------------------------------------------------------------------------------------


def test_lora_linear_module_is_a_drop_in(gen):
    lin = torch.nn.Linear(48, 20)
    m = LoRALinear.from_linear(lin, r=8, lora_alpha=16)
    assert m.weight is lin.weight and m.bias is lin.bias  # shared, not copied
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert torch.count_nonzero(m.lora_B.weight) == 0 and m.scaling == 2.0
    x = torch.randn(2, 5, 48, generator=gen)
    torch.testing.assert_close(m(x), lin(x))  # B = 0 at init: the layer is unchanged
    assert (m.in_features, m.out_features) == (48, 20)
    assert LoRALinear.from_linear(lin, r=4, use_rslora=True, lora_alpha=8).scaling == 4.0


def test_lora_merge_unmerge(gen):
    m = LoRALinear.from_linear(torch.nn.Linear(48, 20), r=8)
    torch.nn.init.normal_(m.lora_B.weight)
    x = torch.randn(5, 48, generator=gen)
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_qlora_merge_is_lossy_measured_and_unmerge_exact(gen):
    lin = torch.nn.Linear(128, 24)
    m = QLoRALinear.from_linear(lin, r=8, compute_dtype=torch.float32)
    torch.nn.init.normal_(m.lora_B.weight, std=0.01)
    before = m.state_dict()
    x = torch.randn(5, 128, generator=gen)
    y = m(x)
    err = m.merge()
    # requantizing W + sBA costs at most half a code step: <= absmax/2 per block (NF4 gaps < 1)
    assert 0 < err <= float(peftkern.dequantize_4bit(m.qweight, torch.float32).abs().max())
    assert (m(x) - y).abs().max() < 0.5
    m.unmerge()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(m(x), y)


def test_qlora_quant_storage_bf16_for_fsdp(gen):
    lin = torch.nn.Linear(64, 16)
    m = QLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    ref = QLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32)
    assert m.weight.dtype == torch.bfloat16 and m.weight.shape == (256, 1)
    with torch.no_grad():
        torch.nn.init.normal_(m.lora_B.weight)
        ref.lora_A.weight.copy_(m.lora_A.weight)
        ref.lora_B.weight.copy_(m.lora_B.weight)
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)  # same bytes, other storage dtype


def test_qlora_state_dict_round_trip_and_shape_check(gen):
    m = QLoRALinear.from_linear(torch.nn.Linear(64, 16), r=4, quant_type="fp4", compute_dtype=torch.float32)
    torch.nn.init.normal_(m.lora_B.weight)
    m2 = QLoRALinear.from_linear(torch.nn.Linear(64, 16), r=4, compute_dtype=torch.float32)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(m2(x), m(x)) and m2.quant_type == "fp4"
    other = QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="checkpoint shape"):
        other.load_state_dict(m.state_dict())


# ---- parity with PEFT (CPU) ----------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _peft_model(base, **cfg):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(torch.nn.Sequential(base), LoraConfig(target_modules=["0"], **cfg))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return model, layer


def _copy_lora(ours, layer):
    with torch.no_grad():
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)


def _compare_step(ours, theirs, ours_layer, their_layer, x, rtol, atol):
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    torch.testing.assert_close(yo, yt, rtol=rtol, atol=atol)
    yo.square().sum().backward()
    yt.square().sum().backward()
    torch.testing.assert_close(xo.grad, xt.grad, rtol=rtol, atol=atol)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours_layer, name).weight.grad,
                                   getattr(their_layer, name)["default"].weight.grad, rtol=rtol, atol=atol)


def test_parity_with_peft_lora_over_linear(gen):
    base = torch.nn.Linear(96, 40)
    ours = LoRALinear.from_linear(torch.nn.Linear(96, 40), r=8, lora_alpha=16)
    ours.load_state_dict({**base.state_dict(), **{k: v for k, v in ours.state_dict().items() if "lora" in k}})
    _, layer = _peft_model(base, r=8, lora_alpha=16)
    _copy_lora(ours, layer)
    _compare_step(ours, layer, ours, layer, torch.randn(2, 7, 96, generator=gen), 1e-5, 1e-5)


def test_parity_with_peft_lora_over_bnb_linear4bit(gen):
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(40, 128, generator=gen) * 0.05, requires_grad=False,
                                    quant_type="nf4")
    base.bias = torch.nn.Parameter(torch.randn(40, generator=gen), requires_grad=False)
    base = base.to("cpu")
    ours = QLoRALinear.from_bnb(base, r=8, lora_alpha=16)
    assert ours.weight.data_ptr() == base.weight.data_ptr()  # bytes shared, not re-quantized
    _, layer = _peft_model(base, r=8, lora_alpha=16)
    _copy_lora(ours, layer)
    _compare_step(ours, layer, ours, layer, torch.randn(3, 128, generator=gen), 1e-5, 1e-5)


# ---- torch.compile -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend, gen):
    lin1, lin2 = torch.nn.Linear(64, 48), torch.nn.Linear(48, 16)
    net = torch.nn.Sequential(LoRALinear.from_linear(lin1, r=4), torch.nn.GELU(),
                              QLoRALinear.from_linear(lin2, r=4, compute_dtype=torch.float32))
    for m in (net[0], net[2]):
        torch.nn.init.normal_(m.lora_B.weight)
    x = torch.randn(5, 64, generator=gen)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        eager = net(x)
        eager.sum().backward()
        g_eager = [p.grad.clone() for p in net.parameters() if p.requires_grad]
        net.zero_grad()
        out = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
        out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(g_eager, [p for p in net.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors():
    W, A, B = torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="in_features=16 as its last dimension"):
        ops.lora_linear(torch.randn(3, 15), W, None, A, B, 1.0)
    with pytest.raises(TypeError, match="lora_B must have dtype in \\(float16\\), got float32"):
        ops.lora_linear(x, W, None, A.half(), B, 1.0)  # the adapters share one dtype
    with pytest.raises(TypeError, match="lora_A must have dtype in \\(float32, float16, bfloat16\\)"):
        ops.lora_linear(x, W, None, A.double(), B.double(), 1.0)
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.lora_linear(x, W.double(), None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B must be \\[out_features=8, r=4\\]"):
        ops.lora_linear(x, W, None, A, torch.randn(8, 3), 1.0)
    with pytest.raises(ValueError, match="lora_A is on meta"):
        ops.lora_linear(x, W, None, A.to("meta"), B, 1.0)
    with pytest.raises(ValueError, match="bias must have out_features=8"):
        ops.lora_linear(x, W, torch.randn(7), A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.lora_linear(x, W, None, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="qweight must be a peftkern.QuantizedWeight"):
        ops.qlora_linear(x, W, None, A, B, 1.0)
    with pytest.raises(ValueError, match="r must be an int in \\[1, min"):
        LoRALinear.from_linear(torch.nn.Linear(16, 8), r=9)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        QLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_any_k_tiles_no_restriction(gen):
    """The fused kernel masks partial tiles and decodes by flat index: K = 1 or odd is fine."""
    for K in (1, 3, 33):
        for backend in BACKENDS:
            W = torch.randn(5, K, generator=gen)
            q = peftkern.quantize_4bit(W, blocksize=32)
            x, A, B = torch.randn(2, K, generator=gen), torch.randn(1, K, generator=gen), torch.randn(5, 1, generator=gen)
            with ops.use_backend(backend):
                y = ops.qlora_linear(x, q, None, A, B, 1.0)
            want = R.lora_linear(x.double(), peftkern.dequantize_4bit(q, torch.float32).double(), None,
                                 A.double(), B.double(), 1.0)
            assert_error_rule(f"K={K}", y, want, R.lora_linear(x, peftkern.dequantize_4bit(q), None, A, B, 1.0))


# ---- the C++ CPU decode GEMV (csrc/cpu/qlora_gemv.cpp) ----------------------------------------------

HAS_CPP = "cpp" in ops.available(torch.device("cpu"))


def quantized(W, *args):
    """A 4-bit weight and its exact fp32 dequantization, made by the torch reference (under the
    interpreter the default backend is interpreted Triton: slow, and not what is tested here)."""
    with ops.use_backend("reference"):
        q = peftkern.quantize_4bit(W, *args)
        return q, q.dequantize(torch.float32)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("simd", [2, 1, 0], ids=["best", "avx2", "scalar"])
@pytest.mark.parametrize("M, N, K, blocksize, qt, dq, bias", [
    (1, 33, 64, 64, "nf4", True, True), (7, 45, 256, 32, "fp4", False, False),
    (16, 70, 1024, 64, "nf4", True, True), (9, 5, 128, 128, "fp4", True, False),
    (0, 8, 64, 64, "nf4", False, True), (12, 17, 4096, 4096, "nf4", False, True),
    # AVX2 from M=5 on decodes 4 rows x 256 codes into L1: a partial chunk and row tail (K=320,
    # N=6), every x-row tail (M=13: 3+3+3+3+1, M=5: 3+2), a chunk shorter than 256 (K=96)
    (13, 6, 320, 32, "nf4", True, False), (5, 9, 96, 32, "fp4", False, True)])
def test_cpu_decode_gemv_follows_error_rule(simd, M, N, K, blocksize, qt, dq, bias, gen):
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    q, Wd = quantized(W, qt, blocksize, dq)
    x = torch.randn(M, K, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    A, B = torch.randn(8, K, generator=gen) / K ** 0.5, torch.randn(N, 8, generator=gen) / 8 ** 0.5
    want = R.lora_linear(x.double(), Wd.double(), None if b is None else b.double(), A.double(), B.double(), 0.5)
    base = R.lora_linear(x, Wd, b, A, B, 0.5)
    got = ops.backends.EXT.qlora_gemv(x, q.data.view(-1), q.absmax, q.absmax2, q.code8,
                                      None if q.offset is None else q.offset.reshape(1),
                                      0 if qt == "nf4" else 1, blocksize, N, b, x @ A.t(), B, 0.5, simd)
    assert_error_rule("y", got, want, base)
    if simd == 2:  # and through the public op, which dispatches here for fp32, M <= 16
        with ops.use_backend("cpp"):
            assert_error_rule("qlora_linear", ops.qlora_linear(x, q, b, A, B, 0.5), want, base)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 9])
def test_cpu_gemv_takes_16bit_activations(M, dtype, gen, gemv_calls):
    """bf16/fp16 x on CPU runs the fused GEMV (fp32 inside, one rounding) and follows the rule."""
    N, K = 37, 192
    q, Wd = quantized(torch.randn(N, K, generator=gen) / K ** 0.5, "nf4", 64, True)
    x = torch.randn(M, 2 * K, generator=gen).to(dtype)[:, ::2]  # non-contiguous
    b = torch.randn(N, generator=gen).to(dtype)
    A, B = torch.randn(4, K, generator=gen).to(dtype), torch.randn(N, 4, generator=gen).to(dtype)
    with ops.use_backend("cpp"):
        y = ops.qlora_linear(x, q, b, A, B, 0.5)
    assert gemv_calls == [M] and y.dtype == dtype
    want = R.lora_linear(x.double(), Wd.double(), b.double(), A.double(), B.double(), 0.5)
    assert_error_rule("y", y, want, R.lora_linear(x, Wd.to(dtype), b, A, B, 0.5))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_cpu_gemv_dispatch_falls_back_outside_its_range(gen):
    """M > 16 or blocks spanning rows: the panel path, still correct."""
    for M, K, dtype in [(17, 64, torch.float32), (17, 64, torch.float16), (3, 96, torch.float32)]:
        q, Wd = quantized(torch.randn(9, K, generator=gen), "nf4", 64)
        x = torch.randn(M, K, generator=gen).to(dtype)
        A, B = torch.randn(2, K, generator=gen).to(dtype), torch.randn(9, 2, generator=gen).to(dtype)
        with ops.use_backend("cpp"):
            y = ops.qlora_linear(x, q, None, A, B, 1.0)
        want = R.lora_linear(x.double(), Wd.double(), None, A.double(), B.double(), 1.0)
        assert_error_rule(f"M={M} K={K} {dtype}", y, want, R.lora_linear(x, Wd.to(dtype), None, A, B, 1.0))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("N, K, blocksize, qt, dq, dtype", [
    (300, 96, 32, "nf4", True, torch.float32), (33, 64, 64, "fp4", False, torch.float32),
    (100, 256, 32, "nf4", True, torch.float16), (41, 200, 64, "nf4", False, torch.float16),
    (1100, 80, 64, "fp4", True, torch.float32), (9, 40, 128, "nf4", False, torch.float32)])
def test_cpu_panel_path_forward_and_dx_follow_error_rule(N, K, blocksize, qt, dq, dtype, gen,
                                                         monkeypatch):
    """M > 16 on CPU: the weight is dequantized panel by panel (tiny panels here, so there are many,
    with blocks and nested blocks spanning rows and a short last panel)."""
    monkeypatch.setattr(ops.lora, "PANEL_ELEMS", 64)
    with ops.use_backend("cpp"):  # the interpreted Triton quantizer would only make this slow
        q, Wd = quantized(torch.randn(N, K, generator=gen) / K ** 0.5, qt, blocksize, dq)
    x = torch.randn(2, 11, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    A = (torch.randn(4, K, generator=gen) / K ** 0.5).to(dtype)
    B = (torch.randn(N, 4, generator=gen) / 2).to(dtype)
    gy = torch.randn(2, 11, N, generator=gen).to(dtype)
    got_x, ref_x = x.clone().requires_grad_(), x.double().requires_grad_()
    with ops.use_backend("cpp"):
        y = ops.qlora_linear(got_x, q, b, A, B, 0.5)
        (dx,) = torch.autograd.grad(y, got_x, gy)
    want = R.lora_linear(ref_x, Wd.double(), b.double(), A.double(), B.double(), 0.5)
    (want_dx,) = torch.autograd.grad(want, ref_x, gy.double())
    base_x = x.clone().requires_grad_()
    base = R.lora_linear(base_x, Wd.to(dtype), b, A, B, 0.5)
    (base_dx,) = torch.autograd.grad(base, base_x, gy)
    assert_error_rule("y", y, want, base)
    assert_error_rule("dx", dx, want_dx, base_dx)
