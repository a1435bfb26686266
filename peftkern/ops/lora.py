"""LoRA / QLoRA linear ops: `lora_linear` and `qlora_linear`, with autograd.

Forward: `y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`. On CUDA (or CPU under TRITON_INTERPRET=1) one
Triton kernel does the base GEMM with the 4-bit weight decoded in-kernel and the LoRA term in
the epilogue, after the small `xA` product. On CPU, a 4-bit forward with M <= 16 and
in_features % blocksize == 0 runs the C++ fused GEMV (AVX-512/AVX2, fp32 inside, any float x);
larger batches and the backward dequantize the weight in cache-sized panels of rows through the
C++ extension and multiply each panel at once, so no full-size dequantized weight is written
(`_weight_panels`).
Without the extension, or with the reference backend forced, plain torch in the compute dtype.
Backward: `dX` by the same fused kernel; `dA = s·(dY·B)ᵀ·drop(x)`, `dB = s·dYᵀ·xA` reuse the saved
`xA`; the base weight is frozen. The custom ops take 2-D `x`; the public functions reshape.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import codes
from ..validation import FLOAT_DTYPES, check_choice, check_probability, check_tensor
from . import tuning
from .backends import EXT, available, forced, pick
from .quant import dequantize_4bit

_BACKENDS = ("triton", "reference")  # dense base weight: no C++ CPU path (plain torch is BLAS)
# 4-bit weight. "cuda" is the CUDA decode GEMV (M <= 16); beyond it a forced "cuda" runs Triton.
_QUANT_BACKENDS = ("triton", "cuda", "cpp", "reference")


def _kernels():
    from ..kernels import lora_linear
    return lora_linear


def _dropped(x, mask):
    return x if mask is None else x * mask


def _gemv_fits(x, blocksize) -> bool:
    """The C++/CUDA decode GEMV's range: M <= 16, quantization blocks within rows."""
    return x.shape[0] <= codes.GEMV_MAX_ROWS and x.shape[1] % blocksize == 0


def _without_cuda_kernel(device, dtype) -> str:
    """What runs where the CUDA extension has no kernel (dX, M > 16): Triton, else (and for fp32,
    as in pick) the reference: dequantize, then cuBLAS."""
    return "triton" if "triton" in available(device) and dtype != torch.float32 else "reference"


def _quant_backend(x, blocksize, N) -> str:
    """pick(), then the CUDA GEMV where it applies: forced, or by default where it was measured
    faster than Triton on this GPU and shape (tuning.json)."""
    backend = pick(x.device, _QUANT_BACKENDS, x.dtype, matmul=True)
    fits = x.device.type == "cuda" and _gemv_fits(x, blocksize)
    if backend == "cuda" and not fits:
        return _without_cuda_kernel(x.device, x.dtype)
    if backend == "triton" and fits and forced() is None and "cuda" in available(x.device) and \
            0 < x.shape[0] <= tuning.cuda_gemv_max_m(x.device, N, x.shape[1]):
        return "cuda"
    return backend


def _tuned(t, op, quant, N, K):
    """The Triton configuration tuned for this GPU, pass and weight shape (None: the rule)."""
    if t.device.type != "cuda":
        return None
    return tuning.lora_matmul_config(t.device, op, quant, t.shape[0], N, K)


def _f32(t):
    return None if t is None else t.float().contiguous()


PANEL_ELEMS = 1 << 20  # CPU: dequantize ~4 MB of fp32 weight at a time, so it stays in cache


