"""peftkern layers under DistributedDataParallel: 2 processes, gloo backend, CPU."""
import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import peftkern


def _model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 8))
    peftkern.inject(net, ["0"], r=4)                                      # dense LoRA
    peftkern.inject(net, ["2"], r=4, quantize="nf4", compute_dtype=torch.float32)  # QLoRA
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return net


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)


def _worker(rank, world, out_dir):
    # a file rendezvous: no port to pick and release (another process could take it meanwhile)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    x, y = _batch()
    shard = slice(rank * 4, rank * 4 + 4)
    torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
    grads = {n: p.grad for n, p in model.module.named_parameters() if p.requires_grad}
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    # Tear down while the interpreter is fully alive: no rank closes its pairs while the other is
    # still in a collective (barrier), and the DDP reducer's reference to the process group is gone
    # before destroy_process_group, so gloo's threads never outlive Python (a rare SIGABRT,
    # "terminate called without an active exception", in CI on 2026-12-04).
    dist.barrier()
    del model, grads
    gc.collect()
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = _model()
    x, y = _batch()
    # DDP averages the two shard gradients: the same as the mean of the per-shard losses
    loss = sum(torch.nn.functional.mse_loss(single(x[i:i + 4]), y[i:i + 4]) for i in (0, 4)) / 2
    loss.backward()
    want = {n: p.grad for n, p in single.named_parameters() if p.requires_grad}
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == want.keys() and len(want) == 4
    for n in want:
        torch.testing.assert_close(r0[n], r1[n], rtol=0, atol=0)
        torch.testing.assert_close(r0[n], want[n], rtol=1e-5, atol=1e-6)
