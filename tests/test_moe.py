"""LoRA on mixture-of-experts weights: `ops.expert_lora_linear` (dense and 4-bit experts) vs the
float64 reference under the DESIGN.md error rule, forward and every gradient, on every CPU
backend (Triton interpreted); PEFT `target_parameters` parity on tiny random MoE models."""
import math
from types import SimpleNamespace

import pytest
import torch

import peftkern
from peftkern import ops
from peftkern import reference as R

from helpers import CPU_BACKENDS, assert_error_rule

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# (group sizes, N, K, r, weight, bias, layout): an empty expert, a lone row, odd N and K; 4-bit
# experts with whole blocks per row (K % 64 == 0) and blocks spanning rows (K = 96, blocksize 64)
CASES = [
    ((5, 0, 1, 9), 37, 70, 4, "dense", True, "transposed"),
    ((3, 7, 2), 45, 128, 8, "nf4-dq", False, "-"),
    ((4, 4), 33, 96, 2, "fp4", True, "-"),
    ((6, 1, 0, 3), 40, 64, 4, "dense", False, "no-lora"),
]


def _inputs(gen, sizes, N, K, r, kind, bias, layout):
    E = len(sizes)
    W = torch.randn(E, N, K, generator=gen) / math.sqrt(K)
    w = W
    if layout == "transposed":  # a [E, K, N] parameter used as [E, N, K] (is_transposed)
        w = W.transpose(1, 2).contiguous().transpose(1, 2)
    if kind != "dense":
        w = [peftkern.quantize_4bit(W[e], kind.split("-")[0], 64, double_quant=kind.endswith("-dq"))
             for e in range(E)]
        W = torch.stack([peftkern.dequantize_4bit(q, torch.float32) for q in w])
    A = B = None
    if layout != "no-lora":
        A = torch.randn(E, r, K, generator=gen) / math.sqrt(K)
        B = torch.randn(E, N, r, generator=gen) / math.sqrt(r)
    b = torch.randn(E, N, generator=gen) if bias else None
    x = torch.randn(sum(sizes), K, generator=gen)
    dy = torch.randn(sum(sizes), N, generator=gen)
    return w, W, A, B, b, x, dy


def _grads(fn, tensors, dy):
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dt", ["fp16", "fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-E{len(c[0])}-{c[6]}" for c in CASES])
def test_expert_lora_linear_follows_error_rule(case, dt, gen):
    dtype = DTYPES[dt]
    sizes = case[0]
    w, W, A, B, b, x, dy = _inputs(gen, *case)
    weight = w.to(dtype) if isinstance(w, torch.Tensor) else w
    s = 0.5

    def ref(dtype_):
        return _grads(lambda x_, A_, B_, b_: R.expert_lora_linear(x_, W.to(dtype_), b_, A_, B_, s,
                                                                  sizes),
                      [None if t is None else t.to(dtype_) for t in (x, A, B, b)], dy.to(dtype_))

    oracle, baseline = ref(torch.float64), ref(dtype)
    for backend in CPU_BACKENDS:
        if (backend == "triton" and dtype == torch.bfloat16) or \
                (backend == "cpp" and isinstance(w, torch.Tensor)):
            continue  # the interpreter's bf16 is wrong; no dense C++ matmul
        with ops.use_backend(backend):
            got = _grads(lambda x_, A_, B_, b_: ops.expert_lora_linear(
                x_, weight, b_, A_, B_, s, torch.tensor(sizes)),
                [None if t is None else t.to(dtype) for t in (x, A, B, b)], dy.to(dtype))
        for name, g, o, t in zip(["y", "dx", "dA", "dB", "dbias"], got, oracle, baseline):
            if o is not None:
                assert g.dtype == dtype, name
                assert_error_rule(f"{name}[{backend}]", g, o, t)


