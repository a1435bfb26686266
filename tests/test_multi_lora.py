"""Mixed-adapter batches: `ops.multi_lora_linear` (one adapter per row, grouped shrink/expand
kernels) vs the float64 reference under the DESIGN.md error rule on every CPU backend (Triton
interpreted), its gradients through the torch path, and bad input."""
import math

import pytest
import torch

import peftkern
from peftkern import ops
from peftkern import reference as R

from helpers import CPU_BACKENDS, assert_error_rule

BACKENDS = [b for b in CPU_BACKENDS if b in ("triton", "reference")]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# (T rows, n adapters, ranks, N, K, layout, weight): ranks differ (zero-padded stacks), rows of
# no adapter (-1) and adapters with no row appear; 41 rows make a partial 16-row block per adapter
CASES = [
    (41, 3, (4, 1, 20), 37, 70, "2d", "dense"),
    (12, 1, (8,), 45, 64, "3d", "nf4-dq"),
    (33, 5, (2, 2, 2, 16, 3), 64, 96, "transposed", "dense"),
    (0, 2, (4, 4), 33, 64, "2d", "nf4-dq"),
    (17, 4, (4, 8, 1, 2), 33, 128, "2d", "nf4"),
]


def _inputs(gen, T, n, ranks, N, K, layout, kind):
    W = torch.randn(N, K, generator=gen) / math.sqrt(K)
    w = W
    if kind != "dense":
        w = peftkern.quantize_4bit(W, kind.split("-")[0], 64, double_quant=kind.endswith("-dq"))
        W = peftkern.dequantize_4bit(w, torch.float32)
    r = max(ranks)
    A, B = torch.zeros(n, r, K), torch.zeros(n, N, r)
    for a, ra in enumerate(ranks):  # smaller ranks zero-padded, as the stacks take them
        A[a, :ra] = torch.randn(ra, K, generator=gen) / math.sqrt(K)
        B[a, :, :ra] = torch.randn(N, ra, generator=gen) / math.sqrt(ra)
    s = torch.rand(n, generator=gen) + 0.5
    idx = torch.randint(-1, n, (T,), generator=gen)
    if n > 1 and T:
        idx[idx == n - 1] = 0  # the last adapter gets no row
    x = torch.randn(T, K, generator=gen)
    if layout == "3d":
        x = torch.randn(3, T // 3, K, generator=gen)
    elif layout == "transposed":
        x = torch.randn(K, T, generator=gen).t()
    b = torch.randn(N, generator=gen)
    return w, W, x, A, B, s, idx, b


@pytest.mark.parametrize("dt", ["fp16", "fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-n{c[1]}-{c[5]}-{c[6]}" for c in CASES])
def test_forward_follows_error_rule(case, dt, gen):
    dtype = DTYPES[dt]
    w, W, x, A, B, s, idx, b = _inputs(gen, *case)
    weight = w.to(dtype) if isinstance(w, torch.Tensor) else w
    args = (A.to(dtype), B.to(dtype), s, idx)
    oracle = R.multi_lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(),
                                 s.double(), idx)
    baseline = R.multi_lora_linear(x.to(dtype), W.to(dtype), b.to(dtype), *args[:2], s.to(dtype),
                                   idx)
    for backend in BACKENDS:
        if backend == "triton" and dtype == torch.bfloat16:
            continue  # the interpreter's bf16 is wrong: dispatch refuses it
        with ops.use_backend(backend), torch.no_grad():
            got = ops.multi_lora_linear(x.to(dtype), weight, b.to(dtype), *args)
        assert got.dtype == dtype and got.shape == oracle.shape
        assert_error_rule(f"y[{backend}]", got, oracle, baseline)


