"""`pk.enable` keeps PEFT's results: precision, copies, pickling, gradients of every kind, and the
configurations that fall back or fuse (GPT-2 Conv1D, lora_bias, several adapters, patterns)."""
import contextlib
import copy
import functools
import io
import pickle

import pytest
import torch
from torch import nn

import peftkern
from peftkern import ops

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402

import peftkern.integrations.peft as pk  # noqa: E402
from peftkern.adalora import RankAllocator  # noqa: E402
from helpers import assert_error_rule  # noqa: E402
from helpers import (LINEARS, assert_same_run, gpt2, llama, loss_and_grads,  # noqa: E402
                         randomize_lora, tokens)

K, N, R = 64, 40, 8


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _linear4bit(W, bias, compute_dtype):
    """A bnb `Linear4bit` (NF4, double quant) holding W's bytes."""
    b4 = _bnb().nn.Linear4bit(W.shape[1], W.shape[0], bias=bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4")
    b4.weight = peftkern.to_bnb(peftkern.quantize_4bit(W, "nf4", 64, True))
    if bias is not None:
        b4.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return b4


def _one_layer(gen, dtype, four_bit=False, compute_dtype=None):
    W = torch.randn(N, K, generator=gen) / K ** 0.5
    b = torch.randn(N, generator=gen) * 0.1
    if four_bit:
        seq = nn.Sequential(_linear4bit(W, b.to(compute_dtype), compute_dtype))
        seq.is_loaded_in_4bit = True  # as transformers marks it: PEFT then uses its bnb layer
        return seq
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(W), lin.bias.copy_(b)
    return nn.Sequential(lin.to(dtype))


def _peft(module, **cfg):
    model = get_peft_model(module, LoraConfig(target_modules=["0"], r=R, lora_alpha=16, **cfg))
    randomize_lora(model)
    return model


def _run(model, x, g, params):
    """`y` and the gradients of `(y·g).sum()` w.r.t. x and `params` (names)."""
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    y = model(x)
    (y * g).sum().backward()
    named = dict(model.named_parameters())
    return y.detach(), x.grad, [named[n].grad for n in params]


# ---- 1. fp32 adapters on a 16-bit base (PEFT's autocast_adapter_dtype default) ------------------


FP32_ADAPTER_CASES = [  # (base dtype, 4-bit?, backend): bf16 never runs on the Triton interpreter
    (torch.bfloat16, False, "reference"), (torch.float16, False, "triton"),
    (torch.bfloat16, True, "cpp"), (torch.bfloat16, True, "reference"),
    (torch.float16, True, "triton"),
]


@pytest.mark.parametrize("dtype,four_bit,backend", FP32_ADAPTER_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_fp32_adapters_on_a_16bit_base_keep_peft_precision(gen, dtype, four_bit, backend):
    if backend not in ops.available(torch.device("cpu")):
        pytest.skip(f"{backend} not available")
    model = _peft(_one_layer(gen, dtype, four_bit, dtype))
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's default
    params = ["base_model.model.0.lora_A.default.weight", "base_model.model.0.lora_B.default.weight"]
    x = torch.randn(5, 3, K, generator=gen).to(dtype)
    g = torch.randn(5, 3, N, generator=gen).to(dtype)
    want = _run(model, x, g, params)
    # float64 oracle: the same math on the same (exactly representable) values
    base = layer.get_base_layer()
    W = (peftkern.dequantize_4bit(peftkern.from_bnb(base.weight), dtype) if four_bit
         else base.weight).double()
    A = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    y64 = x64 @ W.t() + base.bias.double() + layer.scaling["default"] * (x64 @ A.t()) @ B.t()
    (y64 * g.double()).sum().backward()
    oracle = (y64.detach(), x64.grad, [A.grad, B.grad])
    assert pk.enable(model) == 1
    with ops.use_backend(backend):
        got = _run(model, x, g, params)
    for name, o, w, gt in zip(("y", "dx"), oracle[:2], want[:2], got[:2]):
        assert gt.dtype == w.dtype
        assert_error_rule(name, gt, o, w)
    for name, o, w, gt in zip(("dA", "dB"), oracle[2], want[2], got[2]):
        assert gt.dtype == torch.float32
        assert_error_rule(name, gt, o, w)  # within 2x PEFT's own fp32 error (~1e-7 relative)


def test_fp32_adapters_see_the_fp32_input_of_a_bf16_compute_4bit_layer(gen):
    """prepare_model_for_kbit_training: fp32 activations into a bf16-compute Linear4bit. PEFT
    rounds x to bf16 for the base GEMM only; the LoRA branch sees the fp32 x."""
    model = _peft(_one_layer(gen, torch.float32, True, torch.bfloat16))
    params = ["base_model.model.0.lora_A.default.weight", "base_model.model.0.lora_B.default.weight"]
    x, g = torch.randn(7, K, generator=gen), torch.randn(7, N, generator=gen)
    want = _run(model, x, g, params)
    pk.enable(model)
    with ops.use_backend("reference"):
        got = _run(model, x, g, params)
    for w, gt in zip(want[2], got[2]):
        torch.testing.assert_close(gt, w, rtol=1e-5, atol=1e-6)  # fp32 math on both sides
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-2)  # bf16 base result


# ---- 2./6. copies and pickling --------------------------------------------------------------------


def _first_lora(model):
    return next(m for _, m in pk._lora_layers(model))


def test_deepcopy_runs_the_copy_with_its_own_weights(gen):
    model = _peft(_one_layer(gen, torch.float32))
    pk.enable(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        _first_lora(clone).get_base_layer().weight.mul_(2.0)  # e.g. an EMA copy drifting away
    x = torch.randn(4, K, generator=gen)
    plain = copy.deepcopy(clone)
    pk.disable(plain)
    torch.testing.assert_close(clone(x), plain(x))  # fused path
    with clone.disable_adapter(), plain.disable_adapter():  # PEFT fallback path
        torch.testing.assert_close(clone(x), plain(x))
        assert not torch.allclose(clone(x), model(x))
    assert _first_lora(clone).forward.layer is _first_lora(clone)


@pytest.mark.parametrize("route", ["enable", "custom"])
def test_torch_save_and_pickle_of_an_enabled_model_load_back(gen, route):
    if route == "enable":
        model = _peft(_one_layer(gen, torch.float32))
        pk.enable(model)
    else:
        cfg = LoraConfig(target_modules=["0"], r=R, lora_alpha=16)
        cfg._register_custom_module(pk.custom_modules())
        model = get_peft_model(_one_layer(gen, torch.float32), cfg)
        randomize_lora(model)
    x = torch.randn(3, K, generator=gen)
    model(x)  # fills the layer's cache: copies must not carry it (it holds ids of these tensors)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for back in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(model)),
                 copy.deepcopy(model)):
        layer = _first_lora(back)
        cache = layer.forward.cache if route == "enable" else layer.__dict__.get(pk._CACHE)
        assert not cache
        torch.testing.assert_close(back(x), model(x))
        assert pk.coverage(back) == {"fused": 1}


# ---- 3./4. gradients PEFT gives that the fused op did not -----------------------------------------


@pytest.mark.parametrize("kind", ["dense", "conv1d"])
def test_a_trainable_base_weight_gets_its_gradient(gen, kind):
    module = gpt2() if kind == "conv1d" else llama()
    target = ["c_attn"] if kind == "conv1d" else ["q_proj", "v_proj"]
    model = get_peft_model(module, LoraConfig(target_modules=target, r=4, lora_alpha=8,
                                              fan_in_fan_out=kind == "conv1d"))
    randomize_lora(model)
    for m in (m for _, m in pk._lora_layers(model)):
        m.get_base_layer().weight.requires_grad_(True)
        m.get_base_layer().bias is not None and m.get_base_layer().bias.requires_grad_(True)
    ids = tokens()
    want = loss_and_grads(model, ids)
    assert any("base_layer.weight" in n for n in want[2])
    assert pk.enable(model) == 2 * len(target)  # two decoder layers
    assert_same_run(loss_and_grads(model, ids), want)


def _float64_twin(model):
    """The same one-layer PEFT model in float64 over a dense base (4-bit weights dequantized)."""
    base = model.base_model.model[0].get_base_layer()
    W = base.weight
    if not isinstance(base, nn.Linear) or type(base) is not nn.Linear:
        W = peftkern.dequantize_4bit(peftkern.from_bnb(W), torch.float32)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(W), lin.bias.copy_(base.bias)
    twin = _peft(nn.Sequential(lin))
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k},
                         strict=False)
    return twin.double()


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
def test_double_backward_matches_peft(gen, four_bit):
    """create_graph=True (gradient penalties, Hessian-vector products), then a second backward:
    within the error rule of PEFT's own second-order gradients against float64."""
    model = _peft(_one_layer(gen, torch.float32, four_bit, torch.float32))
    x0 = torch.randn(6, K, generator=gen)

    def penalized_grads(m, x):
        m.zero_grad()
        x = x.clone().requires_grad_(True)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(m(x).pow(2).sum(), params + [x], create_graph=True)
        sum(gr.pow(2).sum() for gr in grads).backward()
        return [p.grad.clone() for p in params]

    oracle = penalized_grads(_float64_twin(model), x0.double())
    want = penalized_grads(model, x0)
    pk.enable(model)
    for i, (o, w, g) in enumerate(zip(oracle, want, penalized_grads(model, x0))):
        assert_error_rule(f"second-order grad {i}", g, o, w)


