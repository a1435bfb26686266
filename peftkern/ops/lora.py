"""LoRA / QLoRA linear ops: `lora_linear` and `qlora_linear`, with autograd.

Forward: `y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`; backward: `dX` by the same backend,
`dA = s·(dY·B)ᵀ·drop(x)`, `dB = s·dYᵀ·xA` from the saved `xA` (and dW for a dense weight that
requires grad). Each custom op plans its backend (`dispatch.plan`) and calls it
(`backends/<name>.py`): the fused Triton GEMM with the 4-bit weight decoded in-kernel, the C++ or
CUDA decode GEMV, dequantized panels, or plain torch. The custom ops take 2-D `x`; the public
functions validate (once per argument signature), reshape and draw the dropout mask. Eager calls
on plain tensors skip the custom op's dispatch (`_run`): the backend directly, or the `_Eager`
autograd Function around the same forward and backward. Only the gradients asked for are
computed (a frozen lora_A: no dA).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..format import QuantizedWeight, check_layout
from ..validation import (FLOAT_DTYPES, check_choice, check_last_dim, check_probability,
                          check_real, check_tensor)
from .backends import MODULES
from .backends.common import add_lora, lora_input
from .dispatch import _plan
from .dtensor import on_local_rows
from .quant import dequantize_blocks


def _qw(data, absmax, absmax2, code8, offset, quant_type, blocksize):
    return (data, absmax, absmax2, code8, offset, quant_type, blocksize)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_TORCH_BACKENDS = ("reference", "cublas")  # plain differentiable torch ops


def _eager(tensors) -> bool:
    """Whether a call may skip the custom op (the same functions run; only the host cost
    differs): nothing traces it (torch.compile and tensor subclasses take the custom op)."""
    return not torch.compiler.is_compiling() and all(t is None or type(t) in _PLAIN for t in tensors)


def _records(tensors) -> bool:
    """Whether autograd has something to record for a call on `tensors`."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- dense base weight -------------------------------------------------------------------------


def _dense_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
               mask: Optional[torch.Tensor], scale: Optional[torch.Tensor] = None,
               out_dtype: Optional[torch.dtype] = None, keep_z: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _plan("lora_linear_fwd", x, *weight.shape)
    return _z(MODULES[p.backend].lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mask,
                                                 scale, out_dtype, keep_z, p.config))


def _z(out):
    """A backend's `(y, xa, z or None)` as the op returns it: z empty when not kept."""
    y, xa, z = out
    return y, xa, y.new_empty(0) if z is None else z