def test_fp32_adapters_on_a_16bit_base_and_gradients(gen):
    """The torch path (autograd records): dx and the stacks' gradients, fp32 adapters on fp16."""
    w, W, x, A, B, s, idx, b = _inputs(gen, *CASES[0])
    dy = torch.randn(x.shape[0], W.shape[0], generator=gen)

    def run(fn, dtype, ldtype):
        leaves = [x.to(dtype).requires_grad_(), A.to(ldtype).requires_grad_(),
                  B.to(ldtype).requires_grad_()]
        y = fn(leaves[0], W.to(dtype), b.to(dtype), leaves[1], leaves[2])
        y.backward(dy.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    oracle = run(lambda *a: R.multi_lora_linear(*a, s.double(), idx), torch.float64, torch.float64)
    baseline = run(lambda x_, W_, b_, A_, B_: R.multi_lora_linear(
        x_.float(), W_.float(), b_.float(), A_, B_, s, idx).to(x_.dtype), torch.float16,
        torch.float32)
    got = run(lambda *a: ops.multi_lora_linear(*a, s, idx), torch.float16, torch.float32)
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float32
    for name, g, o, t in zip(["y", "dx", "dA", "dB"], got, oracle, baseline):
        assert_error_rule(name, g, o, t, rel_atol=1e-2 if name in ("y", "dx") else 1e-6)


def test_one_launch_pair_for_any_number_of_adapters(gen, monkeypatch):
    """Triton: two kernel launches per call whatever the adapter count (time flat in it)."""
    if "triton" not in BACKENDS:
        pytest.skip("needs Triton (interpreter)")
    from peftkern.kernels import multi_lora
    launches = []
    for name in ("_shrink_kernel", "_expand_kernel"):
        kernel = getattr(multi_lora, name)
        monkeypatch.setattr(multi_lora, name, _Counting(kernel, launches, name))
    for n in (1, 4, 16):
        w, _, x, A, B, s, idx, b = _inputs(gen, 40, n, (4,) * n, 33, 64, "2d", "dense")
        launches.clear()
        with ops.use_backend("triton"), torch.no_grad():
            ops.multi_lora_linear(x, w, b, A, B, s, idx)
        assert launches == ["_shrink_kernel", "_expand_kernel"], n


class _Counting:
    def __init__(self, kernel, log, name):
        self.kernel, self.log, self.name = kernel, log, name

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_bad_input_names_the_argument(gen):
    w, _, x, A, B, s, idx, b = _inputs(gen, *CASES[0])
    with pytest.raises(ValueError, match="adapter_index entries must be in \\[-1, 2\\]"):
        ops.multi_lora_linear(x, w, b, A, B, s, idx.clamp(min=0) + 3)
    with pytest.raises(ValueError, match="adapter_index must have one entry per row of x \\(41\\)"):
        ops.multi_lora_linear(x, w, b, A, B, s, idx[:-1])
    with pytest.raises(TypeError, match="adapter_index must have dtype"):
        ops.multi_lora_linear(x, w, b, A, B, s, idx.float())
    with pytest.raises(ValueError, match="B_stack must be \\[n_adapters=3"):
        ops.multi_lora_linear(x, w, b, A, B[:2], s, idx)
    with pytest.raises(ValueError, match="A_stack must be"):
        ops.multi_lora_linear(x, w, b, A[:, :, :-1], B, s, idx)
    with pytest.raises(ValueError, match="scalings must have n_adapters=3"):
        ops.multi_lora_linear(x, w, b, A, B, [1.0, 2.0], idx)
    with pytest.raises(ValueError, match="x must have in_features=70"):
        ops.multi_lora_linear(x[:, :-1], w, b, A, B, s, idx)


def test_compile_runs_the_torch_path(gen):
    """Under torch.compile the grouped op takes its torch path (the row counts are read on the
    host: a graph break, not an error) and gives the eager values."""
    w, _, x, A, B, s, idx, b = _inputs(gen, *CASES[0])

    def f(x_):
        return ops.multi_lora_linear(x_, w, b, A, B, s, idx)

    with torch.no_grad():
        want = f(x)
        torch._dynamo.reset()
        got = torch.compile(f, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