# ---- 5. target_parameters (ParamWrapper) outside an experts module stays on PEFT ---------------------------------------------


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, N)

    def forward(self, x):
        return self.lin(x)


def test_target_parameters_stay_on_peft_and_train(gen):
    torch.manual_seed(0)
    model = get_peft_model(_Experts(), LoraConfig(target_modules=[], target_parameters=["lin.weight"],
                                                  r=4, lora_alpha=8))
    randomize_lora(model)
    x = torch.randn(3, K, generator=gen)
    want = model(x)
    assert pk.enable(model) == 0
    assert pk.coverage(model) == {
        "target_parameters on Linear (not a transformers experts module)": 1}
    for _ in range(2):  # a second forward used to bump W's version under the saved fused op
        model(x).sum().backward()
    torch.testing.assert_close(model(x), want)


# ---- 7. dtypes peftkern does not fuse go to PEFT ---------------------------------------------------


def test_float64_model_runs_on_peft(gen):
    model = _peft(_one_layer(gen, torch.float32))
    pk.enable(model)
    model.double()
    x = torch.randn(3, K, generator=gen, dtype=torch.float64)
    plain = copy.deepcopy(model)
    pk.disable(plain)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_autocast_goes_to_peft(gen):
    model = _peft(_one_layer(gen, torch.float32))
    x = torch.randn(3, K, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        pk.enable(model)
        got = model(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- 8. the custom-module route over 4-bit layers --------------------------------------------------


def test_custom_route_builds_4bit_layers_that_merge_and_save(gen):
    _bnb()
    cfg = LoraConfig(target_modules=["0"], r=R, lora_alpha=16)
    cfg._register_custom_module(pk.custom_modules())
    model = get_peft_model(_one_layer(gen, torch.float32, True, torch.float32), cfg)
    randomize_lora(model)
    assert type(model.base_model.model[0]) is pk.LoraLinear4bit and pk.coverage(model) == {"fused": 1}
    plain = _peft(_one_layer(gen.manual_seed(1234), torch.float32, True, torch.float32))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k},
                          strict=False)
    assert type(plain.base_model.model[0]).__name__ == "Linear4bit"
    x = torch.randn(4, K, generator=gen)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    model.merge_adapter(), plain.merge_adapter()  # PEFT's 4-bit merge (lossy), same bytes after
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    model.unmerge_adapter()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False).base_model.model[0]) is pk.LoraLinear4bit