def _dense_dx(dy: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
              dyb: torch.Tensor, scaling: float, mask: Optional[torch.Tensor],
              inp_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    p = _plan("lora_linear_dx", dy, *weight.shape)
    return MODULES[p.backend].lora_linear_dx(dy, weight, lora_A, dyb, scaling, mask, inp_scale,
                                             p.config)


lora_linear_fwd = torch.library.custom_op("peftkern::lora_linear_fwd", _dense_fwd, mutates_args=())
lora_linear_dx = torch.library.custom_op("peftkern::lora_linear_dx", _dense_dx, mutates_args=())



# ---- 4-bit base weight ---------------------------------------------------------------------------
# The base GEMM runs in `compute_dtype` (x is cast, as bnb's Linear4bit does), the LoRA branch in
# the adapters' dtype, and the result is rounded once to x's dtype (or `out_dtype`: the forward ops
# can return the widest of x's and the adapters' dtypes, for a scale applied after them).


def _quant_fwd(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
               absmax2: Optional[torch.Tensor], code8: Optional[torch.Tensor],
               offset: Optional[torch.Tensor], quant_type: str, blocksize: int,
               out_features: int, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
               lora_B: torch.Tensor, scaling: float, mask: Optional[torch.Tensor],
               compute_dtype: torch.dtype, scale: Optional[torch.Tensor] = None,
               out_dtype: Optional[torch.dtype] = None, keep_z: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _plan("qlora_linear_fwd", x, out_features, x.shape[1], blocksize, compute_dtype)
    qw = _qw(data, absmax, absmax2, code8, offset, quant_type, blocksize)
    return _z(MODULES[p.backend].qlora_linear_fwd(x, qw, out_features, bias, lora_A, lora_B,
                                                  scaling, mask, compute_dtype, scale, out_dtype,
                                                  keep_z, p.config))


def _quant_dx(dy: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
              absmax2: Optional[torch.Tensor], code8: Optional[torch.Tensor],
              offset: Optional[torch.Tensor], quant_type: str, blocksize: int,
              in_features: int, lora_A: torch.Tensor, dyb: torch.Tensor, scaling: float,
              mask: Optional[torch.Tensor], compute_dtype: torch.dtype,
              inp_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    p = _plan("qlora_linear_dx", dy, dy.shape[1], in_features, blocksize, compute_dtype)
    qw = _qw(data, absmax, absmax2, code8, offset, quant_type, blocksize)
    return MODULES[p.backend].qlora_linear_dx(dy, qw, in_features, lora_A, dyb, scaling, mask,
                                              compute_dtype, inp_scale, p.config)


qlora_linear_fwd = torch.library.custom_op("peftkern::qlora_linear_fwd", _quant_fwd, mutates_args=())
qlora_linear_dx = torch.library.custom_op("peftkern::qlora_linear_dx", _quant_dx, mutates_args=())


# ---- fake implementations (torch.compile) -------------------------------------------------------


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, mask, scale=None, out_dtype=None, keep_z=False):
    return _fake_out(x, weight.shape[0], lora_A, out_dtype, keep_z)


def _fake_out(x, N, lora_A, out_dtype, keep_z):
    dt = out_dtype or x.dtype
    return (x.new_empty(x.shape[0], N, dtype=dt), lora_A.new_empty(x.shape[0], lora_A.shape[0]),
            x.new_empty((x.shape[0], N) if keep_z else (0,), dtype=dt))


@qlora_linear_fwd.register_fake
def _(x, data, absmax, absmax2, code8, offset, quant_type, blocksize, out_features, bias, lora_A,
      lora_B, scaling, mask, compute_dtype, scale=None, out_dtype=None, keep_z=False):
    return _fake_out(x, out_features, lora_A, out_dtype, keep_z)


@lora_linear_dx.register_fake
def _(dy, weight, lora_A, dyb, scaling, mask, inp_scale=None):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@qlora_linear_dx.register_fake
def _(dy, data, absmax, absmax2, code8, offset, quant_type, blocksize, in_features, lora_A, dyb,
      scaling, mask, compute_dtype, inp_scale=None):
    return dy.new_empty(dy.shape[0], in_features)


# ---- autograd: shared by both ops ----------------------------------------------------------------
# The fused backward gives dX, dA, dB (and dbias; dW for a dense weight that requires grad). Under
# create_graph (double backward: gradient penalties, Hessian-vector products) it runs the same math
# as differentiable torch ops instead, so the gradients themselves can be differentiated.


def _save(ctx, x, A, B, s, mask, bias, xa, scale, z, weight_args, keep_x):
    """Save what the backward reads. x only when a gradient needs it (dA, dW of a trainable
    dense weight, or a scale's second-order graph): with lora_A frozen (LoRA-FA) dB needs only
    the saved xA. With an output scale, the scale, and the pre-scale result z when the scale
    itself needs a gradient."""
    ctx.scaling, ctx.weight_args, ctx.x_dtype = s, weight_args, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x if keep_x else None, A, B, mask, xa, scale,
                          z if z is not None and z.dim() == 2 else None,  # (0,): not kept
                          *[t for t in weight_args if isinstance(t, torch.Tensor)])


def _setup_dense(ctx, inputs, output):
    x, weight, bias, A, B, s, mask, scale, _, _ = inputs
    ctx.dense = True
    _save(ctx, x, A, B, s, mask, bias, output[1], scale, output[2], (weight,),
          A.requires_grad or weight.requires_grad)


def _setup_quant(ctx, inputs, output):
    x, data, absmax, absmax2, code8, offset, qt, bs, n, bias, A, B, s, mask, cd, scale = inputs[:16]
    ctx.dense, ctx.out_features = False, n
    _save(ctx, x, A, B, s, mask, bias, output[1], scale, output[2],
          (data, absmax, absmax2, code8, offset, qt, bs, cd), A.requires_grad)


_W = 7  # where the weight tensors start in ctx.saved_tensors


def _dense_weight(ctx, K, saved):
    """The base weight as a matrix: the dense one, or the 4-bit one dequantized (create_graph)."""
    if ctx.dense:
        return saved[_W]
    data, absmax, absmax2, code8, offset, qt, bs, cd = ctx.weight_args
    return dequantize_blocks(data, absmax, absmax2, code8, offset, qt, bs,
                             [ctx.out_features, K], cd)


def _scaled_mm(a, b, alpha):
    """alpha·(a·b) with alpha applied to the GEMM's accumulator: one rounding."""
    if alpha == 1.0:
        return a @ b
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=alpha)


