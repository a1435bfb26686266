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


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (interpreter)")
@pytest.mark.parametrize("regime, M, N, K, weight_kind, blocksize", [
    ("small", 3, 150, 300, "dense", 32), ("large", 40, 45, 100, "dense", 32),
    ("small", 3, 150, 300, "nf4-dq", 32), ("large", 40, 45, 100, "nf4-dq", 32),  # blocks span rows
    # rows of whole blocks (the tile decoder): tiles narrower and wider than a block, partial tiles
    ("small", 3, 150, 384, "nf4-dq", 128), ("large", 40, 45, 320, "nf4-dq", 32),
    ("large", 20, 70, 192, "fp4", 64),
    # K and N multiples of every BLOCK_K: no K masks, dX tile rows never past the end
    ("small", 3, 256, 256, "nf4-dq", 64), ("large", 20, 128, 256, "nf4-dq", 64)])
def test_every_candidate_tile_config_is_correct(regime, M, N, K, weight_kind, blocksize, gen):
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
        with ops.use_backend("triton"), ops.use_config(cfg):
            got = _run(ours, x, A, B, b, dy)
        for name, g, o, t in zip(["y", "dx", "dA", "dB", "dbias"], got, oracle, baseline):
            assert_error_rule(f"{name} {cfg}", g, o, t)



@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (interpreter)")
@pytest.mark.parametrize("dt", ["fp16", "fp32"])
@pytest.mark.parametrize("M, N, K, weight_kind, blocksize", [
    (1, 150, 512, "nf4-dq", 64),   # 2 or 4 blocks per K step, the last output tile partial
    (3, 70, 384, "fp4", 128),      # one or 2 blocks per step; K ends mid-step (a dead sub-step)
    (5, 64, 768, "nf4", 256),      # blocks longer than a K step: one scale per tile row
    (2, 150, 96, "nf4-dq", 32)])   # 8 blocks per step; tiles start mid-group of 256 blocks
def test_swapped_forward_scales_blocks_after_the_mma(M, N, K, weight_kind, blocksize, dt, gen):
    """The swapped small-M forward multiplies the codes' table values (in the activation dtype)
    and scales each quantization block's partial sum after the MMA (`_block_scaled_mma`): every
    swapped candidate follows the error rule against the exactly decoded weight, in fp16 (16-bit
    pair table) and fp32 (fp32 pair table)."""
    from peftkern.kernels.lora_linear import CANDIDATES
    dtype = DT[dt]
    W32, q, x, A, B, b, _, _ = _inputs(gen, weight_kind, dtype, M, 8, N, K, True, 0.0, "2d",
                                       blocksize)
    cast = [t.to(dtype) for t in (x, A, B, b)]
    oracle = R.lora_linear(*[t.double() for t in (x,)], W32.double(), b.double(), A.double(),
                           B.double(), 0.5)
    baseline = R.lora_linear(cast[0], W32.to(dtype), cast[3], cast[1], cast[2], 0.5)
    swapped = [c for c in CANDIDATES["small"] if c.get("SWAP")]
    assert swapped
    for cfg in swapped:
        with ops.use_backend("triton"), ops.use_config(cfg):
            got = ops.qlora_linear(cast[0], q, cast[3], cast[1], cast[2], 0.5)
        assert got.dtype == dtype
        assert_error_rule(f"y {cfg}", got, oracle, baseline)

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


