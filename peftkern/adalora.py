"""AdaLoRA: SVD-form LoRA layers and a rank allocator that runs itself.

`AdaLoRALinear` / `QAdaLoRALinear` compute `y = base(x) + drop(x)·(A⊙E)ᵀ·Bᵀ·s/(ranknum+1e-5)` through
the fused (Q)LoRA ops, with PEFT's parameter names (`lora_A [r,K]`, `lora_E [r,1]`, `lora_B [N,r]`,
`ranknum`). `RankAllocator` is PEFT's allocator (sensitivity EMA, cubic budget, global threshold);
`attach(optimizer)` runs it after every optimizer step, so plain loops and HF Trainer need no call.

Masked ranks: in training every rank is computed, because PEFT gives masked singular values a
gradient (E=0 but dL/dE≠0), the optimizer moves them, and that feeds the next importance scores;
skipping them would change which ranks PEFT keeps. Without grad (eval, inference) only the active
ranks are computed, and `compact()` shrinks a finished model to its kept ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import formulas, ops
from .format import QuantizedWeight
from .ops import quantize_4bit
from .nn import AdapterLayer, Quantized4bitBase
from .validation import check_input, check_int_at_least, check_probability, check_real


class _SVDMixin:
    """The SVD-form branch shared by AdaLoRALinear and QAdaLoRALinear."""

    def _init_svd(self, r, lora_alpha, lora_dropout, device, dtype):
        N, K = self.out_features, self.in_features
        self._init_adapter(r, lora_alpha, lora_dropout,
                           lambda: formulas.adalora_scaling(lora_alpha, r))
        kw = dict(device=device, dtype=dtype)
        # PEFT's init: E zeros, A and B normal(0, 0.02)
        self.lora_A = nn.Parameter(torch.randn(r, K, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(N, r, **kw) * 0.02)
        self.ranknum = nn.Parameter(torch.full((1,), float(r), **kw), requires_grad=False)
        self._ranknum = float(r)  # constant; kept as a float to avoid a device read per forward

    def _factors(self, dtype):
        """`(A⊙E, B, scaling)` for the fused op: every rank in training, active ranks otherwise."""
        A, B = self.lora_A * self.lora_E, self.lora_B
        if not (self.training and torch.is_grad_enabled()):
            keep = self.lora_E.reshape(-1) != 0
            if not bool(keep.all()):
                A, B = A[keep], B[:, keep]
        return A.to(dtype), B.to(dtype), self.scaling / (self._ranknum + 1e-5)

    @torch.no_grad()
    def _keep_ranks(self, keep: torch.Tensor) -> None:
        """Shrink to the ranks in `keep` (bool [r]); the scaling (ranknum) is unchanged."""
        self.lora_A = nn.Parameter(self.lora_A[keep].clone())
        self.lora_E = nn.Parameter(self.lora_E[keep].clone())
        self.lora_B = nn.Parameter(self.lora_B[:, keep].clone())
        self.r = int(keep.sum())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"active={int((self.lora_E != 0).sum())}, lora_alpha={self.lora_alpha}")


class AdaLoRALinear(_SVDMixin, AdapterLayer):
    """AdaLoRA over a frozen dense weight: built (`in_features, out_features, bias`), or shared
    from an `nn.Linear` with `from_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, r: int = 12,
                 lora_alpha: float = 0, lora_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self._init_dense_base(in_features, out_features, bias, device, dtype)
        self._init_svd(r, lora_alpha, lora_dropout, device, self.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 12, lora_alpha: float = 0,
                    lora_dropout: float = 0.0) -> "AdaLoRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, which become frozen."""
        self = cls._bare()
        self._share_dense_base(linear)
        self._init_svd(r, lora_alpha, lora_dropout, linear.weight.device, linear.weight.dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, s = self._factors(self.weight.dtype)  # x's, or the op refuses x
        if A.shape[0] == 0:  # every rank pruned: plain torch, with the op's checks
            check_input("x", x, self.in_features, self.weight.device)
            return nn.functional.linear(x, self.weight, self.bias)
        return ops.lora_linear(x, self.weight, self.bias, A, B, s, self._dropout_p())


class QAdaLoRALinear(Quantized4bitBase, _SVDMixin, AdapterLayer):
    """AdaLoRA over a frozen 4-bit (bnb-format) weight, computed in `compute_dtype`."""

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, r: int = 12,
                 lora_alpha: float = 0, lora_dropout: float = 0.0,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self._init_base(qweight, bias, compute_dtype)
        self._init_svd(r, lora_alpha, lora_dropout, qweight.device, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 12, lora_alpha: float = 0,
                    lora_dropout: float = 0.0, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "QAdaLoRALinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        q = quantize_4bit(linear.weight.detach(), quant_type, 64, double_quant)
        return cls(q, linear.bias, r, lora_alpha, lora_dropout, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, s = self._factors(self.compute_dtype)
        if A.shape[0] == 0:
            check_input("x", x, self.in_features, self.weight.device)
            w = ops.dequantize_4bit(self.qweight, self.compute_dtype)
            return nn.functional.linear(x.to(self.compute_dtype), w, self.bias).to(x.dtype)
        return ops.qlora_linear(x, self.qweight, self.bias, A, B, s, self._dropout_p(),
                                compute_dtype=self.compute_dtype)


_SVD_TYPES = (AdaLoRALinear, QAdaLoRALinear)
_DEFAULTS = dict(tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5)


def _peft_adalora_config(model, adapter):
    """`(root module, adapter name, AdaLoraConfig)` when `model` is a PEFT AdaLoRA model (a
    PeftModel or its AdaLoraModel), else None. Layers are named from the root, as PEFT does."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    adapter = adapter or getattr(model, "active_adapter", None) or next(iter(configs))
    cfg = configs.get(adapter)
    if cfg is None or str(getattr(cfg, "peft_type", "")).split(".")[-1] != "ADALORA":
        return None
    root = model.base_model.model if hasattr(model, "base_model") and \
        hasattr(model.base_model, "model") else model.model
    return root, adapter, cfg


def _svd_params(root, adapter):
    """`{layer name: (A, E, B, layer)}`: peftkern's AdaLoRA layers, and PEFT's (adapter `adapter`)."""
    out = {}
    for n, m in root.named_modules():
        if isinstance(m, _SVD_TYPES):
            out[n] = (m.lora_A, m.lora_E, m.lora_B, m)
        elif isinstance(getattr(m, "lora_E", None), nn.ParameterDict) and adapter in m.lora_E:
            out[n] = (m.lora_A[adapter], m.lora_E[adapter], m.lora_B[adapter], m)
    return out


def _check_schedule(o: dict) -> None:
    """The allocator's budget schedule and EMA settings, each named."""
    for k in ("init_r", "deltaT"):
        check_int_at_least(k, o[k], 1)
    for k in ("tinit", "tfinal"):
        check_int_at_least(k, o[k], 0)
    t = o["target_r"]
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= o["init_r"]:
        raise ValueError(f"target_r must be in [0, init_r={o['init_r']}] (an int), got {t!r}")
    check_int_at_least("total_step", o["total_step"], 1)
    if o["total_step"] <= o["tinit"] + o["tfinal"]:
        raise ValueError(f"total_step ({o['total_step']}) must be greater than tinit + tfinal "
                         f"({o['tinit']} + {o['tfinal']}): the budget schedule needs at least one "
                         f"step")
    check_probability("beta1", o["beta1"])
    check_probability("beta2", o["beta2"])
    check_real("orth_reg_weight", o["orth_reg_weight"], lo=0.0)


class RankAllocator:
    """PEFT's AdaLoRA rank allocator over the AdaLoRA layers of `model`: peftkern's
    `AdaLoRALinear`/`QAdaLoRALinear`, or a PEFT AdaLoRA model's SVD layers (`get_peft_model` with
    an `AdaLoraConfig`, `pk.enable`d or not).

    Call `update_and_allocate(step)` after each optimizer step, or `attach(optimizer)` once, or
    use `peftkern.integrations.transformers.AdaLoRACallback` with HF Trainer. For a PEFT model the
    schedule defaults to its AdaLoraConfig, and every mask is written to the config's
    `rank_pattern`, as PEFT's own `update_and_allocate` does (so `save_pretrained` keeps it).
    """

    def __init__(self, model: nn.Module, init_r: Optional[int] = None,
                 target_r: Optional[int] = None, total_step: Optional[int] = None,
                 tinit: Optional[int] = None, tfinal: Optional[int] = None,
                 deltaT: Optional[int] = None, beta1: Optional[float] = None,
                 beta2: Optional[float] = None, orth_reg_weight: Optional[float] = None,
                 adapter: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        peft = _peft_adalora_config(model, adapter)
        root, self.adapter, self.peft_config = peft if peft else (model, adapter or "default", None)
        given = dict(init_r=init_r, target_r=target_r, total_step=total_step, tinit=tinit,
                     tfinal=tfinal, deltaT=deltaT, beta1=beta1, beta2=beta2,
                     orth_reg_weight=orth_reg_weight)
        opts = {k: v if v is not None else getattr(self.peft_config, k, _DEFAULTS.get(k))
                for k, v in given.items()}
        for k in ("init_r", "target_r", "total_step"):
            if opts[k] is None:
                raise ValueError(f"{k} is required (or pass a PEFT AdaLoRA model, whose config has it)")
        self._root = root
        self.layers = _svd_params(root, self.adapter)
        if not self.layers:
            raise ValueError("model has no AdaLoRA layers (AdaLoRALinear / QAdaLoRALinear, or a "
                             "PEFT model made with an AdaLoraConfig)")
        _check_schedule(opts)
        init_r, target_r, total_step = opts["init_r"], opts["target_r"], opts["total_step"]
        tinit, tfinal, deltaT = opts["tinit"], opts["tfinal"], opts["deltaT"]
        beta1, beta2, orth_reg_weight = opts["beta1"], opts["beta2"], opts["orth_reg_weight"]
        self.init_r, self.target_r, self.total_step = init_r, target_r, total_step
        self.tinit, self.tfinal, self.deltaT = tinit, tfinal, deltaT
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.init_bgt = sum(A.shape[0] for A, _, _, _ in self.layers.values())
        self.target_bgt = target_r * len(self.layers)
        self._pattern = None
        self._step = 0
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ema = {}  # id(param) -> (exp_avg_ipt, exp_avg_unc)
        self.rank_scores = {}  # id(param) -> fp32 per-rank mean element score

    @staticmethod
    def _params(t):
        A, E, B, _ = t
        return ((A, 0), (E, 0), (B, 1))  # (parameter, its rank dimension)

    @torch.no_grad()
    def update_ipt(self) -> None:
        """One fused pass per parameter: EMAs updated in place, per-rank scores produced."""
        for t in self.layers.values():
            for p, rank_dim in self._params(t):
                if p.grad is None:
                    continue
                if id(p) not in self.ema:
                    self.ema[id(p)] = (torch.zeros_like(p), torch.zeros_like(p))
                self.rank_scores[id(p)] = ops.adalora_update_ipt(
                    p, p.grad, *self.ema[id(p)], self.beta1, self.beta2, rank_dim)

    def _scores(self) -> dict:
        """Triplet score per rank: score_E[i] + mean(score_A[i, :]) + mean(score_B[:, i])."""
        out = {}
        for n, t in self.layers.items():
            r = t[1].shape[0]
            out[n] = sum(self.rank_scores.get(id(p), torch.zeros(r, device=p.device))
                         for p, _ in self._params(t))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict:
        scores = self._scores()
        thr = formulas.adalora_threshold(torch.cat(list(scores.values())), self.init_bgt, budget)
        pattern = {}
        for n, (_, E, _, _) in self.layers.items():
            pruned = torch.zeros_like(scores[n], dtype=torch.bool) if thr is None else scores[n] <= thr
            E.masked_fill_(pruned.view(-1, 1), 0.0)
            pattern[n] = (~pruned).tolist()
        self._pattern = pattern
        if self.peft_config is not None:  # PEFT's key: the lora_E parameter's name from the root
            self.peft_config.rank_pattern = {f"{n}.lora_E.{self.adapter}": keep
                                             for n, keep in pattern.items()}
        return pattern

    @torch.no_grad()
    def _mask_with_pattern(self) -> None:
        for n, (_, E, _, _) in self.layers.items():
            keep = torch.tensor(self._pattern[n], device=E.device)
            E.masked_fill_(~keep.view(-1, 1), 0.0)

    def budget(self, step: int):
        return formulas.adalora_budget(step, self.init_bgt, self.target_bgt, self.tinit,
                                        self.tfinal, self.total_step, self.deltaT)

    def update_and_allocate(self, step: int):
        """PEFT's step logic: update sensitivities, then mask to the scheduled budget.

        Returns the current budget. After `total_step - tfinal` the final mask is frozen.
        """
        final = self.total_step - self.tfinal
        budget, mask_now = self.budget(step)
        if step < final:
            self.update_ipt()
            if mask_now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(budget)
            self.reset_ipt()
        elif self._pattern is not None:
            self._mask_with_pattern()
        return budget

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run `update_and_allocate` after every `optimizer.step()`, counting steps from 0."""
        def hook(opt, args, kwargs):
            self.update_and_allocate(self._step)
            self._step += 1
        return optimizer.register_step_post_hook(hook)

    def rank_pattern(self) -> dict:
        """`{layer name: [kept?] * r}` from the latest mask (all True before the first mask)."""
        if self._pattern is None:
            return {n: [True] * t[1].shape[0] for n, t in self.layers.items()}
        return dict(self._pattern)

    def orth_reg(self) -> torch.Tensor:
        """PEFT's orthogonal regularizer (add it to the loss), already weighted. A PEFT AdaLoRA
        model adds it to `outputs.loss` itself when given labels: do not add it twice."""
        return ops.adalora_orth_reg([(A, B) for A, _, B, _ in self.layers.values()],
                                    self.orth_reg_weight)

    def compact(self) -> dict:
        """Resize every layer to its kept ranks (same outputs, fewer parameters); returns ranks."""
        if self.peft_config is not None:
            raise ValueError("compact() resizes peftkern AdaLoRA layers; a PEFT model keeps its "
                             "ranks in peft_config.rank_pattern (set by this allocator), which "
                             "save_pretrained and PEFT's loader use")
        for n, (_, E, _, m) in self.layers.items():
            m._keep_ranks(E.reshape(-1) != 0)
        self.layers = _svd_params(self._root, self.adapter)
        self.reset_ipt()
        self._pattern = None
        return {n: t[3].r for n, t in self.layers.items()}