def _backward(ctx, dy, _dxa, _dz, needs=None):
    """`needs`: which op inputs need a gradient (default ctx.needs_input_grad). Only those are
    computed: a frozen lora_A (LoRA-FA) costs no dA, a frozen bias no reduction. With an output
    scale g, dZ = dY ⊙ g is formed only in x's dtype for dX (the LoRA factors' gradients take the
    wide dY: dY·B becomes dY·(g⊙B), dB = g ⊙ (dYᵀ·xA)), and dg = Σ dY ⊙ z, z the pre-scale
    result the forward kept."""
    saved = ctx.saved_tensors  # unpacked once: each read of ctx.saved_tensors unpacks them all
    x, A, B, mask, xa, g, z = saved[:_W]
    s, needs = ctx.scaling, needs or ctx.needs_input_grad
    i_bias, i_A, i_B, i_g = (2, 3, 4, 7) if ctx.dense else (9, 10, 11, 15)
    graph = torch.is_grad_enabled()
    if graph and x is None and (needs[0] or g is not None):
        raise RuntimeError("double backward (create_graph=True) through a fused LoRA op with a "
                           "frozen lora_A needs the op's input, which is not kept then (LoRA-FA); "
                           "run it under peftkern.ops.use_backend('reference')")
    K = A.shape[1]
    dyl = dy.to(A.dtype)
    dy = dy.to(ctx.x_dtype)  # a wide output (out_dtype): the base path's gradient in x's dtype
    dscale = None
    if graph and g is not None:  # create_graph: the scale as torch ops, z recomputed
        z = _dense_weight(ctx, K, saved)
        z = add_lora(x.to(z.dtype) @ z.t(), lora_input(x, A, mask) @ A.t(), B.t(), s,
                     out_dtype=ctx.x_dtype)
        dscale = (dy * z).sum(0).to(g.dtype) if needs[i_g] else None
        dy, dyl, g = dy * g.to(dy.dtype), dyl * g.to(dyl.dtype), None  # dZ, as torch ops
    # Each factor's gradient is rounded once to its dtype: s enters as the GEMM's alpha, never as
    # a multiply after a rounded product (up to 1.5 ulp in 16 bits where torch's autograd has
    # ~0.5). With a scale g: 16-bit adapters form dY⊙g first, as torch does; fp32 adapters fold
    # s·g into B (dyb then carries s, so dX's LoRA term and dA take it unscaled).
    gl = g
    if g is not None and dyl.element_size() < 4:
        dyl, gl = dyl * g.to(dyl.dtype), None
    Bg, sl = (B, s) if gl is None else ((B.float() * (gl.float() * s)[:, None]).to(B.dtype), 1.0)
    dyb = dyl @ Bg if needs[0] or needs[i_A] else None
    xl = lora_input(x, A, mask) if x is not None and (needs[i_A] or graph) else None
    dx = dw = dA = dB = dbias = None
    if graph:  # create_graph: differentiable torch ops, xA recomputed (from x, when kept)
        w = _dense_weight(ctx, K, saved)
        xa = xa if xl is None else xl @ A.t()
        if needs[0]:
            dx = add_lora(dy.to(w.dtype) @ w, dyb, A, s, mask, out_dtype=dy.dtype)
    elif needs[0] and ctx.dense:
        args = (dy, saved[_W], A, dyb, sl, mask, g)
        dx = (_dense_dx if _eager(args[:4] + (g,)) else lora_linear_dx)(*args)
    elif needs[0]:
        data, absmax, absmax2, code8, offset, qt, bs, cd = ctx.weight_args
        args = (dy, data, absmax, absmax2, code8, offset, qt, bs, K, A, dyb, sl, mask, cd, g)
        dx = (_quant_dx if _eager((dy, data, A, dyb, g)) else qlora_linear_dx)(*args)
    if ctx.dense and needs[1]:  # a trainable base weight
        dw = (dy if g is None else dy * g.to(dy.dtype)).t() @ x
    if needs[i_A]:
        dA = sl * (dyb.t() @ xl) if graph else _scaled_mm(dyb.t(), xl, sl)
    if needs[i_B]:
        if graph:
            dB = s * (dyl.t() @ xa)
        elif gl is None:
            dB = _scaled_mm(dyl.t(), xa, s)
        else:  # fp32: s·g after the product
            dB = (dyl.t() @ xa).mul_((gl.float() * s)[:, None])
    if needs[i_bias] and ctx.bias_dtype is not None:
        dbias = dy.sum(0).to(ctx.bias_dtype)
    if g is not None and needs[i_g]:
        dscale = (_scale_grad if _eager((dy, z)) else scale_grad)(dy, z).to(g.dtype)
    if ctx.dense:
        return dx, dw, dbias, dA, dB, None, None, dscale, None, None
    return (dx,) + (None,) * 8 + (dbias, dA, dB, None, None, None, dscale, None, None)


