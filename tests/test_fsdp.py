"""FSDP2 (`fully_shard`) and DTensor inputs: 2 processes, gloo backend, CPU.

One spawn runs every scenario (start-up dominates); each rank writes its results as safetensors,
and the tests compare them with the same models run in this one process:
- peftkern.inject models (dense; NF4 stored as bf16 and as uint8) and a PEFT model over bnb
  4-bit layers (bf16 storage) after `pk.enable`: three SGD steps, each rank on its half of the
  batch. Losses and LoRA gradients equal one process's; the packed bytes are bit-equal after
  sharding, inside the forward (all-gathered) and after training; no module output is a view.
- a sharded save (DCP, safetensors files) loads into an unsharded model, and an unsharded
  safetensors file into a sharded one, with the same outputs and the same packed bytes.
- a MixedPrecisionPolicy that casts the packed bytes is refused by name, not decoded.
- DTensor inputs (replicated, row-sharded) to the layers give DTensors of the local results, and
  the gradient of a replicated DTensor parameter is the sum over the ranks.
"""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import peftkern

safetensors_torch = pytest.importorskip("safetensors.torch")
fsdp = pytest.importorskip("torch.distributed.fsdp")
WORLD, STEPS, LR = 2, 3, 0.5
KINDS = ("dense", "nf4-bf16", "nf4-uint8", "peft-bnb")


def _lora_init(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _bnb_linear(n_in, n_out, seed):
    """A bnb Linear4bit (NF4, bf16 storage) as transformers loads one: the module keeps its
    quant_state, which FSDP2 strips from the all-gathered weight."""
    bnb = pytest.importorskip("bitsandbytes")
    W = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) / n_in ** 0.5
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            quant_storage=torch.bfloat16)
    lin.weight = peftkern.to_bnb(peftkern.quantize_4bit(W, "nf4", 64, True, torch.bfloat16))
    lin.quant_state = lin.weight.quant_state
    return lin


def _model(kind, enable=True):
    """A 64 -> 128 -> 64 MLP with LoRA (r=4) on both linears; fp32 compute."""
    if kind == "peft-bnb":
        from peft import LoraConfig, get_peft_model

        import peftkern.integrations.peft as pk
        seq = nn.Sequential(_bnb_linear(64, 128, 0), nn.GELU(), _bnb_linear(128, 64, 1))
        seq.is_loaded_in_4bit = True
        torch.manual_seed(0)  # PEFT draws lora_A from the global generator
        model = get_peft_model(seq, LoraConfig(target_modules=["0", "2"], r=4, lora_alpha=8))
        _lora_init(model)
        if enable:
            assert pk.enable(model) == 2
        return model
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    quant = {} if kind == "dense" else dict(
        quantize="nf4", compute_dtype=torch.float32,
        quant_storage=torch.bfloat16 if kind == "nf4-bf16" else torch.uint8)
    peftkern.inject(net, ["0", "2"], r=4, **quant)
    _lora_init(net)
    return net


def _units(model):
    """`(module to shard, module holding packed 4-bit bytes or None)` per LoRA layer: peftkern's
    layers hold their own bytes; a PEFT LoRA layer's bytes are its bnb base layer's."""
    units = []
    for m in model.modules():
        if isinstance(m, peftkern.nn.QLoRALinear):
            units.append((m, m))
        elif isinstance(m, peftkern.nn.LoRALinear):
            units.append((m, None))
        elif "base_layer" in m._modules and "lora_A" in m._modules:
            units.append((m, m.base_layer))
    return units


def _bytes(holder):
    w = holder.weight
    w = w.full_tensor() if hasattr(w, "full_tensor") else w
    return w.detach().contiguous().view(torch.uint8).clone()


def _packed(model):
    """The packed 4-bit bytes of each layer, as uint8 (full tensors)."""
    return {f"packed{i}": _bytes(h) for i, (_, h) in enumerate(_units(model)) if h is not None}


def _batch():
    return torch.randn(8, 3, 64, generator=torch.Generator().manual_seed(5))


def _train(model, x, params=None):
    """STEPS SGD steps on x; returns the losses and the first step's LoRA gradients."""
    params = params or [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        if step == 0:
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), grads


# ---- the ranks -------------------------------------------------------------------------------