def test_checks_passed_once_still_refuse_what_differs():
    """The checks are skipped only for a signature (dtypes, devices, shapes, scalars) that passed:
    anything that differs in what they read is checked again."""
    W, A, B = torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)
    x = torch.randn(3, 16)
    for _ in range(2):
        ops.lora_linear(x, W, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B must be \\[out_features=8, r=4\\]"):
        ops.lora_linear(x, W, None, A, torch.randn(8, 3), 1.0)
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.lora_linear(x, W.half(), None, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.lora_linear(x, W, None, A, B, 1.0, dropout_p=True)  # equal to 1 (int), but a bool
    with pytest.raises(ValueError, match="in_features=16 as its last dimension"):
        ops.lora_linear(torch.randn(3, 15), W, None, A, B, 1.0)  # x's shape is checked per call
    q = peftkern.quantize_4bit(W)
    ops.qlora_linear(x, q, None, A, B, 1.0)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        ops.qlora_linear(x, q, None, A, B, 1.0, compute_dtype=torch.float64)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_eager_path_equals_the_custom_op(gen, quantized):
    """Eager calls on plain tensors skip the custom op (the backend directly, or an autograd
    Function around the same forward and backward): outputs and gradients are bit-identical."""
    N, K, r = 24, 40, 4
    W = torch.randn(N, K, generator=gen)
    q = peftkern.quantize_4bit(W, blocksize=32, double_quant=True)
    mask = (torch.rand(6, K, generator=gen) > 0.2).float() / 0.8
    backends = [b for b in ops.available(torch.device("cpu"))
                if b in ops.dispatch.IMPLEMENTS["qlora_linear_fwd" if quantized else "lora_linear_fwd"]]
    for backend in backends:
        runs = []
        for route in ("public", "custom op"):
            x = torch.randn(6, K, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            A = torch.randn(r, K, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
            B = torch.randn(N, r, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
            with ops.use_backend(backend):
                if route == "public" and quantized:
                    y = ops.qlora_linear(x, q, None, A, B, 0.5, dropout_mask=mask)
                elif route == "public":
                    y = ops.lora_linear(x, W, None, A, B, 0.5, dropout_mask=mask)
                elif quantized:
                    y = torch.ops.peftkern.qlora_linear_fwd(
                        x, q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type,
                        q.blocksize, N, None, A, B, 0.5, mask, torch.float32)[0]
                else:
                    y = torch.ops.peftkern.lora_linear_fwd(x, W, None, A, B, 0.5, mask)[0]
                y.backward(torch.randn(6, N, generator=torch.Generator().manual_seed(4)))
            runs.append((y.detach(), x.grad, A.grad, B.grad))
        for name, a, b in zip(("y", "dx", "dA", "dB"), *runs):
            assert torch.equal(a, b), f"{backend}: {name} differs between the eager path and the op"


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_frozen_lora_A_computes_no_dA_and_the_same_rest(gen, quantized):
    """LoRA-FA (lora_A frozen): no dA, and dX, dB, dbias bit for bit as with A trainable; a frozen
    bias gets no gradient."""
    N, K, r = 24, 40, 4
    W = torch.randn(N, K, generator=gen)
    q = peftkern.quantize_4bit(W, blocksize=32)
    bias = torch.randn(N, generator=gen)
    g = torch.randn(6, N, generator=gen)
    op = "qlora_linear_fwd" if quantized else "lora_linear_fwd"
    for backend in [b for b in ops.available(torch.device("cpu")) if b in ops.dispatch.IMPLEMENTS[op]]:
        runs = []
        for train_A in (True, False):
            x = torch.randn(6, K, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            A = torch.randn(r, K, generator=torch.Generator().manual_seed(2)).requires_grad_(train_A)
            B = torch.randn(N, r, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
            b = bias.clone().requires_grad_(train_A)  # trainable in the first run only
            with ops.use_backend(backend):
                y = (ops.qlora_linear(x, q, b, A, B, 0.5) if quantized
                     else ops.lora_linear(x, W, b, A, B, 0.5))
            with _CountOps() as count:
                y.backward(g)
            runs.append((x.grad, A.grad, B.grad, b.grad, count.calls))
        (dx1, dA1, dB1, db1, ops1), (dx2, dA2, dB2, db2, ops2) = runs
        assert dA1 is not None and db1 is not None and dA2 is None and db2 is None, backend
        assert torch.equal(dx1, dx2) and torch.equal(dB1, dB2), backend
        # the backward itself skipped them: one matmul (dA: an addmm with s as alpha) and the
        # bias reduction fewer
        gemms = [c["mm"] + c["addmm"] for c in (ops1, ops2)]
        assert gemms[1] == gemms[0] - 1 and ops2["sum"] == ops1["sum"] - 1, (backend, ops1, ops2)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_frozen_lora_A_keeps_no_input(gen, quantized):
    """LoRA-FA: with lora_A (and the base weight) frozen the fused backward keeps only xA, not x;
    double backward then asks for the reference backend (plain torch keeps what it needs)."""
    N, K, r = 24, 40, 4
    W = torch.randn(N, K, generator=gen)
    q = peftkern.quantize_4bit(W, blocksize=32)
    op = "qlora_linear_fwd" if quantized else "lora_linear_fwd"
    fused = [b for b in ops.available(torch.device("cpu"))
             if b in ops.dispatch.IMPLEMENTS[op] and b != "reference"]
    for backend in fused:
        for train_A in (True, False):
            x = torch.randn(6, K, generator=gen).requires_grad_(True)
            A = torch.randn(r, K, generator=gen).requires_grad_(train_A)
            B = torch.randn(N, r, generator=gen).requires_grad_(True)
            with ops.use_backend(backend):
                y = ops.qlora_linear(x, q, None, A, B, 0.5) if quantized else \
                    ops.lora_linear(x, W, None, A, B, 0.5)
            kept = y.grad_fn.saved_tensors[0]
            assert (kept is x) if train_A else (kept is None), (backend, train_A)
            if not train_A:
                with pytest.raises(RuntimeError, match="use_backend\\('reference'\\)"):
                    torch.autograd.grad(y.square().sum(), x, create_graph=True)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.calls = __import__("collections").Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


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


# ---- (IA)³: the output scale ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_kind, dt", [("dense", "fp16"), ("nf4-dq", "fp32"),
                                             ("dense", "fp32"), ("fp4", "fp16")])
def test_output_scale_forward_and_gradients_follow_error_rule(backend, weight_kind, dt, gen):
    """`(x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) ⊙ scale + bias`: y and every gradient (dscale too), and the
    inference epilogue equal to the training path."""
    dtype = DT[dt]
    W32, q, x, A, B, b, mask, dy = _inputs(gen, weight_kind, dtype, 9, 4, 37, 96, True, 0.1, "3d")
    scale = torch.rand(37, generator=gen) + 0.5
    s = 0.75

    def ours(x_, A_, B_, b_, sc_):
        m = mask.to(dtype)
        if q is None:
            return ops.lora_linear(x_, W32.to(dtype), b_, A_, B_, s, dropout_mask=m, scale=sc_)
        return ops.qlora_linear(x_, q, b_, A_, B_, s, dropout_mask=m, scale=sc_)

    def ref(dtype_):
        def f(x_, A_, B_, b_, sc_):
            return R.lora_linear(x_, W32.to(dtype_), None, A_, B_, s, mask.to(dtype_)) * sc_ + b_
        leaves = [t.to(dtype_).clone().requires_grad_() for t in (x, A, B, b, scale)]
        y = f(*leaves)
        y.backward(dy.to(dtype_))
        return [y] + [t.grad for t in leaves]

    leaves = [t.to(dtype).clone().requires_grad_() for t in (x, A, B, b, scale)]
    with ops.use_backend(backend):
        y = ours(*leaves)
        y.backward(dy.to(dtype))
        with torch.no_grad():
            y_inf = ours(*[t.detach() for t in leaves])
    got = [y] + [t.grad for t in leaves]
    oracle, baseline = ref(torch.float64), ref(dtype)
    for name, g, o, t in zip(["y", "dx", "dA", "dB", "dbias", "dscale"], got, oracle, baseline):
        assert_error_rule(name, g, o, t)
    assert_error_rule("y (epilogue)", y_inf, oracle[0], baseline[0])


def test_output_scale_is_checked(gen):
    W32, _, x, A, B, b, _, _ = _inputs(gen, "dense", torch.float32, 4, 4, 37, 96, True, 0.0, "2d")
    with pytest.raises(ValueError, match="scale must have out_features=37"):
        ops.lora_linear(x, W32, b, A, B, 0.5, scale=torch.ones(36))
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ops.lora_linear(x, W32, b, A, B, 0.5, scale=[1.0] * 37)