def _scale_grad(dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    p = _plan("scale_grad", dy, dy.shape[1], 0, 0, dy.dtype)
    return MODULES[p.backend].scale_grad(dy, z)


scale_grad = torch.library.custom_op("peftkern::scale_grad", _scale_grad, mutates_args=())


@scale_grad.register_fake
def _(dy, z):
    return dy.new_empty(dy.shape[1], dtype=torch.float32)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_dense)
qlora_linear_fwd.register_autograd(_backward, setup_context=_setup_quant)


class _Eager(torch.autograd.Function):
    """A fused op's forward and backward as an autograd Function, for eager calls on plain
    tensors: the same functions without the dispatcher's host cost. `apply(op, plan, *op_args)`.
    (ctx-style forward: with a separate setup_context, every `apply` binds its arguments through
    `inspect.signature`.)"""

    @staticmethod
    def forward(ctx, op, plan, *args):
        out = _direct_call(op, plan, args)  # (y, xA, z or None): no placeholder for a missing z
        (_setup_dense if op == "lora_linear_fwd" else _setup_quant)(ctx, args, out)
        ctx.mark_non_differentiable(*[t for t in out[1:] if t is not None])
        return out

    @staticmethod
    def backward(ctx, dy, dxa, dz):  # the op and the plan, then the op's inputs
        return (None, None) + _backward(ctx, dy, dxa, dz, ctx.needs_input_grad[2:])


def _direct_call(op, plan, args):
    """The planned backend's forward on the custom op's arguments."""
    if op == "lora_linear_fwd":
        return MODULES[plan.backend].lora_linear_fwd(*args, plan.config)
    return MODULES[plan.backend].qlora_linear_fwd(args[0], args[1:8], *args[8:], plan.config)


def _run(op, custom, args, tensors, fields):
    """`custom(*args)`, or on eager plain tensors the planned backend directly when autograd has
    nothing to record or the backend is plain torch, else the `_Eager` Function."""
    if not _eager(tensors):
        return custom(*args)
    plan = _plan(op, tensors[0], *fields)
    if plan.backend not in _TORCH_BACKENDS and _records(tensors):
        return _Eager.apply(op, plan, *args)
    return _direct_call(op, plan, args)


