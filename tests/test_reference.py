"""The reference is the specification: check its formulas against autograd and against PEFT."""
import pytest
import torch

from peftkern import reference as R

D = torch.float64


def _lora_inputs(gen, M=7, K=33, N=21, r=8, p_drop=0.0):
    x = torch.randn(3, M, K, generator=gen, dtype=D)
    W = torch.randn(N, K, generator=gen, dtype=D)
    b = torch.randn(N, generator=gen, dtype=D)
    A = torch.randn(r, K, generator=gen, dtype=D)
    B = torch.randn(N, r, generator=gen, dtype=D)
    mask = None
    if p_drop:
        mask = (torch.rand(x.shape, generator=gen, dtype=D) >= p_drop).to(D) / (1 - p_drop)
    return x, W, b, A, B, mask


@pytest.mark.parametrize("p_drop", [0.0, 0.25])
def test_lora_backward_formula_equals_autograd(p_drop, gen):
    x, W, b, A, B, mask = _lora_inputs(gen, p_drop=p_drop)
    s = 1.7
    leaves = [t.clone().requires_grad_() for t in (x, b, A, B)]
    y = R.lora_linear(leaves[0], W, leaves[1], leaves[2], leaves[3], s, mask)
    dy = torch.randn(y.shape, generator=gen, dtype=D)
    y.backward(dy)
    dx, dA, dB, dbias = R.lora_linear_backward(dy, x, W, A, B, s, mask)
    for got, leaf in zip((dx, dbias, dA, dB), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12)


def test_qlora_forward_is_lora_over_the_decoded_weight(gen):
    W = torch.randn(9, 64, generator=gen)
    packed, absmax = R.quantize_4bit(W, "nf4", 32)
    x, _, b, A, B, _ = _lora_inputs(gen, K=64, N=9)
    Wd = R.dequantize_4bit(packed, absmax, "nf4", 32, (9, 64), D)
    want = R.lora_linear(x, Wd, b, A, B, 0.5)
    got = R.qlora_linear(x, packed, absmax, "nf4", 32, (9, 64), b, A, B, 0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (Wd - W.double()).abs().max() <= absmax.max() / 2  # NF4 step is < 1/2 of the range


# ---- against PEFT --------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _peft_lora_layer(**cfg):
    from peft import LoraConfig, get_peft_model
    net = torch.nn.Sequential(torch.nn.Linear(33, 21)).double()
    model = get_peft_model(net, LoraConfig(target_modules=["0"], r=4, lora_alpha=8, **cfg))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    return layer, layer.base_layer


def test_lora_forward_matches_peft(gen):
    layer, base = _peft_lora_layer(use_rslora=True)
    x = torch.randn(5, 33, generator=gen, dtype=D)
    want = layer(x)
    got = R.lora_linear(x, base.weight, base.bias, layer.lora_A["default"].weight,
                        layer.lora_B["default"].weight, R.lora_scaling(4, 8, use_rslora=True))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dora_forward_matches_peft(gen):
    layer, base = _peft_lora_layer(use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(5, 33, generator=gen, dtype=D)
    got = R.dora_linear(x, base.weight, base.bias, layer.lora_A["default"].weight,
                        layer.lora_B["default"].weight, 2.0,
                        layer.lora_magnitude_vector["default"].weight)
    torch.testing.assert_close(got, layer(x), rtol=1e-10, atol=1e-10)


def _adalora_model(gen, total_step=40):
    from peft import AdaLoraConfig, get_peft_model
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).double()
    cfg = AdaLoraConfig(target_modules=["0", "2"], init_r=6, target_r=2, tinit=3, tfinal=5,
                        deltaT=2, total_step=total_step, lora_alpha=4)
    return get_peft_model(net, cfg), cfg


def test_adalora_forward_matches_peft(gen):
    model, _ = _adalora_model(gen)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(5, 16, generator=gen, dtype=D)
    got = R.adalora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"],
                           layer.lora_E["default"], layer.lora_B["default"],
                           layer.scaling["default"], layer.ranknum["default"])
    torch.testing.assert_close(got, layer(x), rtol=1e-12, atol=1e-12)


def test_adalora_allocator_math_matches_peft(gen):
    """Sensitivity EMA, triplet scores, cubic budget and the masking threshold, step by step.

    Covers every step before `total_step - tfinal`, where PEFT updates sensitivities; after it PEFT
    freezes the mask (the RankAllocator's job, not a formula).
    """
    model, cfg = _adalora_model(gen)
    alloc = model.base_model.rankallocator
    layers = [model.base_model.model[0], model.base_model.model[2]]
    names = {id(p): n for n, p in model.base_model.model.named_parameters()}
    ema, budgets = {}, set()
    for step in range(cfg.total_step - cfg.tfinal):
        x = torch.randn(4, 16, generator=gen, dtype=D)
        model.zero_grad()
        model(x).square().sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-3)
        # the reference's view of the same step, before PEFT masks
        for layer in layers:
            for p in (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]):
                prev = ema.get(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
                ema[id(p)] = R.adalora_update_ipt(p, p.grad, *prev, cfg.beta1, cfg.beta2)
        scores = [R.adalora_triplet_score(*(ema[id(t)][0] * ema[id(t)][1] for t in (
            layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"])))
            for layer in layers]
        budget, mask_now = R.adalora_budget(step, alloc.init_bgt, alloc.target_bgt, cfg.tinit,
                                            cfg.tfinal, cfg.total_step, cfg.deltaT)
        budgets.add(budget)
        want_E = [layer.lora_E["default"].detach().clone() for layer in layers]
        if mask_now:
            thr = R.adalora_threshold(torch.cat(scores), alloc.init_bgt, budget)
            for E, sc in zip(want_E, scores):
                E[sc.view(-1, 1) <= thr] = 0.0
        model.base_model.update_and_allocate(step)
        for E, layer in zip(want_E, layers):
            torch.testing.assert_close(layer.lora_E["default"], E, rtol=0, atol=0)
        for p in (layers[0].lora_A["default"],):
            torch.testing.assert_close(alloc.exp_avg_ipt[names[id(p)]], ema[id(p)][0])
    assert len(budgets) >= 4  # the budget moved through the cubic schedule
    assert sum(int((l.lora_E["default"] == 0).sum()) for l in layers) > 0  # and masks were applied


def test_orth_reg_matches_peft(gen):
    model, cfg = _adalora_model(gen)
    layers = [model.base_model.model[0], model.base_model.model[2]]

    class Out:
        loss = torch.zeros((), dtype=D)

    model.base_model.model.forward = lambda *a, **k: Out()
    want = model.base_model.forward().loss
    got = R.adalora_orth_reg([(l.lora_A["default"], l.lora_B["default"]) for l in layers],
                             cfg.orth_reg_weight)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