def _weight_panels(data, absmax, absmax2, code8, offset, quant_type, blocksize, N, K, dtype):
    """Yield `(n0, n1, W[n0:n1])` dequantized panel by panel (C++ on CPU).

    Panels start at element multiples of the absmax block (and of the nested block of 256 absmax
    when double-quantized), so each one is a valid 4-bit weight of its own; blocks may span rows.
    """
    align = blocksize * (codes.NESTED_BLOCKSIZE if absmax2 is not None else 1)
    step = align // math.gcd(K, align)           # the fewest rows whose size is a multiple of align
    rows = max(step, PANEL_ELEMS // K // step * step)
    packed = data.reshape(-1).view(torch.uint8)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        e0, e1 = n0 * K, n1 * K
        b0, b1 = e0 // blocksize, -(-e1 // blocksize)
        a2 = None if absmax2 is None else absmax2[b0 // codes.NESTED_BLOCKSIZE:
                                                 -(-b1 // codes.NESTED_BLOCKSIZE)]
        w = dequantize_4bit(packed[e0 // 2:(e1 + 1) // 2], absmax[b0:b1], a2, code8, offset,
                            quant_type, blocksize, [n1 - n0, K], dtype)
        yield n0, n1, w


def _qstate(absmax, absmax2, code8, offset, quant_type, blocksize, device):
    return (absmax, absmax2, code8, offset, codes.code_table(quant_type, device=device),
            codes.byte_pair_table(quant_type, device=device), blocksize)


def _add_lora(y, L, R2, scaling, mask=None, out_dtype=None):
    """`y + s·(L·R2) [⊙ mask]`, added in the widest dtype involved and rounded once to `out_dtype`
    (default y's). `L`, `R2` are in the LoRA dtype: fp32 adapters on a 16-bit base stay fp32."""
    out_dtype = out_dtype or y.dtype
    wide = torch.promote_types(torch.promote_types(y.dtype, L.dtype), out_dtype)
    return (y.to(wide) + _dropped(scaling * (L @ R2), mask).to(wide)).to(out_dtype)


def _lora_input(x, lora_A, mask):
    """`drop(x)` in the LoRA dtype (PEFT casts x to the adapter's dtype)."""
    return _dropped(x.to(lora_A.dtype), mask)


# ---- dense base weight -------------------------------------------------------------------------


@torch.library.custom_op("peftkern::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    xa = _lora_input(x, lora_A, mask) @ lora_A.t()
    if pick(x.device, _BACKENDS, x.dtype, matmul=True) == "triton":
        y = _kernels().lora_matmul(x, weight, None, xa, lora_B.t(), scaling, None, bias,
                                   stride_wq=weight.stride(1), stride_wp=weight.stride(0),
                                   P=weight.shape[0],
                                   config=_tuned(x, "fwd", False, *weight.shape))
    else:
        y = _add_lora(F.linear(x, weight, bias), xa, lora_B.t(), scaling)
    return y, xa


@torch.library.custom_op("peftkern::lora_linear_dx", mutates_args=())
def lora_linear_dx(dy: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                   dyb: torch.Tensor, scaling: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if pick(dy.device, _BACKENDS, dy.dtype, matmul=True) == "triton":
        return _kernels().lora_matmul(dy, weight, None, dyb, lora_A, scaling, mask, None,
                                      stride_wq=weight.stride(0), stride_wp=weight.stride(1),
                                      P=weight.shape[1],
                                      config=_tuned(dy, "dx", False, *weight.shape))
    return _add_lora(dy @ weight, dyb, lora_A, scaling, mask)


# ---- 4-bit base weight ---------------------------------------------------------------------------
# The base GEMM runs in `compute_dtype` (x is cast, as bnb's Linear4bit does), the LoRA branch in
# the adapters' dtype, and the result is rounded once to x's dtype.


@torch.library.custom_op("peftkern::qlora_linear_fwd", mutates_args=())
def qlora_linear_fwd(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
                     absmax2: Optional[torch.Tensor], code8: Optional[torch.Tensor],
                     offset: Optional[torch.Tensor], quant_type: str, blocksize: int,
                     out_features: int, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: float, mask: Optional[torch.Tensor],
                     compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xa = _lora_input(x, lora_A, mask) @ lora_A.t()
    xc = x.to(compute_dtype)
    K = x.shape[1]
    backend = _quant_backend(xc, blocksize, out_features)
    packed = data.reshape(-1).view(torch.uint8)
    if backend == "cuda":  # CUDA decode GEMV (csrc/cuda/qlora_gemv.cu), compute dtype throughout
        fuse = lora_A.dtype == compute_dtype  # else the LoRA term is added after, in its dtype
        y = EXT.qlora_gemv(xc.contiguous(), packed, absmax, absmax2, code8,
                           None if offset is None else offset.reshape(1),
                           codes.QUANT_TYPE_ID[quant_type], blocksize, out_features, bias,
                           xa.contiguous() if fuse else None,
                           lora_B.contiguous() if fuse else None, float(scaling))
        y = y.to(x.dtype) if fuse else _add_lora(y, xa, lora_B.t(), scaling, out_dtype=x.dtype)
    elif backend == "triton":
        q = _qstate(absmax, absmax2, code8, offset, quant_type, blocksize, x.device)
        y = _kernels().lora_matmul(xc, packed, q, xa, lora_B.t(), scaling, None, bias,
                                   stride_wq=1, stride_wp=K, P=out_features,
                                   config=_tuned(xc, "fwd", True, out_features, K),
                                   out_dtype=x.dtype)
    elif backend == "cpp" and _gemv_fits(xc, blocksize):
        # C++ fused decode GEMV (csrc/cpu/qlora_gemv.cpp): M <= 16, blocks within rows. It
        # computes in fp32; 16-bit activations are converted (small: M rows) and y rounded once.
        y = EXT.qlora_gemv(_f32(xc), packed, absmax, absmax2, code8,
                           None if offset is None else offset.reshape(1),
                           codes.QUANT_TYPE_ID[quant_type], blocksize, out_features, _f32(bias),
                           _f32(xa), _f32(lora_B), float(scaling)).to(x.dtype)
    elif backend == "cpp":  # larger batches: panel by panel, each panel dequantized in cache
        x32 = xc.float()  # fp32 on CPU: faster than CPU half matmuls, and one rounding at the end
        y = torch.cat([F.linear(x32, w) for _, _, w in _weight_panels(
            data, absmax, absmax2, code8, offset, quant_type, blocksize, out_features, K,
            torch.float32)], dim=1)
        if bias is not None:
            y += bias
        y = _add_lora(y, xa, lora_B.t(), scaling, out_dtype=x.dtype)
    else:  # plain torch: dequantize, then matmul
        w = dequantize_4bit(data, absmax, absmax2, code8, offset, quant_type, blocksize,
                            [out_features, K], compute_dtype)
        y = _add_lora(F.linear(xc, w, bias), xa, lora_B.t(), scaling, out_dtype=x.dtype)
    return y, xa


@torch.library.custom_op("peftkern::qlora_linear_dx", mutates_args=())
def qlora_linear_dx(dy: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
                    absmax2: Optional[torch.Tensor], code8: Optional[torch.Tensor],
                    offset: Optional[torch.Tensor], quant_type: str, blocksize: int,
                    in_features: int, lora_A: torch.Tensor, dyb: torch.Tensor, scaling: float,
                    mask: Optional[torch.Tensor], compute_dtype: torch.dtype) -> torch.Tensor:
    N = dy.shape[1]
    dyc = dy.to(compute_dtype)
    backend = pick(dy.device, _QUANT_BACKENDS, compute_dtype, matmul=True)
    if backend == "cuda":
        backend = _without_cuda_kernel(dy.device, compute_dtype)
    if backend == "triton":
        q = _qstate(absmax, absmax2, code8, offset, quant_type, blocksize, dy.device)
        return _kernels().lora_matmul(dyc, data.reshape(-1).view(torch.uint8), q, dyb, lora_A,
                                      scaling, mask, None, stride_wq=in_features, stride_wp=1,
                                      P=in_features,
                                      config=_tuned(dyc, "dx", True, N, in_features),
                                      out_dtype=dy.dtype)
    if backend == "cpp":  # dX = sum over panels of dY[:, panel]·W[panel], accumulated in fp32
        dy32, dx = dyc.float(), dy.new_zeros(dy.shape[0], in_features, dtype=torch.float32)
        for n0, n1, w in _weight_panels(data, absmax, absmax2, code8, offset, quant_type, blocksize,
                                        N, in_features, torch.float32):
            dx.addmm_(dy32[:, n0:n1], w)
        return _add_lora(dx, dyb, lora_A, scaling, mask, out_dtype=dy.dtype)
    w = dequantize_4bit(data, absmax, absmax2, code8, offset, quant_type, blocksize,
                        [N, in_features], compute_dtype)
    return _add_lora(dyc @ w, dyb, lora_A, scaling, mask, out_dtype=dy.dtype)


# ---- fake implementations (torch.compile) -------------------------------------------------------


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, mask):
    return x.new_empty(x.shape[0], weight.shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[0])


@qlora_linear_fwd.register_fake
def _(x, data, absmax, absmax2, code8, offset, quant_type, blocksize, out_features, bias, lora_A,
      lora_B, scaling, mask, compute_dtype):
    return x.new_empty(x.shape[0], out_features), lora_A.new_empty(x.shape[0], lora_A.shape[0])


@lora_linear_dx.register_fake
def _(dy, weight, lora_A, dyb, scaling, mask):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@qlora_linear_dx.register_fake
def _(dy, data, absmax, absmax2, code8, offset, quant_type, blocksize, in_features, lora_A, dyb,
      scaling, mask, compute_dtype):
    return dy.new_empty(dy.shape[0], in_features)


# ---- autograd: shared by both ops ----------------------------------------------------------------
# The fused backward gives dX, dA, dB (and dbias; dW for a dense weight that requires grad). Under
# create_graph (double backward: gradient penalties, Hessian-vector products) it runs the same math
# as differentiable torch ops instead, so the gradients themselves can be differentiated.


def _save(ctx, x, A, B, s, mask, bias, xa, weight_args):
    ctx.scaling, ctx.weight_args = s, weight_args
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, A, B, mask, xa,
                          *[t for t in weight_args if isinstance(t, torch.Tensor)])


def _setup_dense(ctx, inputs, output):
    x, weight, bias, A, B, s, mask = inputs
    ctx.dense = True
    _save(ctx, x, A, B, s, mask, bias, output[1], (weight,))


def _setup_quant(ctx, inputs, output):
    x, data, absmax, absmax2, code8, offset, qt, bs, n, bias, A, B, s, mask, cd = inputs
    ctx.dense, ctx.out_features = False, n
    _save(ctx, x, A, B, s, mask, bias, output[1],
          (data, absmax, absmax2, code8, offset, qt, bs, cd))


def _dense_weight(ctx, x):
    """The base weight as a matrix: the dense one, or the 4-bit one dequantized (create_graph)."""
    if ctx.dense:
        return ctx.saved_tensors[5]
    data, absmax, absmax2, code8, offset, qt, bs, cd = ctx.weight_args
    return dequantize_4bit(data, absmax, absmax2, code8, offset, qt, bs,
                           [ctx.out_features, x.shape[1]], cd)


def _backward(ctx, dy, _dxa):
    x, A, B, mask, xa = ctx.saved_tensors[:5]
    s, needs = ctx.scaling, ctx.needs_input_grad
    dyl = dy.to(A.dtype)
    dyb = dyl @ B
    xl = _lora_input(x, A, mask)
    dx = dw = None
    if torch.is_grad_enabled():  # create_graph: differentiable torch ops, xA recomputed
        w = _dense_weight(ctx, x)
        xa = xl @ A.t()
        if needs[0]:
            dx = _add_lora(dy.to(w.dtype) @ w, dyb, A, s, mask, out_dtype=dy.dtype)
    elif needs[0] and ctx.dense:
        dx = lora_linear_dx(dy, ctx.saved_tensors[5], A, dyb, s, mask)
    elif needs[0]:
        data, absmax, absmax2, code8, offset, qt, bs, cd = ctx.weight_args
        dx = qlora_linear_dx(dy, data, absmax, absmax2, code8, offset, qt, bs, x.shape[1], A,
                             dyb, s, mask, cd)
    if ctx.dense and needs[1]:  # a trainable base weight
        dw = dy.t() @ x
    dA = s * (dyb.t() @ xl)
    dB = s * (dyl.t() @ xa)
    dbias = None if ctx.bias_dtype is None else dy.sum(0).to(ctx.bias_dtype)
    if ctx.dense:
        return dx, dw, dbias, dA, dB, None, None
    return (dx,) + (None,) * 8 + (dbias, dA, dB, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_dense)
qlora_linear_fwd.register_autograd(_backward, setup_context=_setup_quant)


# ---- public functions: validate once, flatten leading dims, draw the dropout mask ---------------


def _check_common(x, bias, lora_A, lora_B, K, N, dropout_p, base_dtype):
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have in_features={K} as its last dimension, got shape {tuple(x.shape)}")
    check_tensor("lora_A", lora_A, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("lora_B", lora_B, ndim=2, dtypes=(lora_A.dtype,), device=x.device)
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, in_features={K}] with r >= 1, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be [out_features={N}, r={r}] to match lora_A, got "
                         f"{tuple(lora_B.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(base_dtype,), device=x.device)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have out_features={N} elements, got {bias.shape[0]}")
    check_probability("dropout_p", dropout_p)


def _mask(x2, dropout_p, dropout_mask, dtype):
    """The dropout mask (scaled by 1/(1-p)) in the LoRA dtype, or None when nothing is dropped."""
    if dropout_mask is not None:
        if dropout_mask.shape[-1] != x2.shape[1] or dropout_mask.numel() != x2.numel():
            raise ValueError(f"dropout_mask must have the shape of x, got {tuple(dropout_mask.shape)}")
        return dropout_mask.reshape(x2.shape).to(dtype)
    if dropout_p == 0.0:
        return None  # p = 0 costs nothing: no mask, no extra launch
    keep = 1.0 - dropout_p
    return torch.empty(x2.shape, dtype=dtype, device=x2.device).bernoulli_(keep).div_(keep)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ` for `x [..., K]`, `W [N, K]`, `A [r, K]`, `B [N, r]`.

    `x`, `W` and `bias` share one dtype. `A` and `B` may be in another (PEFT's fp32 adapters on a
    16-bit base): the LoRA branch and its gradients are computed in theirs, and the result is
    rounded once to x's. Dropout (PEFT semantics) applies to the LoRA input only;
    `dropout_mask` (already scaled by 1/(1-p)) replaces the random draw when given. `W` may be a
    transposed view (GPT-2's Conv1D) and may require grad (then dW is computed).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    N, K = weight.shape
    _check_common(x, bias, lora_A, lora_B, K, N, dropout_p, x.dtype)
    x2 = x.reshape(-1, K)
    y, _ = lora_linear_fwd(x2, weight, bias, lora_A, lora_B, float(scaling),
                           _mask(x2, dropout_p, dropout_mask, lora_A.dtype))
    return y.reshape(*x.shape[:-1], N)


def qlora_linear(x, qweight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                 dropout_mask: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`lora_linear` over a 4-bit `peftkern.QuantizedWeight` (decoded in-kernel, never stored).

    The base GEMM runs in `compute_dtype` (default: x's; x is cast to it, as bnb's Linear4bit
    does, and `bias` must be in it), the LoRA branch in the adapters' dtype on x itself, and the
    result comes back in x's dtype.
    """
    from ..format import QuantizedWeight
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a peftkern.QuantizedWeight, got {type(qweight).__name__}")
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    cd = x.dtype if compute_dtype is None else compute_dtype
    check_choice("compute_dtype", cd, FLOAT_DTYPES)
    N, K = qweight.shape
    _check_common(x, bias, lora_A, lora_B, K, N, dropout_p, cd)
    if qweight.device != x.device:
        raise ValueError(f"qweight is on {qweight.device}, expected {x.device} like x")
    x2 = x.reshape(-1, K)
    q = qweight
    y, _ = qlora_linear_fwd(x2, q.data, q.absmax, q.absmax2, q.code8, q.offset, q.quant_type,
                            q.blocksize, N, bias, lora_A, lora_B, float(scaling),
                            _mask(x2, dropout_p, dropout_mask, lora_A.dtype), cd)
    return y.reshape(*x.shape[:-1], N)
