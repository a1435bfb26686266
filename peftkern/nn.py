"""Drop-in `nn.Linear` replacements: `LoRALinear` (dense base) and `QLoRALinear` (4-bit base), and
their DoRA forms `DoRALinear` / `QDoRALinear`.

They own parameters and call `peftkern.ops`; they do no math of their own. Parameter names and
init follow PEFT (`lora_A.weight` kaiming-uniform(a=√5), `lora_B.weight` zeros); only the LoRA
parameters require grad.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from . import ops
from .format import QuantizedWeight
from .formulas import lora_scaling
from .integrations.bitsandbytes import from_bnb
from .ops import dequantize_4bit, quantize_4bit
from .validation import (FLOAT_DTYPES, check_bool, check_choice, check_input, check_int_at_least,
                         check_int_in, check_probability, check_rank, check_real, check_tensor)

_QUANT_BUFFERS = ("absmax", "absmax2", "code8", "offset")


def _same_layout(old, new) -> bool:
    """Whether `new` can be copied into `old` in place (both tensors, or both None)."""
    if old is None or new is None:
        return old is None and new is None
    return old.dtype == new.dtype and old.shape == new.shape


class AdapterLayer(nn.Module):
    """The base of every peftkern adapter layer (LoRA, QLoRA, AdaLoRA, QAdaLoRA): rank and dropout
    checks, the scaling, dropout in training only, and a frozen dense base weight (built, or
    shared from an `nn.Linear`). Dense layers take `(in_features, out_features, bias, r, ...)` or
    `from_linear(linear, r, ...)`; 4-bit layers `(qweight, bias, r, ...)` or `from_linear`."""

    def _init_adapter(self, r, lora_alpha, lora_dropout, scaling_of) -> None:
        """Check r, lora_alpha and the dropout, then set them and `scaling = scaling_of()`, and
        freeze the base (only now: a shared nn.Linear stays as it was if a check fails)."""
        check_rank("r", r, self.out_features, self.in_features)
        check_real("lora_alpha", lora_alpha)
        check_probability("lora_dropout", lora_dropout)
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.scaling = scaling_of()
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)

    def _init_dense_base(self, in_features, out_features, bias, device, dtype) -> None:
        check_int_at_least("in_features", in_features, 1)
        check_int_at_least("out_features", out_features, 1)
        check_choice("dtype", dtype, (None,) + FLOAT_DTYPES)  # the ops compute in no other
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None

    def _share_dense_base(self, linear) -> None:
        """Use `linear`'s weight and bias (shared, not copied; `_init_adapter` freezes them)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_tensor("linear.weight", linear.weight, dtypes=FLOAT_DTYPES)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    @classmethod
    def _bare(cls):
        """An instance whose __init__ has not run (the from_* constructors fill it in)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        return self

    def _dropout_p(self) -> float:
        return self.lora_dropout if self.training else 0.0


class _LoRAMixin:
    """The LoRA branch shared by LoRALinear and QLoRALinear: parameters, scaling, repr."""

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, device, dtype):
        N, K = self.out_features, self.in_features
        check_bool("use_rslora", use_rslora)
        self._init_adapter(r, lora_alpha, lora_dropout,
                           lambda: lora_scaling(r, lora_alpha, use_rslora))
        self.use_rslora = use_rslora
        self.lora_A = nn.Linear(K, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, N, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.active_rank = None  # DyLoRA: None uses all r ranks

    # ---- DyLoRA: an active-rank prefix b <= r ------------------------------------------------

    def set_active_rank(self, b: Optional[int]) -> None:
        """Compute with the first `b` ranks only (DyLoRA: `s_b·B[:, :b]·A[:b]` with `s_b` the
        scaling at rank b, so the layer is what a rank-b LoRA would be); None: all `r`.
        Gradients reach only those ranks."""
        if b is not None:
            check_int_in("b", b, 1, self.r, "r=")
        self.active_rank = b

    def sample_active_rank(self, generator: Optional[torch.Generator] = None) -> int:
        """Draw b uniformly from 1..r (DyLoRA's per-step sampling), set it, and return it."""
        b = int(torch.randint(1, self.r + 1, (), generator=generator))
        self.set_active_rank(b)
        return b

    def _low_rank(self):
        """`(A, B, scaling)` at the active rank: views of the parameters' prefixes."""
        b = self.active_rank
        A, B = self.lora_A.weight, self.lora_B.weight
        if b is None or b == self.r:
            return A, B, self.scaling
        return A[:b], B[:, :b], lora_scaling(b, self.lora_alpha, self.use_rslora)

    def _delta_weight(self) -> torch.Tensor:
        """`s·B·A` in fp32, at the active rank."""
        A, B, s = self._low_rank()
        return s * (B.float() @ A.float())

    # ---- (IA)³: a learned scale on the output ----------------------------------------------

    def add_output_scale(self) -> None:
        """(IA)³ on this layer: a trainable `ia3_l [out_features]` (ones: the layer is unchanged),
        `y = ia3_l ⊙ (x·Wᵀ + b + s·B·A·drop(x))`, applied in the fused op's epilogue."""
        if self.merged:
            raise RuntimeError("add_output_scale: unmerge the layer first")
        if "lora_magnitude_vector" in self._modules:
            raise RuntimeError("add_output_scale: a DoRA layer scales its output by its magnitude")
        A = self.lora_A.weight
        self.ia3_l = nn.Parameter(torch.ones(self.out_features, device=A.device, dtype=A.dtype))

    def _scale_and_bias(self):
        """`(scale or None, bias)` for the fused op: with (IA)³ the bias is scaled too."""
        scale = self._parameters.get("ia3_l")
        if scale is None or self.bias is None:
            return scale, self.bias
        return scale, (scale * self.bias).to(self.bias.dtype)

    @torch.no_grad()
    def _fold_output_scale(self, weight: torch.Tensor, undo: bool = False) -> torch.Tensor:
        """Merging with (IA)³: `weight` (fp32, W + s·B·A) times the scale, the bias scaled in
        place; `undo` divides instead (unmerge)."""
        scale = self._parameters.get("ia3_l")
        if scale is None:
            return weight
        if not undo and bool((scale == 0).any()):
            raise ValueError("merge: ia3_l has zero entries; the merged layer could not be "
                             "unmerged")
        col = scale.float()[:, None]
        if self.bias is not None:
            self.bias.copy_(self.bias.float() / scale.float() if undo else
                            self.bias.float() * scale.float())
        return weight / col if undo else weight * col

    def extra_repr(self) -> str:
        rank = "" if self.active_rank is None else f", active_rank={self.active_rank}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}{rank}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, merged={self.merged}")


