"""AdaLoRA layers and RankAllocator: error rule vs the float64 reference, and parity with PEFT."""
import copy
import itertools

import pytest
import torch

import peftkern
from peftkern import ops
from peftkern import reference as R
from peftkern.adalora import AdaLoRALinear, QAdaLoRALinear, RankAllocator

from helpers import assert_error_rule

BACKENDS = [b for b in ops.available(torch.device("cpu")) if b in ("triton", "reference")]
DT = {"fp16": torch.float16, "fp32": torch.float32}


def _layer(kind, dtype, gen, r=8, N=33, K=70, pruned=0.5):
    lin = torch.nn.Linear(K, N)
    if kind == "dense":
        m = AdaLoRALinear.from_linear(lin.to(dtype), r=r, lora_alpha=4)
        W = lin.weight.detach().double()
    else:
        m = QAdaLoRALinear.from_linear(lin, r=r, lora_alpha=4, compute_dtype=dtype)
        W = peftkern.dequantize_4bit(m.qweight, torch.float32).double()
    with torch.no_grad():
        m.lora_A.copy_(torch.randn(r, K, generator=gen) * 0.3)
        m.lora_B.copy_(torch.randn(N, r, generator=gen) * 0.3)
        m.lora_E.copy_(torch.randn(r, 1, generator=gen))
        m.lora_E[torch.randperm(r, generator=gen)[: int(r * pruned)]] = 0.0
    return m, W


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, dt, pruned", list(itertools.product(["dense", "nf4"], ["fp16", "fp32"],
                                                                    [0.0, 0.5, 1.0])))
def test_forward_and_gradients_follow_error_rule(backend, kind, dt, pruned, gen):
    dtype = DT[dt]
    m, W = _layer(kind, dtype, gen, pruned=pruned)
    x = torch.randn(2, 7, 70, generator=gen)
    dy = torch.randn(2, 7, 33, generator=gen)
    s, rn = m.scaling, float(m.ranknum)
    b = m.bias.detach()

    def ref(dtype_):
        leaves = [t.detach().to(dtype_).requires_grad_() for t in (x, m.lora_A, m.lora_E, m.lora_B)]
        y = R.adalora_linear(leaves[0], W.to(dtype_), b.to(dtype_), leaves[1], leaves[2], leaves[3], s, rn)
        y.backward(dy.to(dtype_))
        return [y] + [t.grad for t in leaves]

    xg = x.to(dtype).requires_grad_()
    with ops.use_backend(backend):
        y = m.train()(xg)
        y.backward(dy.to(dtype))
        with torch.no_grad():
            y_eval = m.eval()(x.to(dtype))  # active ranks only
    got = [y, xg.grad, m.lora_A.grad, m.lora_E.grad, m.lora_B.grad]
    oracle, baseline = ref(torch.float64), ref(dtype)
    for name, g, o, t in zip(["y", "dx", "dA", "dE", "dB"], got, oracle, baseline):
        assert_error_rule(name, g, o, t)
    assert_error_rule("y(eval)", y_eval, oracle[0], baseline[0])


# ---- the allocator ---------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _twin_models(seed=0, **cfg):
    """A PEFT AdaLoRA model and the same network built from peftkern AdaLoRA layers."""
    from peft import AdaLoraConfig, get_peft_model
    cfg.setdefault("total_step", 10)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    config = AdaLoraConfig(target_modules=["0", "2"], init_r=6, target_r=2, lora_alpha=4, **cfg)
    theirs = get_peft_model(copy.deepcopy(net), config)
    ours = copy.deepcopy(net)
    for i in (0, 2):
        layer = AdaLoRALinear.from_linear(ours[i], r=6, lora_alpha=4)
        src = theirs.base_model.model[i]
        with torch.no_grad():
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, name).copy_(getattr(src, name)["default"])
        ours[i] = layer
    return theirs, ours, config


def test_thirty_steps_same_masks_rank_pattern_and_losses_as_peft():
    cfg = dict(tinit=4, tfinal=6, deltaT=2, total_step=30)
    theirs, ours, config = _twin_models(**cfg)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(30)]
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    alloc = RankAllocator(ours, init_r=6, target_r=2, **cfg)
    alloc.attach(opt_o)  # no update_and_allocate calls in our loop
    budgets = set()
    for step, (x, y) in enumerate(data):
        losses = []
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        theirs.base_model.update_and_allocate(step)
        budgets.add(alloc.budget(step)[0])
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
        for i in (0, 2):
            want = theirs.base_model.model[i].lora_E["default"] == 0
            assert torch.equal(ours[i].lora_E == 0, want), f"mask differs at step {step}, layer {i}"
    assert len(budgets) >= 4  # the budget moved
    pattern = alloc.rank_pattern()
    peft_pattern = config.rank_pattern
    assert [pattern[k] for k in ("0", "2")] == [peft_pattern[k] for k in sorted(peft_pattern)]
    assert sum(map(sum, pattern.values())) == 2 * 2  # target_r per layer at the end