def test_custom_route_leaves_what_it_does_not_fuse_to_peft(gen):
    """PEFT hands a mapped class every subclass of its key (bnb's Linear8bitLt is an nn.Linear)
    and every targeted parameter: those get the layer PEFT would build. Reprs stay PEFT's."""
    bnb = _bnb()
    int8 = nn.Sequential(bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False))
    int8.is_loaded_in_8bit = True
    cfg = LoraConfig(target_modules=["0"], r=R)
    cfg._register_custom_module(pk.custom_modules())
    model = get_peft_model(int8, cfg)
    assert type(model.base_model.model[0]).__name__ == "Linear8bitLt"  # PEFT's bnb 8-bit layer
    model(torch.randn(2, K, generator=gen))  # bnb quantizes on the first forward
    model.merge_adapter()
    cfg = LoraConfig(target_modules=[], target_parameters=["lin.weight"], r=4)
    cfg._register_custom_module(pk.custom_modules())
    torch.manual_seed(0)
    model = get_peft_model(_Experts(), cfg)
    assert type(model.base_model.model.lin) is peft.tuners.lora.layer.ParamWrapper
    cfg = LoraConfig(target_modules=["0"], r=R)
    cfg._register_custom_module(pk.custom_modules())
    model = get_peft_model(_one_layer(gen, torch.float32), cfg)
    assert type(model.base_model.model[0]) is pk.LoraLinear
    assert repr(model.base_model.model[0]).startswith("lora.Linear(")