def bind(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, compute_dtype=None):
    """`lora_linear` (dense `weight`) or `qlora_linear` (a QuantizedWeight, `bias` in
    `compute_dtype`) on arguments it has just accepted, as a function of x alone: checked and
    planned now, so that each call runs only the backend (and draws the dropout mask). For
    callers that call one layer many times and know when anything changes (the PEFT
    integration): it stays valid while x keeps this x's type, dtype, device, shape and
    requires_grad, the other tensors keep theirs, and the grad mode and `dispatch.stamp()`
    stay. None where the call must take the custom op (torch.compile, tensor subclasses)."""
    N, K = weight.shape
    x2 = _rows(x, K)
    if isinstance(weight, QuantizedWeight):
        qw = _qw(weight.data, weight.absmax, weight.absmax2, weight.code8, weight.offset,
                 weight.quant_type, weight.blocksize)
        op, fields, tensors = "qlora_linear_fwd", (N, K, weight.blocksize, compute_dtype), \
            (x2, bias, lora_A, lora_B, *qw[:5])
        head, tail = (*qw, N, bias), (compute_dtype, None, None, False)
    else:
        op, fields, tensors = "lora_linear_fwd", (N, K), (x2, weight, bias, lora_A, lora_B)
        head, tail = (weight, bias), (None, None, False)
    if not _eager(tensors):
        return None
    plan, s, flat = _plan(op, x2, *fields), check_real("scaling", scaling), x.dim() == 2
    eager = plan.backend not in _TORCH_BACKENDS and _records(tensors)  # as _run decides

    def call(x):
        x2 = x if flat else x.reshape(-1, K)
        mask = None if dropout_p == 0.0 else _mask(x2, dropout_p, None, lora_A.dtype)
        args = (x2, *head, lora_A, lora_B, s, mask, *tail)
        out = _Eager.apply(op, plan, *args) if eager else _direct_call(op, plan, args)
        return _unrows(out[0], x)

    return call


# ---- public functions: validate once, flatten leading dims, draw the dropout mask ---------------


_CHECKED: set = set()  # signatures of argument sets that passed the checks below


def _signature(op, x, *items):
    """What the checks read of a call: dtype and device of `x`, dtype, device and shape of each
    tensor, type and value of each scalar (a QuantizedWeight: shape, device); None when
    something else comes (then the checks run and name it). Equal signatures pass or fail alike,
    so one that passed skips them: they are most of a small layer's host time."""
    if type(x) not in _PLAIN:
        return None
    sig = [op, x.dtype, x.device]
    for t in items:
        if type(t) in _PLAIN:
            sig.append((t.dtype, t.device, t.shape))
        elif t is None or type(t) in (float, int, torch.dtype):
            sig.append((type(t), t))
        elif type(t) is QuantizedWeight:
            key = _layout(t)
            if key is None:
                return None
            sig.append(key)
        else:
            return None
    return tuple(sig)


def _layout(q):
    """What `check_layout` reads of a QuantizedWeight (its fields' dtypes, devices and shapes,
    never their values); None when a field is not a plain tensor (then the checks run)."""
    key = [q.shape, q.quant_type, q.blocksize, q.dtype]
    for f in (q.data, q.absmax, q.absmax2, q.code8, q.offset):
        if type(f) in _PLAIN:
            key.append((f.dtype, f.device, f.shape))
        elif f is None:
            key.append(None)
        else:
            return None
    return tuple(key)


def _passed(sig) -> bool:
    return sig is not None and sig in _CHECKED


def _remember(sig) -> None:
    if sig is not None:
        if len(_CHECKED) > 4096:  # bounded: a long run with many shapes starts over
            _CHECKED.clear()
        _CHECKED.add(sig)


def _rows(x, K):
    """x as [M, K] (a view where it can be; x itself when 2-D: a view costs autograd a node)."""
    if x.dim() < 1 or x.shape[-1] != K:
        check_last_dim("x", x, K)  # raises
    return x if x.dim() == 2 else x.reshape(-1, K)


def _unrows(y, x):
    """The [M, N] result with x's leading dimensions, as a tensor of its own rather than a view
    (as torch's matmul returns it): FSDP2 warns on a module output that is a view, since an
    in-place op on one drops its pre-backward hook. y is this call's fresh result, held nowhere
    else, so nothing can see the shared storage."""
    if x.dim() == 2 and y._base is None:
        return y
    return torch.ops.aten._unsafe_view(y.contiguous(), (*x.shape[:-1], y.shape[1]))


def check_factors(lora_A, lora_B, N, K, device, like="x"):
    """`lora_A [r, K]` and `lora_B [N, r]`, one float dtype, on `device` (that of `like`)."""
    check_tensor("lora_A", lora_A, ndim=2, dtypes=FLOAT_DTYPES, device=device, like=like)
    check_tensor("lora_B", lora_B, ndim=2, dtypes=(lora_A.dtype,), device=device, like=like)
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, in_features={K}] with r >= 1, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be [out_features={N}, r={r}] to match lora_A, got "
                         f"{tuple(lora_B.shape)}")