def _shard(model, mesh, **kw):
    from torch.distributed.fsdp import fully_shard
    for unit, _ in _units(model):
        fully_shard(unit, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


def _rank_train(kind, mesh, rank, out):
    model = _model(kind)
    before = _packed(model)
    _shard(model, mesh)
    local = [h.weight.to_local().numel() / h.weight.numel() for _, h in _units(model) if h is not None]
    gathered = {}
    for i, (unit, holder) in enumerate(_units(model)):  # after FSDP2's pre-forward all-gather
        if holder is not None:
            def keep(mod, args, i=i, h=holder):
                gathered.setdefault(f"packed{i}", _bytes(h))  # returns None: args unchanged
            unit.register_forward_pre_hook(keep)
    x = _batch()[rank * 4:(rank + 1) * 4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, grads = _train(model, x)
    views = [str(w.message) for w in caught if "view tensor" in str(w.message)]
    res = {"losses": losses, "views": torch.tensor(len(views)), "local_share": torch.tensor(local),
           **{f"grad.{n}": g for n, g in grads.items()}}
    res.update({f"before.{k}": v for k, v in before.items()})
    res.update({f"sharded.{k}": v for k, v in _packed(model).items()})
    if "dense" not in kind:
        res.update({f"gathered.{k}": v for k, v in gathered.items()})
    safetensors_torch.save_file(res, os.path.join(out, f"{kind}.rank{rank}.safetensors"))
    return model


def _rank_checkpoints(model, mesh, rank, out):
    """Sharded save (DCP, safetensors), then a load of an unsharded file into the sharded model."""
    import torch.distributed.checkpoint as dcp
    sd = model.state_dict()
    dcp.save(sd, storage_writer=dcp.HuggingFaceStorageWriter(os.path.join(out, "sharded"),
                                                             save_distributed=True))
    with torch.no_grad():
        y = model(_batch())
    if rank == 0:
        safetensors_torch.save_file({"y": y}, os.path.join(out, "sharded_y.safetensors"))
    dist.barrier()  # the test process wrote full/ before the spawn
    sd = model.state_dict()
    dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(os.path.join(out, "full")))
    model.load_state_dict(sd)
    with torch.no_grad():
        y = model(_batch())
    safetensors_torch.save_file({"y": y, **_packed(model)},
                                os.path.join(out, f"loaded.rank{rank}.safetensors"))


def _rank_mixed_precision(mesh, rank, out):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    model = _model("nf4-bf16")
    _shard(model, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16))
    try:
        model(_batch()[:2])
        msg = ""
    except RuntimeError as e:
        msg = str(e)
    with open(os.path.join(out, f"mixed.rank{rank}.txt"), "w") as f:
        f.write(msg)


def _rank_dtensor_inputs(mesh, rank, out):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    res = {}
    for name, kw in (("lora", {}), ("qlora", dict(quantize="nf4", compute_dtype=torch.float32))):
        torch.manual_seed(0)
        net = peftkern.inject(nn.Sequential(nn.Linear(64, 40)), ["0"], r=4, **kw)
        _lora_init(net)
        layer = net[0]
        x = _batch().reshape(-1, 64)[:10]
        for pname, placement in (("rep", Replicate()), ("row", Shard(0))):
            xd = distribute_tensor(x, mesh, [placement])
            y = layer(xd)
            assert type(y).__name__ == "DTensor" and y.placements == (placement,), y
            res[f"{name}.{pname}.y"] = y.full_tensor()
        # a replicated DTensor adapter: its gradient sums the ranks' rows
        A = nn.Parameter(distribute_tensor(layer.lora_A.weight.detach(), mesh, [Replicate()]))
        w = layer.weight if name == "lora" else layer.qweight
        op = peftkern.ops.lora_linear if name == "lora" else peftkern.ops.qlora_linear
        y = op(distribute_tensor(x, mesh, [Shard(0)]), w, layer.bias, A, layer.lora_B.weight.detach(),
               layer.scaling)
        y.full_tensor().pow(2).sum().backward()
        res[f"{name}.dA"] = A.grad.full_tensor()
    safetensors_torch.save_file(res, os.path.join(out, f"dtensor.rank{rank}.safetensors"))


def _worker(rank, out):
    # a file rendezvous: no port to pick and release (another process could take it meanwhile)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}",
                            rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    for kind in KINDS:
        model = _rank_train(kind, mesh, rank, out)
        if kind == "nf4-bf16":
            _rank_checkpoints(model, mesh, rank, out)
    _rank_mixed_precision(mesh, rank, out)
    _rank_dtensor_inputs(mesh, rank, out)
    dist.destroy_process_group()


# ---- this process ------------------------------------------------------------------------------

def _full_checkpoint(out):
    """The unsharded file the ranks load: the nf4-bf16 model after 3 steps on the full batch."""
    model = _model("nf4-bf16")
    _train(model, _batch())
    os.makedirs(os.path.join(out, "full"))
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                os.path.join(out, "full", "model.safetensors"))
    with torch.no_grad():
        return model(_batch()), _packed(model)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("peft")
    out = str(tmp_path_factory.mktemp("fsdp"))
    full = _full_checkpoint(out)
    mp.spawn(_worker, args=(out,), nprocs=WORLD, join=True)
    return out, full