def test_enable_takes_a_module_with_injected_peft_layers(gen):
    module = peft.inject_adapter_in_model(LoraConfig(target_modules=["0"], r=R), _one_layer(gen, torch.float32))
    randomize_lora(module)
    x = torch.randn(3, K, generator=gen)
    want = module(x)
    assert pk.enable(module) == 1 and pk.coverage(module) == {"fused": 1}
    torch.testing.assert_close(module(x), want)


# ---- 9. enable/disable keep what was installed before ----------------------------------------------


def test_disable_restores_a_forward_installed_before_enable(gen):
    model = _peft(_one_layer(gen, torch.float32))
    layer = _first_lora(model)
    calls = []

    def wrapper(x, *a, **k):
        calls.append(1)
        return type(layer).forward(layer, x, *a, **k)

    layer.forward = functools.update_wrapper(functools.partial(wrapper), wrapper)
    assert pk.enable(model) == 1
    x = torch.randn(2, K, generator=gen)
    with model.disable_adapter():
        model(x)  # the fallback goes through the wrapper
    assert calls == [1]
    assert pk.disable(model) == 1 and layer.__dict__["forward"].func is wrapper


def test_accelerate_hooks_keep_wrapping_the_fused_forward(gen):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        n = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.n += 1
            return args, kwargs

    model = _peft(_one_layer(gen, torch.float32))
    layer = _first_lora(model)
    x = torch.randn(2, K, generator=gen)
    want = model(x)
    add_hook_to_module(layer, Count())
    assert pk.enable(model) == 1 and pk.coverage(model) == {"fused": 1}
    torch.testing.assert_close(model(x), want)
    assert Count.n == 1  # the hook ran around the fused forward
    pk.disable(model)
    remove_hook_from_module(layer)  # puts back the forward it wrapped: PEFT's own
    assert layer.forward.__func__ is type(layer).forward and accelerate


# ---- configurations that now run fused --------------------------------------------------------------


def _gpt2_lora(dropout):
    model = get_peft_model(gpt2(), LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn"],
                                              lora_dropout=dropout, fan_in_fan_out=True))
    randomize_lora(model)
    return model.train()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpt2_conv1d_layers_fuse_and_match_peft(dropout, shared_dropout_masks):
    model = _gpt2_lora(dropout)
    ids = tokens()
    want = loss_and_grads(model, ids)
    assert pk.enable(model) == 2 and pk.coverage(model) == {"fused": 2}
    for backend in [b for b in ops.available(torch.device("cpu")) if b in ("triton", "reference")]:
        with ops.use_backend(backend):
            assert_same_run(loss_and_grads(model, ids), want)


def test_gpt2_loaded_in_4bit_fuses_and_matches_peft(tmp_path):
    """transformers' bnb loader turns Conv1D into Linear4bit (W transposed to [out, in])."""
    _bnb()
    gpt2(n_embd=64).save_pretrained(tmp_path)  # in_features 64: a whole bnb block per row
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, quantization_config=q,
                                                        device_map="cpu", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn"],
                                            fan_in_fan_out=True))
    randomize_lora(model)
    model.train()  # eval mode would let bnb repack its CPU weights
    ids = tokens()
    want = loss_and_grads(model, ids)
    assert pk.enable(model) == 2 and pk.coverage(model) == {"fused": 2}
    assert_same_run(loss_and_grads(model, ids), want, rtol=1e-4, atol=1e-4, grad_rtol=1e-3,
                    grad_atol=1e-5)