def check_features(name, t, N, device, dtypes=FLOAT_DTYPES):
    """A per-output-feature vector `[N]` (a bias, a scale, DoRA's magnitude or norm)."""
    check_tensor(name, t, ndim=1, dtypes=dtypes, device=device, like="x")
    if t.shape[0] != N:
        raise ValueError(f"{name} must have out_features={N} elements, got {t.shape[0]}")


def _check_common(x, bias, lora_A, lora_B, K, N, dropout_p, base_dtype):
    _rows(x, K)
    check_factors(lora_A, lora_B, N, K, x.device)
    if bias is not None:
        check_features("bias", bias, N, x.device, (base_dtype,))
    check_probability("dropout_p", dropout_p)


def check_base(x, weight, compute_dtype=None, name="weight"):
    """A float `x` and its base weight: dense `[N, K]` in x's dtype, or a well-formed
    QuantizedWeight computed in `compute_dtype`, on x's device. Returns the base GEMM's dtype
    (the bias's)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if isinstance(weight, QuantizedWeight):
        check_choice("compute_dtype", compute_dtype, FLOAT_DTYPES)
        check_layout(weight, name)
        if weight.device != x.device:
            raise ValueError(f"{name} is on {weight.device}, expected {x.device} like x")
        return compute_dtype
    check_tensor(name, weight, ndim=2, dtypes=(x.dtype,), device=x.device, like="x")
    return x.dtype


def check_lora(x, weight, bias, lora_A, lora_B, dropout_p, compute_dtype=None, name="weight"):
    """The fused ops' argument checks: a dense `weight` in x's dtype, or a QuantizedWeight with
    `compute_dtype` (the bias's dtype then)."""
    base_dtype = check_base(x, weight, compute_dtype, name)
    N, K = weight.shape
    _check_common(x, bias, lora_A, lora_B, K, N, dropout_p, base_dtype)


def _mask(x2, dropout_p, dropout_mask, dtype):
    """The dropout mask (scaled by 1/(1-p)) in the LoRA dtype, or None when nothing is dropped."""
    if dropout_mask is not None:
        check_tensor("dropout_mask", dropout_mask, dtypes=FLOAT_DTYPES, device=x2.device, like="x")
        if dropout_mask.shape[-1] != x2.shape[1] or dropout_mask.numel() != x2.numel():
            raise ValueError(f"dropout_mask must have the shape of x, got {tuple(dropout_mask.shape)}")
        return dropout_mask.reshape(x2.shape).to(dtype)
    if dropout_p == 0.0:
        return None  # p = 0 costs nothing: no mask, no extra launch
    keep = 1.0 - dropout_p
    return torch.empty(x2.shape, dtype=dtype, device=x2.device).bernoulli_(keep).div_(keep)


@on_local_rows
def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                dropout_mask: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ` for `x [..., K]`, `W [N, K]`, `A [r, K]`, `B [N, r]`.

    `x`, `W` and `bias` share one dtype. `A` and `B` may be in another (PEFT's fp32 adapters on a
    16-bit base): the LoRA branch and its gradients are computed in theirs, and the result is
    rounded once to x's. Dropout (PEFT semantics) applies to the LoRA input only;
    `dropout_mask` (already scaled by 1/(1-p)) replaces the random draw when given. `W` may be a
    transposed view (GPT-2's Conv1D) and may require grad (then dW is computed). `scale` ([N],
    optional, may be trainable: (IA)³'s learned vector) multiplies each output feature before
    the bias: `(x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) ⊙ scale + bias`.
    """
    sig = _signature("dense", x, weight, bias, lora_A, lora_B, dropout_p, scale)
    if not _passed(sig):
        check_lora(x, weight, bias, lora_A, lora_B, dropout_p)
        if scale is not None:
            check_features("scale", scale, weight.shape[0], x.device)
        _remember(sig)
    return _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask, scale)


def _keep_z(scale) -> bool:
    """Whether the fused forward also returns the pre-scale result: when the scale needs a
    gradient (dscale = Σ dY ⊙ z)."""
    return scale is not None and scale.requires_grad and torch.is_grad_enabled()


def _z_dtype(x, lora_A, keep_z, out_dtype):
    """The fused call's result dtype when z is kept for adapters wider than x: theirs, so z keeps
    PEFT's precision (its LoRA term is in their dtype; dscale = Σ dY ⊙ z), and the caller rounds
    y to x's after. None otherwise (the result as asked)."""
    if out_dtype is not None or not keep_z:
        return None
    wide = torch.promote_types(x.dtype, lora_A.dtype)
    return None if wide == x.dtype else wide


def _lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, dropout_mask=None,
                 scale=None, out_dtype=None):
    """`lora_linear` on checked arguments (the PEFT integration checks once per layer state);
    `out_dtype`: the result's dtype (None: x's)."""
    N, K = weight.shape
    x2 = _rows(x, K)
    mask = _mask(x2, dropout_p, dropout_mask, lora_A.dtype)

    s = check_real("scaling", scaling)  # per call: the signature leaves the scaling out
    keep = _keep_z(scale)
    wide = _z_dtype(x2, lora_A, keep, out_dtype)
    args = (x2, weight, bias, lora_A, lora_B, s, mask, scale, out_dtype or wide, keep)
    y = _run("lora_linear_fwd", lora_linear_fwd, args,
             (x2, weight, bias, lora_A, lora_B, mask, scale), (N, K))[0]
    return _unrows(y if wide is None else y.to(x2.dtype), x)


@on_local_rows
def qlora_linear(x, qweight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                 dropout_mask: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None,
                 scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`lora_linear` over a 4-bit `peftkern.QuantizedWeight` (decoded in-kernel, never stored).

    The base GEMM runs in `compute_dtype` (default: x's; x is cast to it, as bnb's Linear4bit
    does, and `bias` must be in it), the LoRA branch in the adapters' dtype on x itself, and the
    result comes back in x's dtype. `scale`: as in `lora_linear`.
    """
    sig = _signature("quant", x, qweight, bias, lora_A, lora_B, dropout_p, compute_dtype, scale)
    cd = compute_dtype or getattr(x, "dtype", None)
    if not _passed(sig):
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a peftkern.QuantizedWeight, got {type(qweight).__name__}")
        check_lora(x, qweight, bias, lora_A, lora_B, dropout_p, cd, "qweight")
        if scale is not None:
            check_features("scale", scale, qweight.shape[0], x.device)
        _remember(sig)
    return _qlora_linear(x, qweight, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask, cd,
                         scale)


def base_linear(x, weight, bias, compute_dtype=None):
    """`x·Wᵀ + bias` alone for checked 2-D x, differentiable in x, in x's dtype: torch for a dense
    weight; a 4-bit one through the fused op with its LoRA term switched off (scaling 0, a frozen
    zero rank-1 factor: a few percent of the product), so it takes the same decode paths."""
    if not isinstance(weight, QuantizedWeight):
        return torch.nn.functional.linear(x, weight, bias)
    zero = x.new_zeros(1, x.shape[1], dtype=torch.float32)
    return _qlora_linear(x, weight, bias, zero, zero.new_zeros(weight.shape[0], 1), 0.0, 0.0, None,
                         compute_dtype or x.dtype)


def _qlora_linear(x, q, bias, lora_A, lora_B, scaling, dropout_p, dropout_mask, compute_dtype,
                  scale=None, out_dtype=None):
    """`qlora_linear` on checked arguments."""
    N, K = q.shape
    x2 = _rows(x, K)
    mask = _mask(x2, dropout_p, dropout_mask, lora_A.dtype)
    qw = _qw(q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type, q.blocksize)

    s = check_real("scaling", scaling)
    keep = _keep_z(scale)
    wide = _z_dtype(x2, lora_A, keep, out_dtype)
    args = (x2, *qw, N, bias, lora_A, lora_B, s, mask, compute_dtype, scale, out_dtype or wide,
            keep)
    y = _run("qlora_linear_fwd", qlora_linear_fwd, args,
             (x2, bias, lora_A, lora_B, mask, scale, *qw[:5]), (N, K, q.blocksize, compute_dtype))[0]
    return _unrows(y if wide is None else y.to(x2.dtype), x)