def test_bad_input_names_the_argument(gen):
    w, _, A, B, b, x, _ = _inputs(gen, *CASES[0])
    sizes = list(CASES[0][0])
    with pytest.raises(ValueError, match="group_sizes must be >= 0 and sum to the rows of x"):
        ops.expert_lora_linear(x, w, b, A, B, 0.5, sizes[:-1] + [0])
    with pytest.raises(ValueError, match="group_sizes must have num_experts=4"):
        ops.expert_lora_linear(x, w, b, A, B, 0.5, sizes[:-1])
    with pytest.raises(ValueError, match="lora_A and lora_B must hold num_experts=4"):
        ops.expert_lora_linear(x, w, b, A[:3], B, 0.5, sizes)
    with pytest.raises(ValueError, match="bias must be \\[num_experts=4, out_features=37\\]"):
        ops.expert_lora_linear(x, w, b[:, :-1], A, B, 0.5, sizes)
    with pytest.raises(TypeError, match="weight must be a \\[E, N, K\\] tensor"):
        ops.expert_lora_linear(x, [w[0]], b, A, B, 0.5, sizes)


# ---- PEFT target_parameters on tiny random MoE models (no download) ------------------------------


def _moe_model(kind):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2_moe":  # experts [E, out, in], gate_up concatenated
        cfg = transformers.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                          num_experts=4, num_experts_per_tok=2,
                                          shared_expert_intermediate_size=32, **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:  # gpt-oss: experts [E, in, out] (is_transposed), with biases, its own gate
        cfg = transformers.GptOssConfig(intermediate_size=32, num_local_experts=4,
                                        num_experts_per_tok=2, head_dim=16, **common)
        cls = transformers.GptOssForCausalLM
    torch.manual_seed(0)
    return cls(cfg)


@pytest.mark.parametrize("kind", ["qwen2_moe", "gpt_oss"])
def test_enable_fuses_expert_lora_and_matches_peft(kind, monkeypatch):
    peft = pytest.importorskip("peft")
    import peftkern.integrations.peft as pk
    from peftkern.ops import moe
    from helpers import assert_same_run, loss_and_grads, randomize_lora, tokens
    model = peft.get_peft_model(_moe_model(kind), peft.LoraConfig(
        target_modules=["q_proj"], r=4, lora_alpha=8,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    randomize_lora(model)
    ids = tokens()
    want = loss_and_grads(model, ids)
    assert pk.enable(model) == 4 and pk.coverage(model) == {"fused": 4}
    calls, real = [], moe.experts_forward
    monkeypatch.setattr(moe, "experts_forward", lambda *a: calls.append(1) or real(*a))
    for backend in [b for b in CPU_BACKENDS if b in ("triton", "reference")]:
        calls.clear()
        with ops.use_backend(backend):
            got = loss_and_grads(model, ids)
        assert len(calls) == 2  # both MoE blocks ran fused
        assert sum(".experts." in n and "lora_" in n for n in got[2]) == 8
        assert_same_run(got, want)
    assert pk.disable(model) == 4


def test_grouped_mm_path_matches_the_per_expert_path(gen):
    """The CUDA path (torch._grouped_mm: one launch per product for all experts) has the
    per-expert path's values; checked here on CPU tensors, forward only (torch's CPU grouped GEMM
    has no backward), and where dispatch takes it."""
    from peftkern.ops import dispatch, moe
    from peftkern.ops.backends import cublas
    sizes = (5, 0, 3, 8)
    _, W, A, B, b, x, _ = _inputs(gen, sizes, 40, 64, 16, "dense", True, "-")
    idx = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    offsets = torch.cumsum(torch.tensor(sizes), 0, dtype=torch.int32)
    with torch.no_grad():
        got = cublas.expert_linear(x, W, b, A, B, 0.5, offsets, idx)
        want = moe.grouped_expert_linear(x, W, b, A, B, 0.5, list(sizes))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    xb, Wb, Ab, Bb = x.bfloat16(), W.bfloat16(), A.bfloat16(), B.bfloat16()
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=xb.dtype, shape=xb.shape)  # read of x
    assert dispatch.plan_experts(xb, Wb, Ab, Bb).backend == "per-expert"  # CPU
    assert dispatch.plan_experts(cuda, Wb, Ab, Bb).backend == "cublas"
    assert dispatch.plan_experts(cuda, [None] * 4, Ab, Bb).backend == "per-expert"  # 4-bit experts
    assert dispatch.plan_experts(cuda, Wb, Ab[:, :4], Bb[:, :, :4]).backend == "per-expert"  # r=4:
    assert dispatch.plan_experts(cuda, W, A, B).backend == "per-expert"  # 8-byte strides; fp32
    with ops.use_backend("triton"):  # a forced backend runs its own fused op per expert
        assert dispatch.plan_experts(cuda, Wb, Ab, Bb).backend == "per-expert"
