"""peftkern.nn: LoRALinear / QLoRALinear as drop-in layers (merge, quant_storage, state dicts)
and their parity with PEFT LoRA over nn.Linear and bnb Linear4bit."""
import pytest
import torch

import peftkern
from peftkern.nn import LoRALinear, QLoRALinear


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


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_dylora_active_rank_prefix(gen, quantized):
    """DyLoRA: at active rank b the layer is the rank-b LoRA `s_b·B[:, :b]·A[:b]` (s_b: the
    scaling at rank b), forward and gradients under the error rule; later ranks get zero grads."""
    from peftkern import reference as R
    from peftkern.formulas import lora_scaling

    from helpers import assert_error_rule
    lin = torch.nn.Linear(64, 24)
    m = (QLoRALinear.from_linear(lin, r=8, lora_alpha=16, compute_dtype=torch.float32) if quantized
         else LoRALinear.from_linear(lin, r=8, lora_alpha=16))
    torch.nn.init.normal_(m.lora_B.weight, generator=gen)
    W = peftkern.dequantize_4bit(m.qweight, torch.float32) if quantized else lin.weight.detach()
    x = torch.randn(5, 64, generator=gen)
    g = torch.randn(5, 24, generator=gen)
    for b in (3, 8):
        m.zero_grad()
        m.set_active_rank(b)
        y = m(x)
        y.backward(g)
        A = m.lora_A.weight.detach()[:b].double().requires_grad_(True)
        B = m.lora_B.weight.detach()[:, :b].double().requires_grad_(True)
        want = R.lora_linear(x.double(), W.double(), lin.bias.detach().double(), A, B,
                             lora_scaling(b, 16, False))
        want.backward(g.double())
        A32 = m.lora_A.weight.detach()[:b].clone().requires_grad_(True)
        B32 = m.lora_B.weight.detach()[:, :b].clone().requires_grad_(True)
        base = R.lora_linear(x, W, lin.bias.detach(), A32, B32, lora_scaling(b, 16, False))
        base.backward(g)
        assert_error_rule(f"y b={b}", y, want.detach(), base.detach())
        assert_error_rule(f"dA b={b}", m.lora_A.weight.grad[:b], A.grad, A32.grad)
        assert_error_rule(f"dB b={b}", m.lora_B.weight.grad[:, :b], B.grad, B32.grad)
        assert not m.lora_A.weight.grad[b:].any() and not m.lora_B.weight.grad[:, b:].any()
    assert "active_rank=8" in repr(m)
    draws = {m.sample_active_rank(torch.Generator().manual_seed(i)) for i in range(40)}
    assert draws <= set(range(1, 9)) and len(draws) > 4 and m.active_rank in draws
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match=r"b must be an int in \[1, r=8\]"):
            m.set_active_rank(bad)
    m.set_active_rank(None)
    assert m.active_rank is None and "active_rank" not in repr(m)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_bitfit_trainable_bias_gets_its_gradient(gen, quantized):
    """BitFit: a bias made trainable (`layer.bias.requires_grad_(True)`) gets dbias = Σ dY from
    the fused backward, next to the LoRA gradients; frozen (the default) it gets none."""
    lin = torch.nn.Linear(64, 24)
    m = (QLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32) if quantized
         else LoRALinear.from_linear(lin, r=4))
    x = torch.randn(3, 5, 64, generator=gen)
    g = torch.randn(3, 5, 24, generator=gen)
    m(x).backward(g)
    assert m.bias.grad is None and m.lora_B.weight.grad is not None
    m.bias.requires_grad_(True)
    m.zero_grad()
    m(x).backward(g)
    torch.testing.assert_close(m.bias.grad, g.sum((0, 1)))


def test_dylora_merge_uses_the_active_rank(gen):
    m = LoRALinear.from_linear(torch.nn.Linear(48, 20), r=8)
    torch.nn.init.normal_(m.lora_B.weight, generator=gen)
    x = torch.randn(5, 48, generator=gen)
    m.set_active_rank(2)
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


# ---- (IA)³ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_output_scale_scales_the_layer_trains_and_merges(kind, gen):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    layer = LoRALinear.from_linear(lin, r=4) if kind == "dense" else \
        QLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    plain = layer(x).detach()
    layer.add_output_scale()
    torch.testing.assert_close(layer(x), plain)  # ones: unchanged
    with torch.no_grad():
        layer.ia3_l.uniform_(0.5, 1.5, generator=gen)
    y = layer(x)
    torch.testing.assert_close(y, plain * layer.ia3_l, rtol=1e-5, atol=1e-5)  # bias scaled too
    y.square().sum().backward()
    assert layer.ia3_l.grad is not None and layer.lora_A.weight.grad is not None
    want = y.detach()
    layer.merge()
    tol = 1e-5 if kind == "dense" else layer.merge_error * x.abs().sum(1).max().item()
    assert (layer(x) - want).abs().max() <= tol
    layer.unmerge()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