class LoRALinear(_LoRAMixin, AdapterLayer):
    """`y = x·Wᵀ + b + s·B·A·drop(x)` with a frozen dense `W`, for inputs `[..., in_features]`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self._init_dense_base(in_features, out_features, bias, device, dtype)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, device, self.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16,
                    lora_dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, which become frozen."""
        self = cls._bare()
        self._share_dense_base(linear)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, linear.weight.device,
                        linear.weight.dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # plain torch: its checks, not the fused op's
            check_input("x", x, self.in_features, self.weight.device)
            return nn.functional.linear(x, self.weight, self.bias)
        A, B, s = self._low_rank()
        scale, bias = self._scale_and_bias()
        return ops.lora_linear(x, self.weight, bias, A, B, s, self._dropout_p(), scale=scale)

    @torch.no_grad()
    def merge(self) -> None:
        """`W += s·B·A` (exact up to the rounding of W's dtype; with (IA)³ `W ← l ⊙ (W + s·B·A)`,
        `b ← l ⊙ b`); forward then skips the LoRA branch."""
        if not self.merged:
            self.weight.copy_(self._fold_output_scale(self.weight.float() + self._delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self._fold_output_scale(self.weight.float(), undo=True)
            self.weight.copy_(w - self._delta_weight())
            self.merged = False


class Quantized4bitBase:
    """A frozen 4-bit base weight saved under the keys of a bnb `Linear4bit` checkpoint. Shared by
    QLoRALinear and QAdaLoRALinear. The packed bytes are a frozen parameter, `weight`, so that
    FSDP2's `fully_shard` shards and all-gathers them with the layer's other parameters (uint8 or
    `quant_storage` bytes, copied, never computed on); the small quantization state is buffers."""

    def _init_base(self, qweight, bias, compute_dtype) -> None:
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a peftkern.QuantizedWeight, got {type(qweight).__name__}")
        check_choice("compute_dtype", compute_dtype, FLOAT_DTYPES)
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self._set_qweight(qweight)
        if bias is not None:
            check_tensor("bias", bias, ndim=1)
            bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.bias = bias

    def _set_qweight(self, q: QuantizedWeight) -> None:
        # In place where the layout is the same (FSDP2 and optimizers keep the parameter object),
        # else new tensors. Only "weight" is in the state dict directly; _save_to_state_dict
        # writes the rest under bnb's "weight.*" keys.
        new = self._quant_tensors(q)
        same = isinstance(self._parameters.get("weight"), torch.Tensor) and all(
            _same_layout(getattr(self, k), v) for k, v in new.items())
        with torch.no_grad():
            for k, v in new.items():
                if same:
                    getattr(self, k).copy_(v)
                elif k == "weight":
                    self._buffers.pop("weight", None)
                    self.weight = nn.Parameter(v, requires_grad=False)
                else:
                    self.register_buffer(k, v, persistent=False)
        self.quant_type, self.blocksize, self.weight_dtype = q.quant_type, q.blocksize, q.dtype
        self.quant_storage = q.quant_storage

    @staticmethod
    def _quant_tensors(q: QuantizedWeight) -> dict:
        return {"weight": q.data, **{f"weight_{n}": getattr(q, n) for n in _QUANT_BUFFERS}}

    @property
    def qweight(self) -> QuantizedWeight:
        if self.weight.dtype != self.quant_storage:
            raise RuntimeError(
                f"{type(self).__name__}.weight: the packed 4-bit bytes were cast from "
                f"{self.quant_storage} to {self.weight.dtype} (an FSDP2 MixedPrecisionPolicy "
                f"param_dtype?); they are codes, not numbers. Use param_dtype=None or "
                f"{self.quant_storage}, or quant_storage=torch.uint8, which no cast touches")
        return QuantizedWeight(data=self.weight, shape=torch.Size((self.out_features, self.in_features)),
                               dtype=self.weight_dtype, blocksize=self.blocksize,
                               quant_type=self.quant_type,
                               **{n: getattr(self, f"weight_{n}") for n in _QUANT_BUFFERS})

    def _apply(self, fn, recurse=True):
        """Moves apply to the packed bytes, dtype casts (`.half()`, `.to(torch.float32)`) do not:
        bytes stored as a float dtype are viewed as uint8 while `fn` runs, and viewed back."""
        w = self._parameters.get("weight")
        if type(w) is not nn.Parameter or not w.is_floating_point():
            return super()._apply(fn, recurse)  # uint8 bytes: casts skip them; DTensor: FSDP's
        self._parameters["weight"] = nn.Parameter(w.detach().view(torch.uint8), requires_grad=False)
        try:
            return super()._apply(fn, recurse)
        finally:
            u = self._parameters["weight"]
            self._parameters["weight"] = nn.Parameter(u.detach().view(w.dtype), requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.qweight.state_dict(prefix + "weight").items():
            destination[k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        mine = {k: v for k, v in state_dict.items()
                if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        if prefix + "weight" in mine:
            q = QuantizedWeight.from_state_dict(mine, prefix + "weight", device=self.weight.device)
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: checkpoint shape {tuple(q.shape)} does not match "
                                  f"this layer's ({self.out_features}, {self.in_features})")
                return
            self._set_qweight(q)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in mine]  # consumed above


class QLoRALinear(Quantized4bitBase, _LoRAMixin, AdapterLayer):
    """LoRA over a frozen 4-bit (NF4/FP4, bitsandbytes format) base weight.

    The input is cast to `compute_dtype` and the output back to the input's dtype, as
    bitsandbytes' `Linear4bit` does. The state dict holds the weight under bnb's `Linear4bit` keys.
    """

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self._init_base(qweight, bias, compute_dtype)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, qweight.device, compute_dtype)
        self._unmerged_qweight = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16,
                    lora_dropout: float = 0.0, use_rslora: bool = False, quant_type: str = "nf4",
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                    blocksize: int = 64, quant_storage: torch.dtype = torch.uint8) -> "QLoRALinear":
        """Quantize `linear`'s weight (bnb format) and add a LoRA branch.

        `quant_storage` (e.g. torch.bfloat16) views the packed bytes as that dtype, so that FSDP
        can shard them together with bf16 parameters.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        q = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant, quant_storage)
        return cls(q, linear.bias, r, lora_alpha, lora_dropout, use_rslora, compute_dtype)

    @classmethod
    def from_bnb(cls, bnb_linear4bit, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> "QLoRALinear":
        """Wrap a quantized `bnb.nn.Linear4bit`, sharing its bytes (no re-quantization)."""
        q = from_bnb(bnb_linear4bit)
        compute_dtype = getattr(bnb_linear4bit, "compute_dtype", None) or q.dtype
        return cls(q, bnb_linear4bit.bias, r, lora_alpha, lora_dropout, use_rslora, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
        if self.merged:
            check_input("x", x, self.in_features, self.weight.device)
            w = dequantize_4bit(self.qweight, self.compute_dtype)
            return nn.functional.linear(x.to(self.compute_dtype), w, self.bias).to(x.dtype)
        A, B, s = self._low_rank()
        scale, bias = self._scale_and_bias()
        return ops.qlora_linear(x, self.qweight, bias, A, B, s, self._dropout_p(),
                                compute_dtype=self.compute_dtype, scale=scale)

    @torch.no_grad()
    def merge(self) -> float:
        """Fold `s·B·A` into the 4-bit weight: dequantize, add, requantize (same settings).

        Lossy: returns (and stores in `merge_error`) the max |W_merged_4bit − (W + s·B·A)|.
        `unmerge()` restores the original bytes exactly (they are kept while merged).
        """
        if self.merged:
            return self.merge_error
        q = self.qweight
        target = self._merge_target(q)
        merged = quantize_4bit(target.to(q.dtype), q.quant_type, q.blocksize, q.nested,
                               q.quant_storage)
        self.merge_error = float((dequantize_4bit(merged, torch.float32) - target).abs().max())
        # a copy: the layer's tensors are rewritten in place
        self._unmerged_qweight = dataclasses.replace(q, **{k: v.clone() for k, v in
                                                           q._tensors().items()})
        self._set_qweight(merged)
        self.merged = True
        return self.merge_error

    def _merge_target(self, q) -> torch.Tensor:
        """The fp32 weight that merging quantizes: `W + s·B·A` (times the (IA)³ scale)."""
        return self._fold_output_scale(dequantize_4bit(q, torch.float32) + self._delta_weight())

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._set_qweight(self._unmerged_qweight.to(self.weight.device))
            self._unmerged_qweight = None
            if self.bias is not None and "ia3_l" in self._parameters:
                self._fold_output_scale(self.bias, undo=True)  # only the bias: bytes restored
            self.merged = False


class _DoRAMixin:
    """DoRA on top of a LoRA layer (PEFT's `use_dora=True`): a trainable magnitude `m [N]`
    (`lora_magnitude_vector.weight`, PEFT's name without the adapter key), initialised to the
    row norms of `W + s·B·A`, and `y = (m / ‖W + s·B·A‖) ⊙ (x·Wᵀ + s·B·A·x) + b` with the norm
    detached. `cache_norm=True` keeps the norm between eval-mode calls (PEFT's
    ENABLE_DORA_CACHING) until the adapters' versions or storage change or `train()` is called;
    a write through `.data` in eval mode is invisible to it."""

    def _init_dora(self, cache_norm: bool) -> None:
        self.lora_magnitude_vector = nn.Module()
        self.lora_magnitude_vector.weight = nn.Parameter(self.weight_norm())
        self.cache_norm = bool(cache_norm)
        self._norm_cache = None

    def weight_norm(self) -> torch.Tensor:
        """`‖W + s·B·A‖` per output row at the active rank (no gradient)."""
        A, B, s = self._low_rank()
        return ops.dora_weight_norm(self._base_weight(), A, B, s)

    def _norm(self):
        if not self.cache_norm or self.training:
            self._norm_cache = None
            return None  # dora_linear computes it
        A, B, s = self._low_rank()
        w = self._base_weight_key()
        key = (A._version, B._version, A.data_ptr(), B.data_ptr(), A.shape[0], s, id(w), w._version)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self.weight_norm())
        return self._norm_cache[1]

    def train(self, mode: bool = True):
        self._norm_cache = None
        return super().train(mode)

    def _dora_forward(self, x, compute_dtype=None):
        A, B, s = self._low_rank()
        return ops.dora_linear(x, self._base_weight(), self.bias, A, B, s,
                               self.lora_magnitude_vector.weight, self._dropout_p(),
                               weight_norm=self._norm(), compute_dtype=compute_dtype)

    def _dora_factor(self) -> torch.Tensor:
        """`m / ‖W + s·B·A‖` as a column `[N, 1]` in fp32 (merging)."""
        return (self.lora_magnitude_vector.weight.float() / self.weight_norm().float())[:, None]


class DoRALinear(_DoRAMixin, LoRALinear):
    """DoRA over a frozen dense base weight; the arguments of `LoRALinear`, plus `cache_norm`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 device=None, dtype=None, cache_norm: bool = False):
        super().__init__(in_features, out_features, bias, r, lora_alpha, lora_dropout, use_rslora,
                         device, dtype)
        self._init_dora(cache_norm)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16,
                    lora_dropout: float = 0.0, use_rslora: bool = False,
                    cache_norm: bool = False) -> "DoRALinear":
        self = super().from_linear(linear, r, lora_alpha, lora_dropout, use_rslora)
        self._init_dora(cache_norm)
        return self

    def _base_weight(self):
        return self.weight

    def _base_weight_key(self):
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            check_input("x", x, self.in_features, self.weight.device)
            return nn.functional.linear(x, self.weight, self.bias)
        return self._dora_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        """`W ← (m / ‖W + s·B·A‖) ⊙ (W + s·B·A)` (PEFT's DoRA merge); the factor is kept so that
        `unmerge` divides by the same one."""
        if not self.merged:
            self._merged_factor = self._dora_factor()
            self.weight.copy_(self._merged_factor * (self.weight.float() + self._delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self.weight.float() / self._merged_factor - self._delta_weight())
            self.merged = False


class QDoRALinear(_DoRAMixin, QLoRALinear):
    """DoRA over a frozen 4-bit base weight (QDoRA); the arguments of `QLoRALinear`, plus
    `cache_norm`. The norm decodes the 4-bit rows exactly (fp32), in the same pass."""

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, cache_norm: bool = False):
        super().__init__(qweight, bias, r, lora_alpha, lora_dropout, use_rslora, compute_dtype)
        self._init_dora(cache_norm)

    def _base_weight(self):
        return self.qweight

    def _base_weight_key(self):
        return self.weight  # the packed bytes: replaced or rewritten (a new version) on change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return super().forward(x)
        check_tensor("x", x, dtypes=FLOAT_DTYPES)
        return self._dora_forward(x, self.compute_dtype)

    def _merge_target(self, q) -> torch.Tensor:
        """`(m / ‖W + s·B·A‖) ⊙ (W + s·B·A)`: merging requantizes it (lossy, as for QLoRA)."""
        return self._dora_factor() * (dequantize_4bit(q, torch.float32) + self._delta_weight())