def test_gpt2_dropout_without_a_shared_mask_matches_in_distribution():
    """With its own masks the LoRA branch's mean over draws is PEFT's (no dropout) branch."""
    model = _gpt2_lora(0.1)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    pk.enable(model)
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora = torch.stack([layer(x) for _ in range(400)]).mean(0) - layer.get_base_layer()(x)
        layer.eval()
        want = layer(x) - layer.get_base_layer()(x)
    torch.testing.assert_close(lora, want, rtol=0.1, atol=0.1 * want.abs().max().item())


def _llama_lora(**cfg):
    model = get_peft_model(llama(), LoraConfig(target_modules=LINEARS, r=4, lora_alpha=8, **cfg))
    randomize_lora(model)
    return model


@pytest.mark.parametrize("cfg", [
    dict(lora_bias=True),
    dict(rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 32}),
    dict(use_rslora=True, lora_dropout=0.0),
], ids=["lora_bias", "rank_alpha_pattern", "rslora"])
def test_llama_configs_fuse_and_match_peft(cfg):
    model = _llama_lora(**cfg)
    ids = tokens()
    want = loss_and_grads(model, ids)
    assert pk.enable(model) == 2 * len(LINEARS) and pk.coverage(model) == {"fused": 14}
    assert_same_run(loss_and_grads(model, ids), want)


def test_several_active_adapters_sum_like_peft():
    model = _llama_lora()
    model.add_adapter("other", LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4))
    randomize_lora(model, seed=5)
    model.base_model.set_adapter(["default", "other"])
    ids = tokens()
    want = loss_and_grads(model, ids)
    assert any(".other." in n for n in want[2])
    pk.enable(model)
    assert_same_run(loss_and_grads(model, ids), want)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert pk._call_reason(layer, torch.zeros(1, 64), (), {}) is None  # fused, not delegated


def test_several_adapters_with_dropout_in_training_go_to_peft():
    model = _llama_lora(lora_dropout=0.1)
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], r=2, lora_dropout=0.1))
    model.base_model.set_adapter(["default", "other"])
    pk.enable(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "several active adapters" in pk._call_reason(layer.train(), torch.zeros(1, 64), (), {})


# ---- the kept call (host cost): it follows every change, and is re-checked when one comes --------


def _mutations(layer, gen, four_bit):
    """`(what, change, rechecks)`: each changes something the fused call reads; `rechecks`: the
    layer's full checks must run again (not for in-place updates, which the kept call reads, nor
    for a return to the state it was kept in)."""
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    base = layer.get_base_layer()
    fresh = functools.partial(torch.randn, generator=gen)
    return [
        ("optimizer step, in place", lambda: B.weight.data.add_(0.5), False),
        ("scaling", lambda: layer.set_scale("default", 0.5), True),
        ("lora_B replaced", lambda: setattr(B, "weight", nn.Parameter(fresh(N, R))), True),
        ("lora_A .data swapped", lambda: setattr(A.weight, "data", fresh(R, K)), False),
        ("lora_A frozen", lambda: A.weight.requires_grad_(False), True),
        ("new adapter active", lambda: (layer.update_layer("other", 4, 8, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5)),
                                        randomize_lora(layer, seed=7), layer.eval(),
                                        layer.set_adapter("other")), True),
        ("dropout on (train)", lambda: layer.train(), True),  # p = 0.5: a mask per call
        ("dropout off (eval)", lambda: layer.eval(), True),
        ("adapters disabled", lambda: layer.enable_adapters(False), True),
        ("adapters enabled", lambda: layer.enable_adapters(True), False),  # as kept before
        ("back to default", lambda: layer.set_adapter("default"), True),
        ("merged", lambda: layer.merge(), True),
        ("unmerged", lambda: layer.unmerge(), four_bit),  # dense: W restored in place
        ("float64", lambda: layer.to(torch.float64), True),
        ("float32 again", lambda: layer.to(torch.float32), False),  # as kept before
        ("base weight replaced" if not hasattr(base.weight, "quant_state") else "bnb weight replaced",
         lambda: setattr(base, "weight", nn.Parameter(fresh(N, K), requires_grad=False)
                         if not hasattr(base.weight, "quant_state") else
                         peftkern.to_bnb(peftkern.quantize_4bit(fresh(N, K), "nf4", 64, True))), True),
        ("backend forced", None, True),  # run under use_backend("reference")
    ]