def _load(out, name, rank):
    return safetensors_torch.load_file(os.path.join(out, f"{name}.rank{rank}.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_trains_as_one_process_with_the_packed_bytes_untouched(ranks, kind):
    out, _ = ranks
    got = [_load(out, kind, r) for r in range(WORLD)]
    # one process: each rank's loss is that of its half of the batch; FSDP2 averages the
    # gradients, so the steps are those of the mean of the two halves' losses
    model, x = _model(kind), _batch()
    halves = [x[:4], x[4:]]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        losses = [model(h).pow(2).mean() for h in halves]
        (sum(losses) / WORLD).backward()
        for r in range(WORLD):
            torch.testing.assert_close(got[r]["losses"][step], losses[r].detach(), rtol=1e-5, atol=1e-6)
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            assert {k[5:] for k in got[0] if k.startswith("grad.")} == set(grads) and len(grads) == 4
            for n, g in grads.items():
                for r in range(WORLD):
                    torch.testing.assert_close(got[r][f"grad.{n}"], g, rtol=1e-4, atol=1e-6)
        opt.step()
    for r in range(WORLD):
        assert int(got[r]["views"]) == 0, "a module returned a view (FSDP2 warned)"
        packed = [k[len("before."):] for k in got[r] if k.startswith("before.")]
        assert len(packed) == (0 if kind == "dense" else 2)
        assert all(share <= 0.5 for share in got[r]["local_share"].tolist())  # the bytes are sharded
        for k in packed:  # bit-equal: sharded and gathered back, inside the forward, after training
            assert torch.equal(got[r][f"sharded.{k}"], got[r][f"before.{k}"]), k
            assert torch.equal(got[r][f"gathered.{k}"], got[r][f"before.{k}"]), k


def test_enabled_peft_bnb_model_matches_peft_itself(ranks):
    """The same PEFT + bnb model without pk.enable gives the same losses (sizes are whole
    blocks: bnb 0.50's own CPU decode is wrong for partial blocks on AVX-512)."""
    out, _ = ranks
    got = _load(out, "peft-bnb", 0)
    model, x = _model("peft-bnb", enable=False), _batch()
    torch.testing.assert_close(got["losses"][0], model(x[:4]).pow(2).mean().detach(),
                               rtol=1e-4, atol=1e-6)


def test_sharded_save_loads_unsharded_and_back(ranks):
    import torch.distributed.checkpoint as dcp
    out, (full_y, full_packed) = ranks
    # sharded save -> one process, unsharded
    model = _model("nf4-bf16")
    sd = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... uninitialized": one process, meant
        dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(os.path.join(out, "sharded")))
    model.load_state_dict(sd)
    with torch.no_grad():
        y = model(_batch())
    assert torch.equal(y, safetensors_torch.load_file(os.path.join(out, "sharded_y.safetensors"))["y"])
    trained = _load(out, "nf4-bf16", 0)
    for k, v in _packed(model).items():
        assert torch.equal(v, trained[f"before.{k}"]), k
    # unsharded file -> the sharded model on each rank
    for r in range(WORLD):
        got = _load(out, "loaded", r)
        torch.testing.assert_close(got["y"], full_y, rtol=1e-5, atol=1e-6)
        for k, v in full_packed.items():
            assert torch.equal(got[k], v), k


def test_a_cast_of_the_packed_bytes_is_refused_by_name(ranks):
    out, _ = ranks
    for r in range(WORLD):
        with open(os.path.join(out, f"mixed.rank{r}.txt")) as f:
            msg = f.read()
        assert "QLoRALinear.weight" in msg and "cast from torch.bfloat16 to torch.float16" in msg, msg


def test_dtensor_inputs_run_on_local_rows(ranks):
    out, _ = ranks
    got = [_load(out, "dtensor", r) for r in range(WORLD)]
    for name, kw in (("lora", {}), ("qlora", dict(quantize="nf4", compute_dtype=torch.float32))):
        torch.manual_seed(0)
        net = peftkern.inject(nn.Sequential(nn.Linear(64, 40)), ["0"], r=4, **kw)
        _lora_init(net)
        x = _batch().reshape(-1, 64)[:10]
        layer = net[0]
        with torch.no_grad():
            want = layer(x)
        A = layer.lora_A.weight
        layer(x).pow(2).sum().backward()
        for r in range(WORLD):
            for p in ("rep", "row"):
                torch.testing.assert_close(got[r][f"{name}.{p}.y"], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[r][f"{name}.dA"], A.grad, rtol=1e-4, atol=1e-6)


def test_sharded_lora_factors_and_partial_inputs_are_refused():
    """Without a process group: the placements are checked before anything runs."""
    from peftkern.ops.dtensor import _local_call
    from torch.distributed.tensor import Partial, Shard

    class FakeDT:
        def __init__(self, placements, ndim=2):
            self.placements, self.ndim = placements, ndim
    x = torch.randn(3, 8)
    for bad, match in ((FakeDT((Partial(),)), "x must be a DTensor replicated or sharded along its rows"),
                       (FakeDT((Shard(1),)), "x must be a DTensor replicated or sharded along its rows")):
        bound = _bind(x=bad)
        with pytest.raises(ValueError, match=match):
            _local_call(lambda **k: None, FakeDT, bound)
    bound = _bind(x=x, lora_B=FakeDT((Shard(0),)))
    with pytest.raises(ValueError, match="lora_B must be a plain tensor or a replicated DTensor"):
        _local_call(lambda **k: None, FakeDT, bound)


def _bind(**arguments):
    import inspect

    def f(x, lora_B=None):
        pass
    return inspect.signature(f).bind(**arguments)
