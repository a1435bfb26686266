"""Bad input, catalogued: every public function and module of peftkern refuses it with the
exception type it documents and a message that names the argument (DESIGN.md §8).

Each table holds `(case id, call, exception, name)`: `call(d)` runs the bad call on the shared
inputs `d`, and the message must name `name` as a whole word. To extend the catalogue, add a row.
Below the tables: checkpoints (damaged, truncated, pickled, other-model files), atomic writes, and
failures that must leave the model exactly as it was.

NaN/Inf: only quantization refuses them (a weight being quantized, a checkpoint's scales); a NaN
scaling or adapter value passes, as in torch and PEFT, and is not listed here.
"""
import dataclasses
import json
import os
import pickle
import re
import types

import pytest
import torch
from torch import nn

import peftkern
from peftkern import QuantizedWeight, ops
from peftkern.adalora import AdaLoRALinear, QAdaLoRALinear, RankAllocator
from peftkern.nn import DoRALinear, LoRALinear, QDoRALinear, QLoRALinear

N, K, R = 16, 64, 4
F32, F16, F64 = torch.float32, torch.float16, torch.float64
META = "meta"  # the second device: there is no GPU here, and meta tensors hold no data


@pytest.fixture(scope="module")
def d():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g)
    q = peftkern.quantize_4bit(W)
    return types.SimpleNamespace(
        x=torch.randn(3, K, generator=g), W=W, A=torch.randn(R, K, generator=g),
        B=torch.randn(N, R, generator=g), b=torch.randn(N, generator=g), q=q,
        sd={k: v.contiguous() for k, v in q.state_dict().items()},
        As=torch.randn(2, R, K, generator=g), Bs=torch.randn(2, N, R, generator=g),
        idx=torch.tensor([0, 1, -1]), xs=torch.randn(5, K, generator=g),
        We=torch.randn(2, N, K, generator=g), Ae=torch.randn(2, R, K, generator=g),
        Be=torch.randn(2, N, R, generator=g), p=torch.randn(R, K, generator=g))


def named(name: str) -> str:
    """The message names `name` as a whole word."""
    return rf"(?<!\w){re.escape(name)}(?!\w)"


def run_case(d, call, exc, name):
    with pytest.raises(exc, match=named(name)):
        call(d)


def table(rows):
    return pytest.mark.parametrize("call, exc, name", [r[1:] for r in rows],
                                   ids=[r[0] for r in rows])


# ---- the 4-bit format: quantize, dequantize, bnb interop, QuantizedWeight fields -----------------


def _qw(d, **fields):
    return dataclasses.replace(d.q, **fields)


