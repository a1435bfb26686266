"""The Triton backend (CUDA, or CPU under TRITON_INTERPRET=1): the fused (Q)LoRA GEMM with the
4-bit weight decoded in-kernel and the LoRA term in the epilogue, quantize / dequantize, and the
AdaLoRA sensitivity update. `config` is the tile config `dispatch.plan` chose (None: the rule)."""
from __future__ import annotations

from ... import codes
from .common import lora_xa, packed_bytes


def _kernels():
    from ...kernels import adalora, dora_norm, lora_linear, multi_lora, quant_4bit
    return lora_linear, quant_4bit, adalora, dora_norm, multi_lora


def _qstate(absmax, absmax2, code8, offset, quant_type, blocksize, device, dtype):
    return (absmax, absmax2, code8, offset, codes.code_table(quant_type, device=device),
            codes.byte_pair_table(quant_type, device=device),
            codes.byte_pair_table(quant_type, dtype, device=device), blocksize)


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mask, scale=None, out_dtype=None,
                    keep_z=False, config=None):
    xa = lora_xa(x, lora_A, mask)
    y = _kernels()[0].lora_matmul(x, weight, None, xa, lora_B.t(), scaling, None, bias,
                                  stride_wq=weight.stride(1), stride_wp=weight.stride(0),
                                  P=weight.shape[0], config=config, scale=scale,
                                  out_dtype=out_dtype, keep_z=keep_z)
    return _with_z(y, xa, keep_z)


def _with_z(y, xa, keep_z):
    """`(y, xa, z or None)` from lora_matmul's `out` or `(out, z)`."""
    return (y[0], xa, y[1]) if keep_z else (y, xa, None)


def _scaled_dy(dy, inp_scale):
    """dY ⊙ scale (one pass; scaling the tiles in-kernel spills on the sm_90a large tile)."""
    return dy if inp_scale is None else (dy * inp_scale).to(dy.dtype)


def lora_linear_dx(dy, weight, lora_A, dyb, scaling, mask, inp_scale=None, config=None):
    return _kernels()[0].lora_matmul(_scaled_dy(dy, inp_scale), weight, None, dyb, lora_A,
                                     scaling, mask, None, stride_wq=weight.stride(0),
                                     stride_wp=weight.stride(1), P=weight.shape[1], config=config)


def qlora_linear_fwd(x, qw, out_features, bias, lora_A, lora_B, scaling, mask, compute_dtype,
                     scale=None, out_dtype=None, keep_z=False, config=None):
    data, absmax, absmax2, code8, offset, quant_type, blocksize = qw
    xa = lora_xa(x, lora_A, mask)
    K = x.shape[1]
    q = _qstate(absmax, absmax2, code8, offset, quant_type, blocksize, x.device,
                compute_dtype)
    y = _kernels()[0].lora_matmul(x.to(compute_dtype), packed_bytes(data), q, xa, lora_B.t(),
                                  scaling, None, bias, stride_wq=1, stride_wp=K, P=out_features,
                                  config=config, out_dtype=out_dtype or x.dtype, scale=scale,
                                  keep_z=keep_z)
    return _with_z(y, xa, keep_z)


def qlora_linear_dx(dy, qw, in_features, lora_A, dyb, scaling, mask, compute_dtype,
                    inp_scale=None, config=None):
    data, absmax, absmax2, code8, offset, quant_type, blocksize = qw
    q = _qstate(absmax, absmax2, code8, offset, quant_type, blocksize, dy.device,
                compute_dtype)
    return _kernels()[0].lora_matmul(_scaled_dy(dy, inp_scale).to(compute_dtype),
                                     packed_bytes(data), q, dyb, lora_A, scaling, mask, None,
                                     stride_wq=in_features, stride_wp=1, P=in_features,
                                     config=config, out_dtype=dy.dtype)


def scale_grad(dy, z):
    return _kernels()[3].column_dot(dy, z)


def quantize_4bit(A, quant_type, blocksize):
    dev = A.device
    return _kernels()[1].quantize_4bit(A.reshape(-1), codes.bucket_bounds(quant_type, device=dev),
                                       codes.bucket_order(quant_type, device=dev), blocksize,
                                       quant_type == "fp4")


def dequantize_4bit(data, absmax, absmax2, code8, offset, quant_type, blocksize, numel, dtype):
    table = codes.code_table(quant_type, device=data.device)
    return _kernels()[1].dequantize_4bit(packed_bytes(data), absmax, absmax2, code8, offset, table,
                                         blocksize, numel, dtype)


def dora_norm(weight, qw, lora_A, lora_B, scaling, N, K, config=None):
    if qw is None:
        return _kernels()[3].dora_norm(weight, None, lora_A, lora_B, scaling, N, K)
    data, absmax, absmax2, code8, offset, quant_type, blocksize = qw
    q = _qstate(absmax, absmax2, code8, offset, quant_type, blocksize, data.device,
                lora_A.dtype)
    return _kernels()[3].dora_norm(packed_bytes(data), q, lora_A, lora_B, scaling, N, K)


def add_grouped_lora(y, x, A, B, scalings, adapter_index, table=None):
    """In place on y (a fresh base result): the shrink and expand kernels, no autograd."""
    return _kernels()[4].add_grouped_lora(y, x, A, B, scalings, adapter_index, table)


def block_table(adapter_index, n):
    return _kernels()[4].block_table(adapter_index, n)


def adalora_update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2, rank_dim):
    return _kernels()[2].update_ipt(p, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2, rank_dim)