@pytest.mark.parametrize("route", ["enable", "custom"])
@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "4bit"])
def test_the_kept_call_follows_every_change_and_is_rechecked(gen, four_bit, route, monkeypatch):
    base = _one_layer(gen, torch.float32, four_bit, torch.float32)
    if route == "enable":
        model = _peft(base)
        pk.enable(model)
    else:
        cfg = LoraConfig(target_modules=["0"], r=R, lora_alpha=16)
        cfg._register_custom_module(pk.custom_modules())
        model = get_peft_model(base, cfg)
        randomize_lora(model)
    layer = _first_lora(model)
    if route == "enable":
        peft_forward, kept = pk._installed(layer).peft_forward, pk._installed(layer).cache
    else:  # PEFT's own class follows the custom route's in the MRO
        assert isinstance(layer, pk._CustomRoute)
        peft_forward, kept = super(pk._CustomRoute, layer).forward, None
    checks = []
    full = pk._call_reason
    monkeypatch.setattr(pk, "_call_reason", lambda *a, **k: checks.append(1) or full(*a, **k))

    def same_as_peft(x, ctx=contextlib.nullcontext):
        """The enabled layer's output and gradients against PEFT's own forward, same state."""
        params = [p for p in layer.parameters() if p.requires_grad]
        outs = []
        for f in (layer, peft_forward):
            with ctx():
                torch.manual_seed(3)  # the same dropout masks
                xx = x.clone().requires_grad_(True)
                y = f(xx)
            grads = torch.autograd.grad((y * y).sum(), [xx] + params, allow_unused=True)
            outs.append((y.detach(), grads))
        (y, g), (y0, g0) = outs
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g0):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    layer.eval()
    x = torch.randn(5, K, generator=gen)
    same_as_peft(x)
    n = len(checks)
    same_as_peft(x)
    kept = kept if kept is not None else layer.__dict__[pk._CACHE]
    assert len(checks) == n and kept["fast"] is not None  # kept: no checks
    same_as_peft(x[None].expand(2, 5, K))  # another shape: checked again, and back
    same_as_peft(x)
    assert len(checks) == n + 2
    for what, change, rechecks in _mutations(layer, gen, four_bit):
        n = len(checks)
        ctx = contextlib.nullcontext
        if change is None:
            ctx = functools.partial(ops.use_backend, "reference")
        else:
            change()
        x = x.to(layer.get_base_layer().weight.dtype if not four_bit else torch.float32)
        same_as_peft(x, ctx)  # in training, the same masks: both draw bernoulli_ like x
        same_as_peft(x, ctx)  # the kept call, where the state fuses
        with ctx():
            fused = full(layer, x, (), {}) is None
        assert len(checks) == n + rechecks + (not fused), what
        if what == "dropout on (train)":  # the kept call draws a fresh mask per call
            xg = x.clone().requires_grad_(True)
            assert not torch.equal(layer(xg), layer(xg)) and len(checks) == n + 1
    layer.requires_grad_(False)  # LoRA frozen too (attribution through a frozen model)
    layer(x)  # kept for an x without grad: nothing to differentiate
    same_as_peft(x)  # x needs grad: dX flows through the call planned for it


# ---- mixed-adapter batches (adapter_names) ---------------------------------------------------------


def _three_adapters(model):
    """`default` on every linear, `b` (rank 2) on q/v only, `c` (rank 8, rsLoRA) everywhere."""
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4))
    model.add_adapter("c", LoraConfig(target_modules=LINEARS, r=8, lora_alpha=8, use_rslora=True))
    randomize_lora(model, seed=7)
    return model.eval()