def _meta(sd, **changes):
    """`sd` with its quant_state metadata changed."""
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = {**json.loads(bytes(sd[key].tolist())), **changes}
    return {**sd, key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


def _fsd(sd):
    return QuantizedWeight.from_state_dict(sd)


QUANT = [
    ("quantize-1d", lambda d: peftkern.quantize_4bit(d.W[0]), ValueError, "weight"),
    ("quantize-3d", lambda d: peftkern.quantize_4bit(d.W[None]), ValueError, "weight"),
    ("quantize-int", lambda d: peftkern.quantize_4bit(d.W.int()), TypeError, "weight"),
    ("quantize-f64", lambda d: peftkern.quantize_4bit(d.W.double()), TypeError, "weight"),
    ("quantize-complex", lambda d: peftkern.quantize_4bit(d.W.to(torch.complex64)), TypeError,
     "weight"),
    ("quantize-list", lambda d: peftkern.quantize_4bit(d.W.tolist()), TypeError, "weight"),
    ("quantize-meta", lambda d: peftkern.quantize_4bit(d.W.to(META)), ValueError, "weight"),
    ("quantize-nan", lambda d: peftkern.quantize_4bit(d.W.index_fill(1, torch.tensor([3]),
                                                                      float("nan"))),
     ValueError, "weight"),
    ("quantize-inf", lambda d: peftkern.quantize_4bit(d.W.index_fill(0, torch.tensor([1]),
                                                                      float("-inf"))),
     ValueError, "weight"),
    ("quantize-empty", lambda d: peftkern.quantize_4bit(d.W[:0]), ValueError, "weight"),
    ("blocksize-48", lambda d: peftkern.quantize_4bit(d.W, blocksize=48), ValueError, "blocksize"),
    ("blocksize-16", lambda d: peftkern.quantize_4bit(d.W, blocksize=16), ValueError, "blocksize"),
    ("blocksize-8192", lambda d: peftkern.quantize_4bit(d.W, blocksize=8192), ValueError,
     "blocksize"),
    ("blocksize-float", lambda d: peftkern.quantize_4bit(d.W, blocksize=64.0), ValueError,
     "blocksize"),
    ("blocksize-str", lambda d: peftkern.quantize_4bit(d.W, blocksize="64"), ValueError,
     "blocksize"),
    ("quant_type", lambda d: peftkern.quantize_4bit(d.W, quant_type="int4"), ValueError,
     "quant_type"),
    ("double_quant-str", lambda d: peftkern.quantize_4bit(d.W, double_quant="yes"), TypeError,
     "double_quant"),
    ("quant_storage-str", lambda d: peftkern.quantize_4bit(d.W, quant_storage="uint8"), TypeError,
     "quant_storage"),
    ("quant_storage-size", lambda d: peftkern.quantize_4bit(torch.ones(1, 3),
                                                            quant_storage=torch.float32),
     ValueError, "quant_storage"),
    ("dequantize-tensor", lambda d: peftkern.dequantize_4bit(d.W), TypeError, "qweight"),
    ("dequantize-int8", lambda d: peftkern.dequantize_4bit(d.q, torch.int8), ValueError, "dtype"),
    ("dequantize-f64", lambda d: peftkern.dequantize_4bit(d.q, F64), ValueError, "dtype"),
    ("dequantize-complex", lambda d: peftkern.dequantize_4bit(d.q, torch.complex64), ValueError,
     "dtype"),
    ("from_bnb-tensor", lambda d: peftkern.from_bnb(d.W), ValueError, "param"),
    ("from_bnb-linear", lambda d: peftkern.from_bnb(nn.Linear(K, N)), ValueError, "param"),
    ("to_bnb-tensor", lambda d: peftkern.to_bnb(d.W), TypeError, "qweight"),
    # from_state_dict: a bnb Linear4bit checkpoint, damaged in each field
    ("sd-list", lambda d: _fsd(list(d.sd)), TypeError, "sd"),
    ("sd-prefix", lambda d: QuantizedWeight.from_state_dict(d.sd, prefix=3), TypeError, "prefix"),
    ("sd-missing", lambda d: _fsd({k: v for k, v in d.sd.items() if k != "weight.absmax"}),
     KeyError, "weight.absmax"),
    ("sd-not-tensor", lambda d: _fsd({**d.sd, "weight": [1, 2]}), TypeError, "weight"),
    ("sd-data-truncated", lambda d: _fsd({**d.sd, "weight": d.sd["weight"][:-1]}), ValueError,
     "data"),
    ("sd-data-3d", lambda d: _fsd({**d.sd, "weight": d.sd["weight"][None]}), ValueError, "data"),
    ("sd-absmax-2d", lambda d: _fsd({**d.sd, "weight.absmax": d.sd["weight.absmax"][None]}),
     ValueError, "absmax"),
    ("sd-absmax-float", lambda d: _fsd({**d.sd, "weight.absmax": d.sd["weight.absmax"].float()}),
     TypeError, "absmax"),
    ("sd-absmax-meta", lambda d: _fsd({**d.sd, "weight.absmax": d.sd["weight.absmax"].to(META)}),
     ValueError, "absmax"),
    ("sd-nested-nan", lambda d: _fsd({**d.sd, "weight.nested_absmax":
                                      d.sd["weight.nested_absmax"] * float("nan")}),
     ValueError, "nested absmax"),
    ("sd-quant_map", lambda d: _fsd({**d.sd, "weight.quant_map": d.sd["weight.quant_map"].flip(0)}),
     ValueError, "weight.quant_map"),
    ("sd-meta-blocksize", lambda d: _fsd(_meta(d.sd, blocksize=48)), ValueError, "blocksize"),
    ("sd-meta-dtype", lambda d: _fsd(_meta(d.sd, dtype="int8")), ValueError, "dtype"),
    ("sd-meta-shape", lambda d: _fsd(_meta(d.sd, shape=[2, 8, 64])), ValueError, "shape"),
    ("sd-meta-offset", lambda d: _fsd(_meta(d.sd, nested_offset="ab")), ValueError, "quant_state"),
    ("sd-meta-truncated", lambda d: _fsd({**d.sd, "weight.quant_state.bitsandbytes__nf4":
                                          d.sd["weight.quant_state.bitsandbytes__nf4"][:-3]}),
     ValueError, "quant_state"),
]


@table(QUANT)
def test_format_refuses(d, call, exc, name):
    run_case(d, call, exc, name)


# ---- the ops ------------------------------------------------------------------------------------


def _ll(d, **kw):
    a = dict(x=d.x, weight=d.W, bias=None, lora_A=d.A, lora_B=d.B, scaling=1.0)
    a.update(kw)
    return ops.lora_linear(**a)


def _ql(d, **kw):
    a = dict(x=d.x, qweight=d.q, bias=None, lora_A=d.A, lora_B=d.B, scaling=1.0,
             compute_dtype=F32)
    a.update(kw)
    return ops.qlora_linear(**a)


def _dl(d, **kw):
    a = dict(x=d.x, weight=d.W, bias=None, lora_A=d.A, lora_B=d.B, scaling=1.0,
             magnitude=d.b.abs())
    a.update(kw)
    return ops.dora_linear(**a)


def _ml(d, **kw):
    a = dict(x=d.x, weight=d.W, bias=None, A_stack=d.As, B_stack=d.Bs, scalings=[1.0, 2.0],
             adapter_index=d.idx)
    a.update(kw)
    return ops.multi_lora_linear(**a)


def _el(d, **kw):
    a = dict(x=d.xs, weight=d.We, bias=None, lora_A=d.Ae, lora_B=d.Be, scaling=1.0,
             group_sizes=[2, 3])
    a.update(kw)
    return ops.expert_lora_linear(**a)


def _ipt(d, **kw):
    z = torch.zeros_like(d.p)
    a = dict(p=d.p, grad=d.p.clone(), exp_avg_ipt=z, exp_avg_unc=z.clone(), beta1=0.85,
             beta2=0.85, rank_dim=0)
    a.update(kw)
    return ops.adalora_update_ipt(**a)


def _orth(pairs, weight=0.5):
    return ops.adalora_orth_reg(pairs, weight)


OPS = [
    # lora_linear: x
    ("lora-x-0d", lambda d: _ll(d, x=torch.tensor(1.0)), ValueError, "x"),
    ("lora-x-features", lambda d: _ll(d, x=d.x[:, :5]), ValueError, "x"),
    ("lora-x-int", lambda d: _ll(d, x=d.x.int()), TypeError, "x"),
    ("lora-x-f64", lambda d: _ll(d, x=d.x.double()), TypeError, "x"),
    ("lora-x-complex", lambda d: _ll(d, x=d.x.to(torch.complex64)), TypeError, "x"),
    ("lora-x-list", lambda d: _ll(d, x=d.x.tolist()), TypeError, "x"),
    ("lora-x-meta", lambda d: _ll(d, x=d.x.to(META)), ValueError, "x"),
    # weight
    ("lora-weight-1d", lambda d: _ll(d, weight=d.W[0]), ValueError, "weight"),
    ("lora-weight-3d", lambda d: _ll(d, weight=d.W[None]), ValueError, "weight"),
    ("lora-weight-f16", lambda d: _ll(d, weight=d.W.half()), TypeError, "weight"),
    ("lora-weight-f64", lambda d: _ll(d, weight=d.W.double()), TypeError, "weight"),
    ("lora-weight-meta", lambda d: _ll(d, weight=d.W.to(META)), ValueError, "weight"),
    ("lora-weight-list", lambda d: _ll(d, weight=d.W.tolist()), TypeError, "weight"),
    # the factors: rank, features, dtypes, devices
    ("lora-A-1d", lambda d: _ll(d, lora_A=d.A[0]), ValueError, "lora_A"),
    ("lora-A-features", lambda d: _ll(d, lora_A=d.A[:, :10]), ValueError, "lora_A"),
    ("lora-A-r0", lambda d: _ll(d, lora_A=d.A[:0], lora_B=d.B[:, :0]), ValueError, "lora_A"),
    ("lora-A-int", lambda d: _ll(d, lora_A=d.A.int(), lora_B=d.B.int()), TypeError, "lora_A"),
    ("lora-A-f64", lambda d: _ll(d, lora_A=d.A.double(), lora_B=d.B.double()), TypeError,
     "lora_A"),
    ("lora-A-meta", lambda d: _ll(d, lora_A=d.A.to(META)), ValueError, "lora_A"),
    ("lora-B-rank", lambda d: _ll(d, lora_B=d.B[:, :-1]), ValueError, "lora_B"),
    ("lora-B-features", lambda d: _ll(d, lora_B=d.B[:-1]), ValueError, "lora_B"),
    ("lora-B-3d", lambda d: _ll(d, lora_B=d.B[None]), ValueError, "lora_B"),
    ("lora-B-dtype", lambda d: _ll(d, lora_B=d.B.half()), TypeError, "lora_B"),
    ("lora-B-meta", lambda d: _ll(d, lora_B=d.B.to(META)), ValueError, "lora_B"),
    # bias, scale
    ("lora-bias-features", lambda d: _ll(d, bias=d.b[:-1]), ValueError, "bias"),
    ("lora-bias-2d", lambda d: _ll(d, bias=d.b[None]), ValueError, "bias"),
    ("lora-bias-int", lambda d: _ll(d, bias=d.b.int()), TypeError, "bias"),
    ("lora-bias-f16", lambda d: _ll(d, bias=d.b.half()), TypeError, "bias"),
    ("lora-bias-meta", lambda d: _ll(d, bias=d.b.to(META)), ValueError, "bias"),
    ("lora-scale-features", lambda d: _ll(d, scale=d.b[:-1]), ValueError, "scale"),
    ("lora-scale-meta", lambda d: _ll(d, scale=d.b.to(META)), ValueError, "scale"),
    # scalars and the dropout mask
    ("lora-dropout-1", lambda d: _ll(d, dropout_p=1.0), ValueError, "dropout_p"),
    ("lora-dropout-neg", lambda d: _ll(d, dropout_p=-0.1), ValueError, "dropout_p"),
    ("lora-dropout-bool", lambda d: _ll(d, dropout_p=True), ValueError, "dropout_p"),
    ("lora-mask-shape", lambda d: _ll(d, dropout_mask=torch.ones(3, 5)), ValueError,
     "dropout_mask"),
    ("lora-mask-int", lambda d: _ll(d, dropout_mask=torch.ones(3, K, dtype=torch.int32)),
     TypeError, "dropout_mask"),
    ("lora-mask-complex", lambda d: _ll(d, dropout_mask=torch.ones(3, K, dtype=torch.complex64)),
     TypeError, "dropout_mask"),
    ("lora-mask-meta", lambda d: _ll(d, dropout_mask=torch.ones(3, K, device=META)), ValueError,
     "dropout_mask"),
    ("lora-scaling-str", lambda d: _ll(d, scaling="a"), TypeError, "scaling"),
    ("lora-scaling-complex", lambda d: _ll(d, scaling=1j), TypeError, "scaling"),
    ("lora-scaling-vector", lambda d: _ll(d, scaling=torch.ones(2)), TypeError, "scaling"),
    # qlora_linear
    ("qlora-qweight-tensor", lambda d: _ql(d, qweight=d.W), TypeError, "qweight"),
    ("qlora-qweight-meta", lambda d: _ql(d, qweight=d.q.to(META)), ValueError, "qweight"),
    ("qlora-x-features", lambda d: _ql(d, x=d.x[:, :3]), ValueError, "x"),
    ("qlora-x-int", lambda d: _ql(d, x=d.x.int()), TypeError, "x"),
    ("qlora-x-meta", lambda d: _ql(d, x=d.x.to(META)), ValueError, "x"),
    ("qlora-compute_dtype-int", lambda d: _ql(d, compute_dtype=torch.int32), ValueError,
     "compute_dtype"),
    ("qlora-compute_dtype-f64", lambda d: _ql(d, compute_dtype=F64), ValueError, "compute_dtype"),
    ("qlora-bias-dtype", lambda d: _ql(d, bias=d.b.half()), TypeError, "bias"),
    ("qlora-A-features", lambda d: _ql(d, lora_A=d.A[:, :5]), ValueError, "lora_A"),
    ("qlora-A-r0", lambda d: _ql(d, lora_A=d.A[:0], lora_B=d.B[:, :0]), ValueError, "lora_A"),
    ("qlora-B-meta", lambda d: _ql(d, lora_B=d.B.to(META)), ValueError, "lora_B"),
    ("qlora-scaling-str", lambda d: _ql(d, scaling="a"), TypeError, "scaling"),
    # a hand-built QuantizedWeight whose fields disagree (a kernel would read out of bounds)
    ("qlora-qw-quant_type", lambda d: _ql(d, qweight=_qw(d, quant_type="int4")), ValueError,
     "qweight.quant_type"),
    ("qlora-qw-blocksize", lambda d: _ql(d, qweight=_qw(d, blocksize=48)), ValueError,
     "qweight.blocksize"),
    ("qlora-qw-blocksize-other", lambda d: _ql(d, qweight=_qw(d, blocksize=128)), ValueError,
     "qweight.absmax"),
    ("qlora-qw-data-truncated", lambda d: _ql(d, qweight=_qw(d, data=d.q.data[:-10])), ValueError,
     "qweight.data"),
    ("qlora-qw-absmax-meta", lambda d: _ql(d, qweight=_qw(d, absmax=d.q.absmax.to(META))),
     ValueError, "qweight.absmax"),
    ("qlora-qw-not-nested", lambda d: _ql(d, qweight=_qw(d, absmax2=None)), TypeError,
     "qweight.absmax"),
    ("qlora-qw-code8", lambda d: _ql(d, qweight=_qw(d, code8=d.q.code8[:-1])), ValueError,
     "qweight.nested quant_map"),
    ("qlora-qw-shape-3d", lambda d: _ql(d, qweight=_qw(d, shape=torch.Size((N, K, 1)))),
     ValueError, "qweight.shape"),
    ("qlora-qw-dtype", lambda d: _ql(d, qweight=_qw(d, dtype=F64)), ValueError, "qweight.dtype"),
    # dora_linear, dora_weight_norm
    ("dora-magnitude-features", lambda d: _dl(d, magnitude=d.b[:-1]), ValueError, "magnitude"),
    ("dora-magnitude-2d", lambda d: _dl(d, magnitude=d.b[None]), ValueError, "magnitude"),
    ("dora-magnitude-int", lambda d: _dl(d, magnitude=d.b.int()), TypeError, "magnitude"),
    ("dora-magnitude-meta", lambda d: _dl(d, magnitude=d.b.to(META)), ValueError, "magnitude"),
    ("dora-magnitude-none", lambda d: _dl(d, magnitude=None), TypeError, "magnitude"),
    ("dora-weight_norm-features", lambda d: _dl(d, weight_norm=d.b[:-1]), ValueError,
     "weight_norm"),
    ("dora-weight_norm-meta", lambda d: _dl(d, weight_norm=d.b.to(META)), ValueError,
     "weight_norm"),
    ("dora-weight-list", lambda d: _dl(d, weight=d.W.tolist()), TypeError, "weight"),
    ("dora-weight-meta", lambda d: _dl(d, weight=d.W.to(META)), ValueError, "weight"),
    ("dora-x-features", lambda d: _dl(d, x=d.x[:, :5]), ValueError, "x"),
    ("dora-x-int", lambda d: _dl(d, x=d.x.int()), TypeError, "x"),
    ("dora-A-features", lambda d: _dl(d, lora_A=d.A[:, :5]), ValueError, "lora_A"),
    ("dora-compute_dtype", lambda d: _dl(d, weight=d.q, compute_dtype=torch.int8), ValueError,
     "compute_dtype"),
    ("dora-qw-blocksize", lambda d: _dl(d, weight=_qw(d, blocksize=48), compute_dtype=F32),
     ValueError, "weight.blocksize"),
    ("dora-scaling-str", lambda d: _dl(d, scaling="s"), TypeError, "scaling"),
    ("norm-weight-1d", lambda d: ops.dora_weight_norm(d.W[0], d.A, d.B, 1.0), ValueError,
     "weight"),
    ("norm-weight-int", lambda d: ops.dora_weight_norm(d.W.int(), d.A, d.B, 1.0), TypeError,
     "weight"),
    ("norm-weight-list", lambda d: ops.dora_weight_norm(d.W.tolist(), d.A, d.B, 1.0), TypeError,
     "weight"),
    ("norm-A-meta", lambda d: ops.dora_weight_norm(d.W, d.A.to(META), d.B, 1.0), ValueError,
     "lora_A"),
    ("norm-A-features", lambda d: ops.dora_weight_norm(d.W, d.A[:, :3], d.B, 1.0), ValueError,
     "lora_A"),
    ("norm-A-r0", lambda d: ops.dora_weight_norm(d.W, d.A[:0], d.B[:, :0], 1.0), ValueError,
     "lora_A"),
    ("norm-qw-absmax-meta", lambda d: ops.dora_weight_norm(_qw(d, absmax=d.q.absmax.to(META)),
                                                           d.A, d.B, 1.0),
     ValueError, "weight.absmax"),
    ("norm-scaling-str", lambda d: ops.dora_weight_norm(d.W, d.A, d.B, "s"), TypeError,
     "scaling"),
    # multi_lora_linear
    ("multi-weight-1d", lambda d: _ml(d, weight=d.W[0]), ValueError, "weight"),
    ("multi-weight-3d", lambda d: _ml(d, weight=d.W[None]), ValueError, "weight"),
    ("multi-weight-list", lambda d: _ml(d, weight=d.W.tolist()), TypeError, "weight"),
    ("multi-x-int", lambda d: _ml(d, x=d.x.int()), TypeError, "x"),
    ("multi-x-features", lambda d: _ml(d, x=d.x[:, :7]), ValueError, "x"),
    ("multi-A-2d", lambda d: _ml(d, A_stack=d.As[0]), ValueError, "A_stack"),
    ("multi-A-features", lambda d: _ml(d, A_stack=d.As[..., :7]), ValueError, "A_stack"),
    ("multi-A-int", lambda d: _ml(d, A_stack=d.As.int(), B_stack=d.Bs.int()), TypeError,
     "A_stack"),
    ("multi-A-meta", lambda d: _ml(d, A_stack=d.As.to(META)), ValueError, "A_stack"),
    ("multi-B-shape", lambda d: _ml(d, B_stack=d.Bs[:, :-1]), ValueError, "B_stack"),
    ("multi-B-dtype", lambda d: _ml(d, B_stack=d.Bs.half()), TypeError, "B_stack"),
    ("multi-scalings-length", lambda d: _ml(d, scalings=[1.0]), ValueError, "scalings"),
    ("multi-scalings-float", lambda d: _ml(d, scalings=1.0), TypeError, "scalings"),
    ("multi-scalings-str", lambda d: _ml(d, scalings=["a", 1.0]), TypeError, "scalings[0]"),
    ("multi-scalings-complex", lambda d: _ml(d, scalings=torch.ones(2, dtype=torch.complex64)),
     TypeError, "scalings"),
    ("multi-scalings-meta", lambda d: _ml(d, scalings=torch.ones(2, device=META)), ValueError,
     "scalings"),
    ("multi-index-float", lambda d: _ml(d, adapter_index=d.idx.float()), TypeError,
     "adapter_index"),
    ("multi-index-list", lambda d: _ml(d, adapter_index=d.idx.tolist()), TypeError,
     "adapter_index"),
    ("multi-index-meta", lambda d: _ml(d, adapter_index=d.idx.to(META)), ValueError,
     "adapter_index"),
    ("multi-index-rows", lambda d: _ml(d, adapter_index=d.idx[:2]), ValueError, "adapter_index"),
    ("multi-index-range", lambda d: _ml(d, adapter_index=torch.tensor([0, 2, -1])), ValueError,
     "adapter_index"),
    ("multi-compute_dtype", lambda d: _ml(d, weight=d.q, compute_dtype=torch.int32), ValueError,
     "compute_dtype"),
    ("multi-bias-meta", lambda d: _ml(d, bias=d.b.to(META)), ValueError, "bias"),
    # expert_lora_linear
    ("experts-x-3d", lambda d: _el(d, x=d.xs[None]), ValueError, "x"),
    ("experts-x-int", lambda d: _el(d, x=d.xs.int()), TypeError, "x"),
    ("experts-x-features", lambda d: _el(d, x=d.xs[:, :7], lora_A=None, lora_B=None), ValueError,
     "x"),
    ("experts-weight-2d", lambda d: _el(d, weight=d.We[0]), ValueError, "weight"),
    ("experts-weight-f16", lambda d: _el(d, weight=d.We.half()), TypeError, "weight"),
    ("experts-weight-meta", lambda d: _el(d, weight=d.We.to(META)), ValueError, "weight"),
    ("experts-weight-tensors", lambda d: _el(d, weight=[d.W, d.W]), TypeError, "weight"),
    ("experts-weight-shapes", lambda d: _el(d, weight=[d.q, peftkern.quantize_4bit(d.W[:8])],
                                            lora_A=None, lora_B=None),
     ValueError, "weight"),
    ("experts-qweight-meta", lambda d: _el(d, weight=[d.q, d.q.to(META)], lora_A=None,
                                           lora_B=None),
     ValueError, "weight[1]"),
    ("experts-qweight-layout", lambda d: _el(d, weight=[d.q, _qw(d, blocksize=48)], lora_A=None,
                                             lora_B=None),
     ValueError, "weight[1].blocksize"),
    ("experts-A-2d", lambda d: _el(d, lora_A=d.Ae[0]), ValueError, "lora_A"),
    ("experts-A-meta", lambda d: _el(d, lora_A=d.Ae.to(META)), ValueError, "lora_A"),
    ("experts-A-experts", lambda d: _el(d, lora_A=d.Ae[:1]), ValueError, "lora_A"),
    ("experts-A-r0", lambda d: _el(d, lora_A=d.Ae[:, :0], lora_B=d.Be[..., :0]), ValueError,
     "lora_A"),
    ("experts-B-none", lambda d: _el(d, lora_B=None), TypeError, "lora_B"),
    ("experts-bias-1d", lambda d: _el(d, bias=d.b), ValueError, "bias"),
    ("experts-bias-shape", lambda d: _el(d, bias=torch.zeros(2, N + 1)), ValueError, "bias"),
    ("experts-bias-int", lambda d: _el(d, bias=torch.zeros(2, N, dtype=torch.int32)), TypeError,
     "bias"),
    ("experts-bias-meta", lambda d: _el(d, bias=torch.zeros(2, N, device=META)), ValueError,
     "bias"),
    ("experts-sizes-length", lambda d: _el(d, group_sizes=[5]), ValueError, "group_sizes"),
    ("experts-sizes-negative", lambda d: _el(d, group_sizes=[-1, 6]), ValueError,
     "group_sizes[0]"),
    ("experts-sizes-float", lambda d: _el(d, group_sizes=torch.tensor([2.5, 2.5])), ValueError,
     "group_sizes[0]"),
    ("experts-sizes-sum", lambda d: _el(d, group_sizes=[2, 2]), ValueError, "group_sizes"),
    ("experts-scaling-str", lambda d: _el(d, scaling="s"), TypeError, "scaling"),
    # the AdaLoRA allocator ops
    ("ipt-p-1d", lambda d: _ipt(d, p=d.p[0]), ValueError, "p"),
    ("ipt-p-3d", lambda d: _ipt(d, p=d.p[None]), ValueError, "p"),
    ("ipt-p-int", lambda d: _ipt(d, p=d.p.int()), TypeError, "p"),
    ("ipt-p-complex", lambda d: _ipt(d, p=d.p.to(torch.complex64)), TypeError, "p"),
    ("ipt-grad-shape", lambda d: _ipt(d, grad=d.p[:, :5]), ValueError, "grad"),
    ("ipt-grad-dtype", lambda d: _ipt(d, grad=d.p.half()), TypeError, "grad"),
    ("ipt-grad-meta", lambda d: _ipt(d, grad=d.p.to(META)), ValueError, "grad"),
    ("ipt-grad-none", lambda d: _ipt(d, grad=None), TypeError, "grad"),
    ("ipt-ema-shape", lambda d: _ipt(d, exp_avg_ipt=torch.zeros(2, K)), ValueError,
     "exp_avg_ipt"),
    ("ipt-ema-meta", lambda d: _ipt(d, exp_avg_unc=torch.zeros(R, K, device=META)), ValueError,
     "exp_avg_unc"),
    ("ipt-ema-expanded", lambda d: _ipt(d, exp_avg_unc=torch.zeros(1, K).expand(R, K)),
     ValueError, "exp_avg_unc"),
    ("ipt-beta1", lambda d: _ipt(d, beta1=1.0), ValueError, "beta1"),
    ("ipt-beta2", lambda d: _ipt(d, beta2=-0.1), ValueError, "beta2"),
    ("ipt-rank_dim", lambda d: _ipt(d, rank_dim=2), ValueError, "rank_dim"),
    ("ipt-rank_dim-bool", lambda d: _ipt(d, rank_dim=True), ValueError, "rank_dim"),
    ("orth-empty", lambda d: _orth([]), ValueError, "pairs"),
    ("orth-not-pairs", lambda d: _orth([d.A]), ValueError, "pairs[0]"),
    ("orth-A-1d", lambda d: _orth([(d.A[0], d.B)]), ValueError, "pairs[0]"),
    ("orth-A-int", lambda d: _orth([(d.A.int(), d.B.int())]), TypeError, "pairs[0]"),
    ("orth-B-meta", lambda d: _orth([(d.A, d.B.to(META))]), ValueError, "pairs[0]"),
    ("orth-rank", lambda d: _orth([(d.A, d.B[:, :-1])]), ValueError, "pairs[0]"),
    ("orth-weight-str", lambda d: _orth([(d.A, d.B)], "a"), TypeError, "weight"),
    ("orth-weight-negative", lambda d: _orth([(d.A, d.B)], -1.0), ValueError, "weight"),
    # plan, use_backend
    ("plan-op", lambda d: ops.plan("nope", d.x), ValueError, "op"),
    ("plan-x-list", lambda d: ops.plan("lora_linear_fwd", d.x.tolist()), TypeError, "x"),
    ("plan-x-0d", lambda d: ops.plan("lora_linear_fwd", torch.tensor(1.0), d.W), ValueError, "x"),
    ("plan-weight-list", lambda d: ops.plan("lora_linear_fwd", d.x, d.W.tolist()), TypeError,
     "weight"),
    ("plan-weight-1d", lambda d: ops.plan("lora_linear_fwd", d.x, d.W[0]), ValueError, "weight"),
    ("use_backend-name", lambda d: ops.use_backend("magic"), ValueError, "backend"),
    ("use_backend-int", lambda d: ops.use_backend(3), ValueError, "backend"),
]


@table(OPS)
def test_ops_refuse(d, call, exc, name):
    run_case(d, call, exc, name)


# The ops skip their checks for an argument signature that passed them: a call that differs in
# anything the checks read must still be refused after a good one.
AFTER_PASS = [
    ("qlora-qw-layout", _ql, dict(qweight=lambda d: _qw(d, blocksize=128)), ValueError,
     "qweight.absmax"),
    ("qlora-qw-device", _ql, dict(qweight=lambda d: _qw(d, absmax=d.q.absmax.to(META))),
     ValueError, "qweight.absmax"),
    ("qlora-qw-nested", _ql, dict(qweight=lambda d: _qw(d, code8=d.q.code8[:-1])), ValueError,
     "qweight.nested quant_map"),
    ("dora-qw-layout", _dl, dict(weight=lambda d: _qw(d, data=d.q.data[:-1])), ValueError,
     "weight.data"),
    ("lora-scaling", _ll, dict(scaling=lambda d: "a"), TypeError, "scaling"),
    ("lora-mask", _ll, dict(dropout_mask=lambda d: torch.ones(3, K, device=META)), ValueError,
     "dropout_mask"),
]


@pytest.mark.parametrize("op, bad, exc, name", [r[1:] for r in AFTER_PASS],
                         ids=[r[0] for r in AFTER_PASS])
def test_checks_still_refuse_after_a_pass(d, op, bad, exc, name):
    good = {"weight": d.q, "compute_dtype": F32} if op is _dl and "weight" in bad else {}
    for _ in range(2):
        op(d, **good)
    with pytest.raises(exc, match=named(name)):
        op(d, **{**good, **{k: f(d) for k, f in bad.items()}})


# ---- the modules --------------------------------------------------------------------------------


def _merged(layer):
    layer.merge()
    return layer


def _ada(r=R, pruned=False, quant=None):
    m = AdaLoRALinear(K, N, r=r) if quant is None else QAdaLoRALinear(quant, r=r,
                                                                       compute_dtype=F32)
    if not pruned:  # PEFT's init has E = 0: every rank pruned outside training
        with torch.no_grad():
            m.lora_E.fill_(1.0)
    return m.eval()


def _q(d, **kw):
    return QLoRALinear(d.q, compute_dtype=F32, **kw)


def _with_zero_ia3(layer):
    layer.add_output_scale()
    with torch.no_grad():
        layer.ia3_l[0] = 0.0
    return layer


class _Tiny(nn.Module):
    """Two named linears (`a` [16 -> 8], `b` [8 -> 16]): a model to inject into."""

    def __init__(self, k=16, n=8, dtype=None):
        super().__init__()
        self.a, self.b = nn.Linear(k, n, dtype=dtype), nn.Linear(n, k, dtype=dtype)

    def forward(self, x):
        return self.b(self.a(x))


def _inject(**kw):
    return peftkern.inject(_Tiny(), ["a", "b"], **kw)


def _mixed_ranks():
    m = _inject(r=4)
    m.b = LoRALinear.from_linear(nn.Linear(8, 16), r=2)
    return m


def _alloc(**kw):
    a = dict(init_r=R, target_r=2, total_step=10)
    a.update(kw)
    return RankAllocator(AdaLoRALinear(K, N, r=R), **a)


LIN = nn.Linear(K, N)
MODULES = [
    # LoRALinear: constructor
    ("lora-in-0", lambda d: LoRALinear(0, N), ValueError, "in_features"),
    ("lora-in-negative", lambda d: LoRALinear(-1, N), ValueError, "in_features"),
    ("lora-in-float", lambda d: LoRALinear(64.0, N), ValueError, "in_features"),
    ("lora-out-0", lambda d: LoRALinear(K, 0), ValueError, "out_features"),
    ("lora-r-0", lambda d: LoRALinear(K, N, r=0), ValueError, "r"),
    ("lora-r-negative", lambda d: LoRALinear(K, N, r=-1), ValueError, "r"),
    ("lora-r-too-big", lambda d: LoRALinear(K, N, r=N + 1), ValueError, "r"),
    ("lora-r-float", lambda d: LoRALinear(K, N, r=2.0), ValueError, "r"),
    ("lora-r-bool", lambda d: LoRALinear(K, N, r=True), ValueError, "r"),
    ("lora-dtype-int", lambda d: LoRALinear(K, N, dtype=torch.int32), ValueError, "dtype"),
    ("lora-dtype-f64", lambda d: LoRALinear(K, N, dtype=F64), ValueError, "dtype"),
    ("lora-dtype-complex", lambda d: LoRALinear(K, N, dtype=torch.complex64), ValueError, "dtype"),
    ("lora-dropout", lambda d: LoRALinear(K, N, lora_dropout=1.0), ValueError, "lora_dropout"),
    ("lora-alpha-str", lambda d: LoRALinear(K, N, lora_alpha="a"), TypeError, "lora_alpha"),
    ("lora-rslora-str", lambda d: LoRALinear(K, N, use_rslora="no"), TypeError, "use_rslora"),
    # from_linear
    ("lora-linear-conv", lambda d: LoRALinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError,
     "linear"),
    ("lora-linear-f64", lambda d: LoRALinear.from_linear(nn.Linear(K, N, dtype=F64)), TypeError,
     "linear.weight"),
    ("lora-linear-r-0", lambda d: LoRALinear.from_linear(LIN, r=0), ValueError, "r"),
    ("lora-linear-r-too-big", lambda d: LoRALinear.from_linear(LIN, r=N + 1), ValueError, "r"),
    # forward, merged forward, active rank, merge
    ("lora-forward-features", lambda d: LoRALinear(K, N)(d.x[:, :5]), ValueError, "x"),
    ("lora-forward-int", lambda d: LoRALinear(K, N)(d.x.int()), TypeError, "x"),
    ("lora-forward-f64", lambda d: LoRALinear(K, N)(d.x.double()), TypeError, "x"),
    ("lora-forward-complex", lambda d: LoRALinear(K, N)(d.x.to(torch.complex64)), TypeError, "x"),
    ("lora-forward-meta", lambda d: LoRALinear(K, N)(d.x.to(META)), ValueError, "x"),
    ("lora-forward-list", lambda d: LoRALinear(K, N)(d.x.tolist()), TypeError, "x"),
    ("lora-merged-features", lambda d: _merged(LoRALinear(K, N))(d.x[:, :5]), ValueError, "x"),
    ("lora-merged-int", lambda d: _merged(LoRALinear(K, N))(d.x.int()), TypeError, "x"),
    ("lora-merged-meta", lambda d: _merged(LoRALinear(K, N))(d.x.to(META)), ValueError, "x"),
    ("lora-active-0", lambda d: LoRALinear(K, N, r=R).set_active_rank(0), ValueError, "b"),
    ("lora-active-too-big", lambda d: LoRALinear(K, N, r=R).set_active_rank(R + 1), ValueError,
     "b"),
    ("lora-active-float", lambda d: LoRALinear(K, N, r=R).set_active_rank(2.0), ValueError, "b"),
    ("lora-merge-zero-ia3", lambda d: _with_zero_ia3(LoRALinear(K, N)).merge(), ValueError,
     "ia3_l"),
    # DoRALinear
    ("dora-r-0", lambda d: DoRALinear(K, N, r=0), ValueError, "r"),
    ("dora-dtype-f64", lambda d: DoRALinear(K, N, dtype=F64), ValueError, "dtype"),
    ("dora-linear-r-too-big", lambda d: DoRALinear.from_linear(LIN, r=N + 1), ValueError, "r"),
    ("dora-forward-features", lambda d: DoRALinear(K, N)(d.x[:, :5]), ValueError, "x"),
    ("dora-forward-int", lambda d: DoRALinear(K, N)(d.x.int()), TypeError, "x"),
    ("dora-forward-meta", lambda d: DoRALinear(K, N)(d.x.to(META)), ValueError, "x"),
    ("dora-merged-features", lambda d: _merged(DoRALinear(K, N))(d.x[:, :5]), ValueError, "x"),
    # QLoRALinear
    ("qlora-qweight-tensor", lambda d: QLoRALinear(d.W), TypeError, "qweight"),
    ("qlora-r-0", lambda d: _q(d, r=0), ValueError, "r"),
    ("qlora-r-too-big", lambda d: _q(d, r=N + 1), ValueError, "r"),
    ("qlora-compute_dtype-int", lambda d: QLoRALinear(d.q, compute_dtype=torch.int32), ValueError,
     "compute_dtype"),
    ("qlora-compute_dtype-f64", lambda d: QLoRALinear(d.q, compute_dtype=F64), ValueError,
     "compute_dtype"),
    ("qlora-linear-quant_type", lambda d: QLoRALinear.from_linear(LIN, quant_type="int4"),
     ValueError, "quant_type"),
    ("qlora-linear-blocksize", lambda d: QLoRALinear.from_linear(LIN, blocksize=48), ValueError,
     "blocksize"),
    ("qlora-linear-storage", lambda d: QLoRALinear.from_linear(LIN, quant_storage="x"), TypeError,
     "quant_storage"),
    ("qlora-linear-conv", lambda d: QLoRALinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError,
     "linear"),
    ("qlora-linear-f64", lambda d: QLoRALinear.from_linear(nn.Linear(K, N, dtype=F64)), TypeError,
     "weight"),
    ("qlora-linear-meta", lambda d: QLoRALinear.from_linear(nn.Linear(K, N, device=META)),
     ValueError, "weight"),
    ("qlora-linear-nan", lambda d: QLoRALinear.from_linear(
        nn.Linear(K, N).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan")))),
     ValueError, "weight"),
    ("qlora-bnb-tensor", lambda d: QLoRALinear.from_bnb(d.W), ValueError, "param"),
    ("qlora-bnb-linear", lambda d: QLoRALinear.from_bnb(LIN), ValueError, "param"),
    ("qlora-forward-features", lambda d: _q(d)(d.x[:, :3]), ValueError, "x"),
    ("qlora-forward-int", lambda d: _q(d)(d.x.int()), TypeError, "x"),
    ("qlora-forward-meta", lambda d: _q(d)(d.x.to(META)), ValueError, "x"),
    ("qlora-forward-bias", lambda d: _q(d, bias=d.b[:-1])(d.x), ValueError, "bias"),
    ("qlora-merged-features", lambda d: _merged(_q(d))(d.x[:, :3]), ValueError, "x"),
    ("qlora-merged-meta", lambda d: _merged(_q(d))(d.x.to(META)), ValueError, "x"),
    # QDoRALinear
    ("qdora-r-0", lambda d: QDoRALinear(d.q, r=0), ValueError, "r"),
    ("qdora-forward-features", lambda d: QDoRALinear(d.q, compute_dtype=F32)(d.x[:, :5]),
     ValueError, "x"),
    ("qdora-forward-int", lambda d: QDoRALinear(d.q, compute_dtype=F32)(d.x.int()), TypeError,
     "x"),
    # AdaLoRALinear, QAdaLoRALinear
    ("adalora-r-0", lambda d: AdaLoRALinear(K, N, r=0), ValueError, "r"),
    ("adalora-r-too-big", lambda d: AdaLoRALinear(K, N, r=N + 1), ValueError, "r"),
    ("adalora-dtype-int", lambda d: AdaLoRALinear(K, N, dtype=torch.int32), ValueError, "dtype"),
    ("adalora-in-0", lambda d: AdaLoRALinear(0, N), ValueError, "in_features"),
    ("adalora-linear-conv", lambda d: AdaLoRALinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError,
     "linear"),
    ("adalora-forward-features", lambda d: _ada()(d.x[:, :5]), ValueError, "x"),
    ("adalora-forward-int", lambda d: _ada()(d.x.int()), TypeError, "x"),
    ("adalora-forward-list", lambda d: _ada()(d.x.tolist()), TypeError, "x"),
    ("adalora-forward-meta", lambda d: _ada()(d.x.to(META)), ValueError, "x"),
    ("adalora-pruned-features", lambda d: _ada(pruned=True)(d.x[:, :5]), ValueError, "x"),
    ("adalora-pruned-int", lambda d: _ada(pruned=True)(d.x.int()), TypeError, "x"),
    ("qadalora-qweight-tensor", lambda d: QAdaLoRALinear(d.W), TypeError, "qweight"),
    ("qadalora-r-0", lambda d: QAdaLoRALinear(d.q, r=0), ValueError, "r"),
    ("qadalora-linear-quant_type", lambda d: QAdaLoRALinear.from_linear(LIN, quant_type="int4"),
     ValueError, "quant_type"),
    ("qadalora-forward-features", lambda d: _ada(quant=d.q)(d.x[:, :5]), ValueError, "x"),
    ("qadalora-pruned-features", lambda d: _ada(pruned=True, quant=d.q)(d.x[:, :5]), ValueError,
     "x"),
    # RankAllocator
    ("alloc-model-str", lambda d: RankAllocator("model", 4, 2, 10), TypeError, "model"),
    ("alloc-no-layers", lambda d: RankAllocator(nn.Linear(2, 2), 4, 2, 10), ValueError, "model"),
    ("alloc-init_r-none", lambda d: _alloc(init_r=None), ValueError, "init_r"),
    ("alloc-init_r-0", lambda d: _alloc(init_r=0, target_r=0), ValueError, "init_r"),
    ("alloc-target_r-big", lambda d: _alloc(target_r=R + 1), ValueError, "target_r"),
    ("alloc-target_r-negative", lambda d: _alloc(target_r=-1), ValueError, "target_r"),
    ("alloc-total_step-str", lambda d: _alloc(total_step="10"), ValueError, "total_step"),
    ("alloc-total_step-float", lambda d: _alloc(total_step=10.5), ValueError, "total_step"),
    ("alloc-total_step-short", lambda d: _alloc(total_step=10, tinit=5, tfinal=5), ValueError,
     "total_step"),
    ("alloc-tinit", lambda d: _alloc(tinit=-1), ValueError, "tinit"),
    ("alloc-deltaT", lambda d: _alloc(deltaT=0), ValueError, "deltaT"),
    ("alloc-beta1", lambda d: _alloc(beta1=1.0), ValueError, "beta1"),
    ("alloc-beta2", lambda d: _alloc(beta2=-0.5), ValueError, "beta2"),
    ("alloc-orth", lambda d: _alloc(orth_reg_weight=-1), ValueError, "orth_reg_weight"),
    # inject, merge, save_adapter, load_adapter (arguments; files are below)
    ("inject-model", lambda d: peftkern.inject("model", ["a"]), TypeError, "model"),
    ("inject-targets-int", lambda d: peftkern.inject(_Tiny(), 3), TypeError, "target_modules"),
    ("inject-targets-empty", lambda d: peftkern.inject(_Tiny(), []), ValueError,
     "target_modules"),
    ("inject-targets-none-match", lambda d: peftkern.inject(_Tiny(), ["zz"]), ValueError,
     "target_modules"),
    ("inject-r-0", lambda d: _inject(r=0), ValueError, "r"),
    ("inject-r-too-big", lambda d: _inject(r=9), ValueError, "r"),
    ("inject-quantize", lambda d: _inject(quantize="int4"), ValueError, "quantize"),
    ("inject-blocksize", lambda d: _inject(quantize="nf4", blocksize=48), ValueError,
     "blocksize"),
    ("inject-dropout", lambda d: _inject(lora_dropout=1.5), ValueError, "lora_dropout"),
    ("inject-compute_dtype", lambda d: _inject(quantize="nf4", compute_dtype=torch.int32),
     ValueError, "compute_dtype"),
    ("inject-f64-model", lambda d: peftkern.inject(_Tiny(dtype=F64), ["a"]), TypeError,
     "linear.weight"),
    ("merge-model", lambda d: peftkern.merge("model"), TypeError, "model"),
    ("unmerge-no-layers", lambda d: peftkern.unmerge(_Tiny()), ValueError, "model"),
    ("save-model", lambda d: peftkern.save_adapter("model", "out"), TypeError, "model"),
    ("save-no-layers", lambda d: peftkern.save_adapter(_Tiny(), "out"), ValueError, "model"),
    ("save-path", lambda d: peftkern.save_adapter(_inject(), 3), TypeError, "path"),
    ("save-mixed-ranks", lambda d: peftkern.save_adapter(_mixed_ranks(), "out"), ValueError,
     "model"),
    ("load-model", lambda d: peftkern.load_adapter("model", "out"), TypeError, "model"),
    ("load-path", lambda d: peftkern.load_adapter(_inject(), 3), TypeError, "path"),
    ("load-merged", lambda d: peftkern.load_adapter(_merged_model(), "out"), ValueError, "model"),
    ("qw-save-path", lambda d: d.q.save(3), TypeError, "path"),
    ("qw-load-path", lambda d: QuantizedWeight.load(None), TypeError, "path"),
]


def _merged_model():
    m = _inject()
    peftkern.merge(m)
    return m


@table(MODULES)
def test_modules_refuse(d, call, exc, name):
    run_case(d, call, exc, name)


def test_peft_enable_disable_refuse_other_models():
    pk = pytest.importorskip("peftkern.integrations.peft")
    for bad in ("model", None, nn.Linear(2, 2), _inject()):
        for fn in (pk.enable, pk.disable):
            with pytest.raises(TypeError, match=named("model")):
                fn(bad)


# ---- checkpoints: QuantizedWeight files ---------------------------------------------------------


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _safetensors(path, tensors):
    import safetensors.torch
    safetensors.torch.save_file(tensors, str(path))
    return str(path)


def _good_file(tmp, d):
    path = tmp / "good.safetensors"
    d.q.save(str(path))
    return path.read_bytes()


QW_FILES = [
    ("truncated", lambda tmp, raw, d: _write(tmp / "t", raw[:len(raw) // 2]), ValueError, "path"),
    ("header-garbage", lambda tmp, raw, d: _write(tmp / "h", raw[:8] + b"{garbage" + raw[16:]),
     ValueError, "path"),
    ("empty", lambda tmp, raw, d: _write(tmp / "e", b""), ValueError, "path"),
    ("pickle", lambda tmp, raw, d: _write(tmp / "p.pkl", pickle.dumps(d.sd)), ValueError, "path"),
    ("torch-save", lambda tmp, raw, d: (torch.save(d.sd, tmp / "w.pt"), str(tmp / "w.pt"))[1],
     ValueError, "path"),
    ("missing", lambda tmp, raw, d: str(tmp / "absent.safetensors"), ValueError, "path"),
    ("a-folder", lambda tmp, raw, d: str(tmp), ValueError, "path"),
    ("metadata-bytes", lambda tmp, raw, d: _write(tmp / "m", raw[:-5] + bytes(5)), ValueError,
     "quant_state"),
    ("wrong-shape", lambda tmp, raw, d: _safetensors(tmp / "s", {**d.sd, "weight":
                                                                 d.sd["weight"][:-1].clone()}),
     ValueError, "data"),
    ("other-shape-metadata", lambda tmp, raw, d: _safetensors(tmp / "o",
                                                              _meta(d.sd, shape=[N // 2, K])),
     ValueError, "data"),
    ("no-quant_state", lambda tmp, raw, d: _safetensors(tmp / "n", {"w": torch.ones(3)}), KeyError,
     "weight.quant_state.bitsandbytes__<type>"),
]


@pytest.mark.parametrize("make, exc, name", [r[1:] for r in QW_FILES], ids=[r[0] for r in QW_FILES])
def test_quantized_weight_load_refuses(tmp_path, d, make, exc, name):
    path = make(tmp_path, _good_file(tmp_path, d), d)
    with pytest.raises(exc, match=named(name)):
        QuantizedWeight.load(path)


# ---- checkpoints: adapters (and the model left exactly as it was) --------------------------------


def _snapshot(model, x):
    """What a failed load must not change: every tensor bit for bit, module types, each layer's
    scaling settings, and the forward."""
    layers = {n: (m.r, m.lora_alpha, m.use_rslora, m.scaling, m.merged)
              for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        y = model(x)
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()}, layers, y)


def assert_same(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1] and before[2] == after[2]
    assert torch.equal(before[3], after[3])


def _adapter(tmp, name, tensors=None, config=None, raw=None, r=R, k=16):
    """An adapter folder saved from a peftkern model, then damaged: its tensors, config or raw
    safetensors bytes replaced."""
    import safetensors.torch
    path = tmp / name
    src = peftkern.inject(_Tiny(k), ["a", "b"], r=r)
    peftkern.save_adapter(src, str(path))
    file = path / "adapter_model.safetensors"
    if tensors is not None:
        safetensors.torch.save_file(tensors(safetensors.torch.load_file(str(file))), str(file))
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(config(cfg)))
    if raw is not None:
        file.write_bytes(raw(file.read_bytes()))
    return str(path)


A_KEY = "base_model.model.a.lora_A.weight"
ADAPTERS = [
    ("truncated", dict(raw=lambda b: b[:len(b) // 2]), ValueError, "adapter_model.safetensors"),
    ("header-garbage", dict(raw=lambda b: b[:8] + b"{garbage" + b[16:]), ValueError,
     "adapter_model.safetensors"),
    ("empty", dict(raw=lambda b: b""), ValueError, "adapter_model.safetensors"),
    ("pickle", dict(raw=lambda b: pickle.dumps({A_KEY: torch.zeros(R, 16)})), ValueError,
     "adapter_model.safetensors"),
    ("wrong-shape", dict(tensors=lambda t: {**t, A_KEY: torch.zeros(5, 5)}), ValueError, A_KEY),
    ("other-rank", dict(r=2), ValueError, "adapter tensor"),
    ("other-base-shape", dict(k=32), ValueError, "adapter tensor"),
    ("other-target-names", dict(tensors=lambda t: {k.replace(".a.", ".zz."): v
                                                   for k, v in t.items()}),
     ValueError, "base_model.model.zz.lora_A.weight"),
    ("extra-tensor", dict(tensors=lambda t: {**t, "base_model.model.c.lora_A.weight":
                                             torch.zeros(R, 16)}),
     ValueError, "base_model.model.c.lora_A.weight"),
    ("missing-tensor", dict(tensors=lambda t: {k: v for k, v in t.items() if k != A_KEY}),
     ValueError, "['a']"),
    ("int-tensor", dict(tensors=lambda t: {**t, A_KEY: t[A_KEY].int()}), ValueError, A_KEY),
    ("config-not-object", dict(config=lambda c: [1, 2]), ValueError, "adapter_config.json"),
    ("config-peft_type", dict(config=lambda c: {**c, "peft_type": "IA3"}), ValueError,
     "peft_type"),
    ("config-alpha-str", dict(config=lambda c: {**c, "lora_alpha": "x"}), TypeError, "lora_alpha"),
    ("config-alpha-null", dict(config=lambda c: {**c, "lora_alpha": None}), TypeError,
     "lora_alpha"),
    ("config-rslora-str", dict(config=lambda c: {**c, "use_rslora": "no"}), TypeError,
     "use_rslora"),
]


@pytest.mark.parametrize("damage, exc, name", [r[1:] for r in ADAPTERS],
                         ids=[r[0] for r in ADAPTERS])
def test_load_adapter_refuses_and_leaves_the_model_as_it_was(tmp_path, damage, exc, name):
    path = _adapter(tmp_path, "bad", **damage)
    model = peftkern.inject(_Tiny(), ["a", "b"], r=R, lora_alpha=8)
    with torch.no_grad():  # LoRA that matters, and values the adapter's would overwrite
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    before = _snapshot(model, x)
    with pytest.raises(exc, match=named(name)):
        peftkern.load_adapter(model, path)
    assert_same(before, _snapshot(model, x))


def test_load_adapter_missing_files_name_them(tmp_path):
    model = _inject()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peftkern.load_adapter(model, str(tmp_path / "absent"))
    path = _adapter(tmp_path, "no-weights")
    os.remove(os.path.join(path, "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=named("adapter_model.safetensors")):
        peftkern.load_adapter(model, path)
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=named("adapter_config.json")):
        peftkern.load_adapter(model, str(tmp_path / "bad-json"))


def test_an_undamaged_adapter_loads(tmp_path):
    """The cases above are refused for their damage alone: the same folder undamaged loads, and
    sets the adapter's scaling."""
    path = _adapter(tmp_path, "good", config=lambda c: {**c, "lora_alpha": 2})
    model = _inject(r=R)
    peftkern.load_adapter(model, path)
    assert model.a.lora_alpha == 2 and model.a.scaling == 2 / R


def test_failed_inject_leaves_the_model_as_it_was():
    """r=4 fits layers a and b but not c (2 outputs): a and b were built first and froze the
    weights they share; inject puts every requires_grad flag back."""
    model = _Tiny()
    model.c = nn.Linear(16, 2)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=named("r")):
        peftkern.inject(model, ["a", "b", "c"], r=4)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads and all(grads.values())
    assert all(type(m) in (nn.Linear, _Tiny) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- atomic writes ------------------------------------------------------------------------------


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _fail_midway(monkeypatch):
    """safetensors' writer writes half a file, then fails (a full disk, a crash)."""
    import safetensors.torch
    real = safetensors.torch.save_file

    def half(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half)


def _record_fsync_and_replace(monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.fspath(b)))
                        or replace(a, b))
    return events


def test_quantized_weight_save_is_atomic(tmp_path, d, monkeypatch):
    path = tmp_path / "w.safetensors"
    d.q.save(str(path))
    old = path.read_bytes()
    other = peftkern.quantize_4bit(torch.randn(N, K), quant_type="fp4")
    with monkeypatch.context() as m:
        _fail_midway(m)
        with pytest.raises(OSError, match="disk full"):
            other.save(str(path))
        with pytest.raises(OSError, match="disk full"):
            other.save(str(tmp_path / "new.safetensors"))
    assert path.read_bytes() == old and _files(tmp_path) == ["w.safetensors"]  # no temp left
    with monkeypatch.context() as m:  # a failure at the rename: the old file, and no temp
        m.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError, match="crash"):
            other.save(str(path))
    assert path.read_bytes() == old and _files(tmp_path) == ["w.safetensors"]
    events = _record_fsync_and_replace(monkeypatch)
    other.save(str(path))  # and a save that succeeds: flushed to disk, then renamed
    assert events.index("fsync") < events.index(("replace", str(path)))
    assert QuantizedWeight.load(str(path)).quant_type == "fp4"
    assert _files(tmp_path) == ["w.safetensors"]


def test_save_adapter_is_atomic(tmp_path, monkeypatch):
    model = _inject(r=R)
    peftkern.save_adapter(model, str(tmp_path))
    old = {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)}
    assert sorted(old) == ["adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        model.a.lora_B.weight.normal_()
    with monkeypatch.context() as m:
        _fail_midway(m)
        with pytest.raises(OSError, match="disk full"):
            peftkern.save_adapter(model, str(tmp_path))
    assert {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)} == old
    with pytest.raises(ValueError, match=named("model")):  # refused before anything is written
        peftkern.save_adapter(_mixed_ranks(), str(tmp_path))
    assert {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)} == old
    events = _record_fsync_and_replace(monkeypatch)
    peftkern.save_adapter(model, str(tmp_path))
    for name in old:
        target = str(tmp_path / name)
        assert ("replace", target) in events
        assert "fsync" in events[:events.index(("replace", target))]
    assert _files(tmp_path) == sorted(old)
    loaded = _inject(r=R)
    peftkern.load_adapter(loaded, str(tmp_path))
    assert torch.equal(loaded.a.lora_B.weight, model.a.lora_B.weight)


# ---- integrations.peft.enable: all or nothing ---------------------------------------------------


def _peft_model():
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from helpers import LINEARS, llama, randomize_lora
    model = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=LINEARS, r=4,
                                                         lora_alpha=8))
    randomize_lora(model)
    return model


def _peft_snapshot(model, pk):
    from helpers import tokens
    with torch.no_grad():
        logits = model(input_ids=tokens()).logits
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: "forward" in m.__dict__ for n, m in model.named_modules()},
            pk.coverage(model), logits)


@pytest.mark.parametrize("where", ["deciding", "installing"])
def test_failed_enable_leaves_the_model_as_it_was(monkeypatch, where):
    import peftkern.integrations.peft as pk
    model = _peft_model()
    before = _peft_snapshot(model, pk)
    calls = []
    name = "unsupported_reason" if where == "deciding" else "_install"
    real = getattr(pk, name)

    def fail_on_fifth(m):
        calls.append(m)
        if len(calls) == 5:
            raise RuntimeError(f"{name} failed")
        return real(m)

    with monkeypatch.context() as m:
        m.setattr(pk, name, fail_on_fifth)
        with pytest.raises(RuntimeError, match=f"{name} failed"):
            pk.enable(model)
    after = _peft_snapshot(model, pk)
    assert len(calls) == 5 and after[3] == before[3] and "fused" not in before[3]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1] and before[2] == after[2]  # module types, no forward installed
    assert torch.equal(before[4], after[4])
    assert pk.enable(model) == before[3]["not enabled"]  # and it works once nothing fails
