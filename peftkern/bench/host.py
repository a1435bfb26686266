"""`python -m peftkern.bench.host`: the per-call host cost of a PEFT LoRA layer after `pk.enable`,
against PEFT's own layer, at a tiny shape where compute is negligible.

For a dense `nn.Linear` and a bnb `Linear4bit` base (64×64, r=8 by default), in no_grad and in
training (forward + backward), each variant is called `--calls` times per repeat; the table gives
the median µs per call over `--repeats` repeats, all in one run, and the ratio enabled / PEFT
(at most 1.0 is the target). One thread, so that OpenMP start-up does not dominate. Under
torch.compile(fullgraph=True) or CUDA graphs this host cost disappears.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from . import measure


class _One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.q = layer

    def forward(self, x):
        return self.q(x)


def _models(four_bit: bool, n: int, r: int):
    from peft import LoraConfig, get_peft_model

    from ..integrations import peft as pk
    if four_bit:
        import bitsandbytes as bnb

        from ..integrations.bitsandbytes import to_bnb
        from ..ops import quantize_4bit
        layer = bnb.nn.Linear4bit(n, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = to_bnb(quantize_4bit(torch.randn(n, n), "nf4", 64, True))
    else:
        layer = nn.Linear(n, n)
    cfg = LoraConfig(target_modules=["q"], r=r, lora_alpha=2 * r)
    theirs = get_peft_model(_One(copy.deepcopy(layer)), cfg)
    ours = get_peft_model(_One(layer), cfg)
    pk.enable(ours)
    return theirs, ours


def _per_call_us(model, x, train: bool, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return (time.perf_counter() - t0) / calls * 1e6


def run(n=64, r=8, M=4, calls=500, repeats=7, input_grad=False) -> list[dict]:
    rows = []
    for four_bit in (False, True):
        theirs, ours = _models(four_bit, n, r)
        x = torch.randn(M, n, requires_grad=input_grad)
        for train in (False, True):
            for m in (theirs, ours):  # warm-up
                _per_call_us(m, x, train, 20)
            t, o = [], []
            for _ in range(repeats):  # interleaved, so drifts hit both alike
                t.append(_per_call_us(theirs, x, train, calls))
                o.append(_per_call_us(ours, x, train, calls))
            pt, po = statistics.median(t), statistics.median(o)
            rows.append(dict(base="bnb 4-bit" if four_bit else "dense", mode="training" if train
                             else "no_grad", peft_us=pt, enabled_us=po, ratio=po / pt))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftkern.bench.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="in = out features (default 64)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--M", type=int, default=4, help="rows per call (default 4)")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--input-grad", action="store_true",
                   help="x requires grad, as for every layer but a model's first")
    args = p.parse_args(argv)
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        print(f"peftkern.bench.host needs peft and bitsandbytes: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    meta = measure.metadata("cpu")
    print(f"host: {meta['device']}; SIMD flags: {' '.join(meta['cpu_flags']) or 'none'}; "
          f"torch threads 1; x requires grad: {args.input_grad}; peftkern {meta['peftkern_commit']}")
    print("| base | mode | PEFT µs/call | enabled µs/call | enabled / PEFT |\n|---|---|---|---|---|")
    for row in run(args.n, args.rank, args.M, args.calls, args.repeats, args.input_grad):
        print(f"| {row['base']} | {row['mode']} | {row['peft_us']:.1f} | {row['enabled_us']:.1f} "
              f"| {row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