def test_compact_keeps_outputs_with_fewer_parameters(gen):
    _, ours, _ = _twin_models(tinit=1, tfinal=2, deltaT=1, total_step=8)
    alloc = RankAllocator(ours, init_r=6, target_r=2, tinit=1, tfinal=2, total_step=8)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    alloc.attach(opt)
    x = torch.randn(8, 16, generator=gen)
    for _ in range(8):
        opt.zero_grad()
        ours(x).square().mean().backward()
        opt.step()
    n_before = sum(p.numel() for n, p in ours.named_parameters() if "lora" in n)
    ours.eval()
    with torch.no_grad():
        want = ours(x)
    kept = {n: int((ours[int(n)].lora_E != 0).sum()) for n in ("0", "2")}
    ranks = alloc.compact()
    assert ranks == kept and sum(ranks.values()) == 4  # the global budget: target_r x 2 layers
    n_after = sum(p.numel() for n, p in ours.named_parameters() if "lora" in n)
    assert n_after < n_before
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target_r, expect_kept", [(0, 0), (6, 12), (1, 2)])
def test_any_budget_is_safe(target_r, expect_kept, gen):
    """Budgets of zero, of the full total, and of one rank per layer: no kthvalue crash."""
    _, ours, _ = _twin_models()
    with torch.no_grad():  # distinct scores (with E = 0 every score ties at 0 and all are pruned)
        for i in (0, 2):
            ours[i].lora_E.normal_(generator=gen)
    alloc = RankAllocator(ours, init_r=6, target_r=target_r, total_step=4, tinit=0, tfinal=1)
    x = torch.randn(4, 16, generator=gen)
    for step in range(4):
        ours.zero_grad()
        ours(x).square().mean().backward()
        alloc.update_and_allocate(step)
    kept = sum(int((ours[i].lora_E != 0).sum()) for i in (0, 2))
    assert kept == expect_kept and sum(map(sum, alloc.rank_pattern().values())) == expect_kept
    with torch.no_grad():
        ours.eval()(x)  # 100% pruned layers still run


def test_orth_reg_matches_reference_and_has_gradient():
    _, ours, _ = _twin_models()
    alloc = RankAllocator(ours, init_r=6, target_r=2, total_step=10)
    reg = alloc.orth_reg()
    reg.backward()
    assert ours[0].lora_A.grad is not None and reg.item() > 0


def test_bad_allocator_arguments():
    _, ours, _ = _twin_models()
    with pytest.raises(ValueError, match="target_r must be in \\[0, init_r=6\\]"):
        RankAllocator(ours, init_r=6, target_r=8, total_step=10)
    with pytest.raises(ValueError, match="total_step \\(10\\) must be greater than tinit \\+ tfinal"):
        RankAllocator(ours, init_r=6, target_r=2, total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="no AdaLoRA layers"):
        RankAllocator(torch.nn.Linear(3, 3), init_r=6, target_r=2, total_step=10)


def test_peft_backend_covers_peft_adalora_models(gen):
    """enable() switches PEFT's SVDLinear layers in place: same outputs, grads and allocator."""
    import peftkern.integrations.peft as pk
    theirs, _, _ = _twin_models(tinit=1, tfinal=2, total_step=10)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.normal_(generator=gen)
    ref = copy.deepcopy(theirs)
    assert pk.enable(theirs) == 2
    x = torch.randn(5, 16, generator=gen)
    for model in (theirs, ref):
        model(x).square().sum().backward()
    torch.testing.assert_close(theirs(x), ref(x), rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(theirs.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    theirs.base_model.update_and_allocate(3)  # PEFT's own allocator still works on the same params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, rank_dim", [((12, 70), 0), ((12, 1), 0), ((33, 12), 1), ((1, 1), 0)])
def test_fused_sensitivity_update_matches_reference(backend, shape, rank_dim, gen):
    p, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ipt, unc = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    want_ipt, want_unc = R.adalora_update_ipt(p.double(), g.double(), ipt.double(), unc.double(), 0.85, 0.7)
    want = (want_ipt * want_unc).mean(dim=1 - rank_dim)  # per-rank mean of the element score
    with ops.use_backend(backend):
        score = ops.adalora_update_ipt(p, g, ipt, unc, 0.85, 0.7, rank_dim)
    torch.testing.assert_close(ipt.double(), want_ipt, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(unc.double(), want_unc, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(score.double(), want, rtol=1e-5, atol=1e-7)


def test_fused_orth_reg_value_and_gradient(gen):
    pairs = [(torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)) for _ in range(2)]
    got = ops.adalora_orth_reg(pairs, 0.5)
    want = R.adalora_orth_reg(pairs, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, [t for ab in pairs for t in ab])
    want_grads = torch.autograd.grad(want, [t for ab in pairs for t in ab])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda A, B: ops.adalora_orth_reg([(A, B)]), pairs[0])


def test_every_layer_shares_one_base_and_one_constructor_style():
    """LoRA and AdaLoRA layers, dense and 4-bit, share AdapterLayer: the same checks, a frozen
    base, and the same constructors (dense: in/out features or from_linear; 4-bit: from_linear)."""
    from peftkern.nn import AdapterLayer, LoRALinear, QLoRALinear
    lin = torch.nn.Linear(32, 24)
    layers = [LoRALinear(32, 24, r=4), LoRALinear.from_linear(lin, r=4),
              AdaLoRALinear(32, 24, r=4), AdaLoRALinear.from_linear(lin, r=4),
              QLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32),
              QAdaLoRALinear.from_linear(lin, r=4, compute_dtype=torch.float32)]
    for m in layers:
        assert isinstance(m, AdapterLayer) and not m.weight.requires_grad
        assert (m.in_features, m.out_features, m.r) == (32, 24, 4)
        assert m(torch.randn(3, 32)).shape == (3, 24)
    for cls in (LoRALinear, AdaLoRALinear):
        with pytest.raises(ValueError, match="r must"):
            cls(32, 24, r=0)
        with pytest.raises(ValueError, match="lora_dropout"):
            cls(32, 24, r=4, lora_dropout=1.5)
    for cls in (LoRALinear, AdaLoRALinear, QLoRALinear, QAdaLoRALinear):
        with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
            cls.from_linear(object(), r=4)