@pytest.fixture
def grouped_calls(monkeypatch):
    """How many layer calls ran the grouped op (the calls still run)."""
    from peftkern.ops import multi_lora
    calls, real = [], multi_lora.grouped_lora_linear
    monkeypatch.setattr(multi_lora, "grouped_lora_linear",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_mixed_adapter_batch_matches_peft(grouped_calls):
    model = _three_adapters(_llama_lora())
    ids = tokens(batch=6)
    names = ["default", "b", "__base__", "c", "b", "default"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        pk.enable(model)
        for backend in [b for b in ops.available(torch.device("cpu")) if b in ("triton", "reference")]:
            grouped_calls.clear()
            with ops.use_backend(backend):
                torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits, want,
                                           rtol=1e-5, atol=1e-5)
            assert len(grouped_calls) == 14  # every layer grouped, none delegated to PEFT
        # a batch of one adapter, and one that names no adapter of the k_proj layers ("b")
        for names in (["c"] * 6, ["b", "__base__"] * 3):
            pk.disable(model)
            want = model(input_ids=ids, adapter_names=names).logits
            pk.enable(model)
            torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits, want,
                                       rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batch_over_4bit_matches_peft(gen, grouped_calls):
    model = _three_adapters_one_layer(_peft(_one_layer(gen, torch.float32, True, torch.float32)))
    layer = model.base_model.model[0]
    layer.get_base_layer().train()  # eval mode would let bnb repack its CPU weights
    x = torch.randn(4, 3, K, generator=gen)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        want = layer(x, adapter_names=names)
        pk.enable(model)
        torch.testing.assert_close(layer(x, adapter_names=names), want, rtol=1e-5, atol=1e-5)
    assert len(grouped_calls) == 1


def _three_adapters_one_layer(model):
    model.add_adapter("other", LoraConfig(target_modules=["0"], r=2, lora_alpha=4))
    randomize_lora(model, seed=7)
    return model.eval()


def test_mixed_adapter_batch_with_dora_goes_to_peft():
    model = _llama_lora()
    model.add_adapter("d", LoraConfig(target_modules=["q_proj"], r=2, use_dora=True))
    pk.enable(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.zeros(2, 3, 64)
    assert pk._call_reason(layer.eval(), x, (), {"adapter_names": ["d", "default"]}) == \
        "adapter_names with DoRA or lora_bias"
    assert pk._call_reason(layer, x, (), {"adapter_names": ["default", "__base__"]}) is None


def test_coverage_counts_layers_by_reason():
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"],
                                               r=4))
    assert pk.coverage(model) == {"not enabled": 4,
                                  "base layer Embedding is not nn.Linear, Conv1D or bnb Linear4bit": 1}
    assert pk.enable(model) == 4
    assert pk.coverage(model) == {"fused": 4,
                                  "base layer Embedding is not nn.Linear, Conv1D or bnb Linear4bit": 1}


# ---- AdaLoRA: peftkern's allocator on PEFT's AdaLoRA models ----------------------------------------


def _peft_adalora(total_step=8):
    cfg = AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=6, target_r=2, tinit=1,
                        tfinal=2, deltaT=1, total_step=total_step, lora_alpha=8)
    model = get_peft_model(llama(), cfg)
    randomize_lora(model)
    return model


def _adalora_train(model, steps, use_peftkern):
    ids = tokens(batch=2, T=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if use_peftkern:
        pk.enable(model)
        alloc = RankAllocator(model)  # schedule from the AdaLoraConfig
        alloc.attach(opt)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss  # PEFT adds its orth reg itself
        loss.backward()
        opt.step()
        if not use_peftkern:
            model.base_model.update_and_allocate(step)
        losses.append(loss.item())
    return losses


def test_rank_allocator_on_a_peft_adalora_model_matches_peft():
    ours, theirs = _peft_adalora(), _peft_adalora()
    want = _adalora_train(theirs, 8, use_peftkern=False)
    got = _adalora_train(ours, 8, use_peftkern=True)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    want_pattern = theirs.peft_config["default"].rank_pattern
    assert want_pattern and ours.peft_config["default"].rank_pattern == want_pattern
    kept = sum(map(sum, want_pattern.values()))
    assert kept == 2 * 2 * 2  # target_r per layer on average: 4 layers x 2


def test_adalora_callback_changes_ranks_under_trainer(tmp_path):
    from peftkern.integrations.transformers import AdaLoRACallback
    model = _peft_adalora(total_step=6)
    pk.enable(model)
    alloc = RankAllocator(model)
    ids = tokens(batch=4, T=8)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6,
                                          per_device_train_batch_size=2, learning_rate=1e-2,
                                          report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    callback = AdaLoRACallback(alloc)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    active = sum(int((m.lora_E["default"] != 0).sum()) for _, m in pk._lora_layers(model))
    assert active == 2 * 4 and callback.budget == 8  # from 6 ranks per layer to 2
    assert model.peft_config["default"].rank_pattern
    with pytest.raises(TypeError, match="allocator must be a peftkern.adalora.RankAllocator"):
        AdaLoRACallback(object())
