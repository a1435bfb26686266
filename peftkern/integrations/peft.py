"""Hugging Face PEFT backend: PEFT's LoRA layers compute through peftkern's fused ops.

Two routes, same math:
- `enable(model)` switches the LoRA layers, and AdaLoRA's SVD layers, of an existing `PeftModel`
  (over `nn.Linear`, transformers' `Conv1D` and `bnb.nn.Linear4bit`) in place: modules,
  parameters, names and checkpoints stay PEFT's; `disable(model)` undoes it. Use it for models you
  already have (loaded adapters, QLoRA models).
- `custom_modules()` is a mapping for `LoraConfig._register_custom_module`, so that
  `get_peft_model` builds peftkern-backed layers directly. PEFT marks that hook experimental.
Mixed-adapter batches (`adapter_names=[...]`, one adapter per sample) run the grouped
`ops.multi_lora` path: one base product, every adapter's LoRA term in one shrink and one expand.
DoRA layers (`use_dora=True`) run `ops.dora_linear`, with PEFT's eval-time norm cache when
`peft.tuners.lora.dora.ENABLE_DORA_CACHING` is on. `target_parameters` LoRA on transformers'
expert weights runs `ops.moe` (`peft_moe.py`). A layer that uses something peftkern does not
fuse (other LoRA variants, custom dropout, `target_parameters` on other modules, other base
layers) keeps PEFT's own forward: `enable` logs one line naming those layers and why, and
`coverage(model)` counts them by reason. At call time, whatever PEFT handles specially (adapters
disabled, merged weights, `adapter_names` batches with DoRA or dropout in training, autocast,
dtypes peftkern does not fuse, several adapters with dropout in training or with DoRA) also goes
to PEFT.
"""
from __future__ import annotations

import collections
import logging
import warnings

import torch
from peft.tuners.lora import layer as lora_layer
from torch import nn

from .. import ops
from ..ops import dispatch, multi_lora
from . import peft_moe
from .bitsandbytes import from_bnb
from ..validation import FLOAT_DTYPES

log = logging.getLogger("peftkern")
FUSED = "fused"


def _linear4bit_type():
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _own_type(module) -> type:
    """The module's class, seen through the `FSDP<class>` subclass FSDP2's fully_shard makes."""
    cls = type(module)
    fsdp = getattr(torch.distributed, "fsdp", None) if torch.distributed.is_available() else None
    if fsdp is not None and fsdp.FSDPModule in cls.__bases__:
        return next(b for b in cls.__bases__ if b is not fsdp.FSDPModule)
    return cls


def _base_kind(base) -> str | None:
    """"dense" (nn.Linear), "conv1d" (GPT-2's Conv1D, weight [in, out]), "4bit", or None."""
    if _own_type(base) is nn.Linear:
        return "dense"
    if _conv1d_type() is not None and _own_type(base) is _conv1d_type():
        return "conv1d"
    if _linear4bit_type() is not None and isinstance(base, _linear4bit_type()):
        return "4bit"
    return None


def _mods(layer):
    """The layer's submodules by name (what nn.Module.__getattr__ searches, without its Python
    frame per lookup: the per-call checks below read them through this dict)."""
    return layer.__dict__["_modules"]


def _base_of(layer):
    """PEFT's `get_base_layer()`: the innermost `base_layer`."""
    while "base_layer" in _mods(layer):
        layer = _mods(layer)["base_layer"]
    return layer


def _adapters(layer):
    """`{name: module or parameter}` of the layer's LoRA A (a ModuleDict for LoRA, a
    ParameterDict for AdaLoRA)."""
    d = _mods(layer)["lora_A"].__dict__
    return d["_modules"] or d["_parameters"]


def unsupported_reason(layer) -> str | None:
    """Why `layer` (a PEFT LoRA or AdaLoRA layer) cannot run fused, or None when it can."""
    if isinstance(layer, lora_layer.ParamWrapper):
        return peft_moe.static_reason(layer)
    base = layer.get_base_layer()
    if _base_kind(base) is None:
        return f"base layer {type(base).__name__} is not nn.Linear, Conv1D or bnb Linear4bit"
    for name in layer.lora_A:
        variant = getattr(layer, "lora_variant", {}).get(name)
        if variant is not None and type(variant) is not _dora_variant():
            return f"LoRA variant {type(variant).__name__}"
        if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
            return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _dora_variant():
    from peft.tuners.lora.variants import DoraLinearVariant
    return DoraLinearVariant


def _dora_layer(layer, name):
    """PEFT's DoraLinearLayer of adapter `name` (holding the magnitude), or None."""
    mags = _mods(layer).get("lora_magnitude_vector")
    return None if mags is None else _mods(mags).get(name)


def _lora_A(layer, name) -> torch.Tensor:
    A = _adapters(layer)[name]
    return A if isinstance(A, torch.Tensor) else _param(A, "weight")


def _active(layer) -> list[str]:
    have = _adapters(layer)
    return [a for a in layer.active_adapters if a in have]


def _dropout_p(layer, name) -> float:
    drop = _mods(_mods(layer)["lora_dropout"])[name]
    return drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _static_reason(layer, cache) -> tuple:
    """`(unsupported_reason, base layer, its kind)`, cached per layer until its adapters, variants,
    dropout modules or base layer change (they are replaced, never mutated, when adapters are
    added or removed)."""
    mods = _mods(layer)
    key = (tuple(_adapters(layer)), tuple(getattr(layer, "lora_variant", None) or ()),
           tuple(map(id, _mods(mods["lora_dropout"]).values())), id(mods["base_layer"]))
    if cache.get("static_key") != key:
        base = _base_of(layer)
        cache["static_key"] = key
        cache["static"] = (unsupported_reason(layer), base, _base_kind(base))
    return cache["static"]


def _mixed(args, kwargs):
    """The `adapter_names` list of a mixed-adapter call (and nothing else), else None."""
    if args or set(kwargs) != {"adapter_names"} or not isinstance(kwargs["adapter_names"],
                                                                     (list, tuple)):
        return None
    return kwargs["adapter_names"]


def _used(layer, adapter_names) -> list[str]:
    """The adapters of this layer that a mixed batch names, in the layer's order."""
    wanted = set(adapter_names)
    return [a for a in _adapters(layer) if a in wanted]


def _call_reason(layer, x, args, kwargs, cache=None, names=None) -> str | None:
    """Why this call goes to PEFT, or None when it runs fused (`names`: the active adapters,
    when the caller has them)."""
    if cache is None:
        cache = {}
    if isinstance(layer, lora_layer.ParamWrapper):
        return peft_moe.call_reason(layer, args, kwargs)
    mixed = _mixed(args, kwargs)
    if mixed is not None:
        return _mixed_reason(layer, x, mixed, cache)
    if names is None:
        names = _active(layer)
    if args or kwargs:
        return "extra forward arguments"
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    if not names:
        return "no active adapter"
    static, base, kind = _static_reason(layer, cache)
    if static is not None:
        return static
    if len(names) > 1 and any(_dropout_p(layer, a) > 0 for a in names):
        return "several active adapters with dropout in training"
    if len(names) > 1 and any(_dora_layer(layer, a) is not None for a in names):
        return "several active adapters with DoRA"
    return _dtype_reason(layer, x, names, base, kind)


def _dtype_reason(layer, x, names, base, kind) -> str | None:
    """Why the dtypes of x, the adapters `names` and the base keep the call on PEFT, or None."""
    if torch.is_autocast_enabled(x.device.type):
        return "autocast"  # PEFT's layers follow autocast's dtypes; the fused ops do not
    ld = _lora_A(layer, names[0]).dtype
    if any(_lora_A(layer, a).dtype != ld for a in names[1:]) or ld not in FLOAT_DTYPES or x.dtype not in FLOAT_DTYPES:
        return "dtype peftkern does not fuse"
    if ld != x.dtype and not layer.cast_input_dtype_enabled:
        return "input dtype casting disabled"
    if kind != "4bit" and _param(base, "weight").dtype != x.dtype:
        return "input dtype differs from the base weight's"
    return None


def _mixed_reason(layer, x, adapter_names, cache) -> str | None:
    """Why a mixed-adapter (`adapter_names`) call goes to PEFT, or None when it runs grouped."""
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    static, base, kind = _static_reason(layer, cache)
    if static is not None:
        return static
    if "lora_E" in _mods(layer):
        return "adapter_names with AdaLoRA"
    if len(adapter_names) != x.shape[0] or x.dim() < 2:
        return "adapter_names does not match the batch"
    used = _used(layer, adapter_names)
    if not used:
        return "no adapter of this layer in adapter_names"
    if any(_dora_layer(layer, a) is not None or _factors(layer, a)[3] is not None for a in used):
        return "adapter_names with DoRA or lora_bias"
    if any(_dropout_p(layer, a) > 0 for a in used):
        return "adapter_names with dropout in training"
    return _dtype_reason(layer, x, used, base, kind)


def _param(module, name):
    return module.__dict__["_parameters"].get(name)


def _factors(layer, name):
    """`(A, B, scaling, lora_bias)` with `y += s·((x·Aᵀ)·Bᵀ + lora_bias)`: LoRA's weights, or
    AdaLoRA's `A⊙E` and `s / (ranknum + 1e-5)` (PEFT's SVDLinear)."""
    mods = _mods(layer)
    if "lora_E" in mods:  # ranknum stays a tensor (folded into B): no device sync
        A, E, B, rank = (_param(mods[k], name) for k in ("lora_A", "lora_E", "lora_B", "ranknum"))
        return A * E, B * (layer.scaling[name] / (rank + 1e-5)), 1.0, None
    A, B = _mods(mods["lora_A"])[name], _mods(mods["lora_B"])[name]
    return _param(A, "weight"), _param(B, "weight"), layer.scaling[name], _param(B, "bias")


def _low_rank(factors):
    """One `(A, B, scaling, bias term)` for all active adapters (their `_factors`): ranks
    stacked, each B scaled by its adapter's scaling, so one fused op sums their LoRA terms as
    PEFT does."""
    if len(factors) == 1:
        A, B, s, b = factors[0]
        return A, B, s, None if b is None else b * s
    A = torch.cat([p[0] for p in factors])
    B = torch.cat([p[1] * p[2] for p in factors], dim=1)
    biases = [p[3] * p[2] for p in factors if p[3] is not None]
    return A, B, 1.0, sum(biases) if biases else None


def _qweight(base, cache):
    """The bnb weight as a QuantizedWeight (bytes shared), rebuilt only when bnb's parameter,
    its bytes or its quant_state change."""
    w = _param(base, "weight")
    key = (id(w), w.data_ptr(), w.dtype,
           id(getattr(w, "quant_state", None) or getattr(base, "quant_state", None)))
    if cache.get("q_key") != key:  # the module: its quant_state when FSDP2 dropped the weight's
        cache["q_key"], cache["q"] = key, from_bnb(base, check=False)
    return cache["q"]


def fused_forward(layer, x: torch.Tensor, peft_forward, *args, cache=None, **kwargs):
    """PEFT LoRA forward through peftkern; `peft_forward` handles every case it does not fuse.
    `cache` (a dict kept per layer) saves the per-call checks that only change with the layer,
    and keeps a single-adapter call bound to x alone while nothing it read has changed (the
    host cost of a small layer: `python -m peftkern.bench.host`)."""
    kept = cache is not None and not torch.compiler.is_compiling()
    if not kept:  # traced once: no identities to compare
        cache = {}
    if isinstance(layer, lora_layer.ParamWrapper):  # target_parameters on expert weights
        if peft_moe.call_reason(layer, args, kwargs) is not None:
            return peft_forward(x, *args, **kwargs)
        return peft_moe.forward(layer, x, *args)
    key = _fast_key(layer, x) if kept and not args and not kwargs else None
    if key is not None:
        fast = cache.get("fast")
        if fast is not None and fast[0] == key:
            return fast[1](x)  # nothing it read has changed: the call as planned last time
    mixed = _mixed(args, kwargs)
    if mixed is not None:
        if _mixed_reason(layer, x, mixed, cache) is not None:
            return peft_forward(x, *args, **kwargs)
        return _mixed_forward(layer, x, mixed, cache)
    names = _active(layer)
    if _call_reason(layer, x, args, kwargs, cache, names) is not None:
        return peft_forward(x, *args, **kwargs)
    A, B, s, lora_bias = _low_rank([_factors(layer, a) for a in names])
    p = _dropout_p(layer, names[0])
    w, bias, cd = _base_operand(layer, x, cache)
    dora = _dora_layer(layer, names[0])
    if dora is not None:
        return ops.dora_linear(x, w, bias, A, B, s, _param(dora, "weight"), p,
                               weight_norm=_dora_norm(dora, names[0], w, A, B, s),
                               compute_dtype=cd)
    if cd is not None:
        y = ops.qlora_linear(x, w, bias, A, B, s, p, compute_dtype=cd)
    else:
        y = ops.lora_linear(x, w, bias, A, B, s, p)
    if lora_bias is not None:  # lora_bias=True: PEFT adds s·b_B after the base result
        return (y.to(lora_bias.dtype) + lora_bias).to(y.dtype)
    if key is not None and len(names) == 1 and "lora_E" not in _mods(layer):
        _keep_fast(cache, key, x, w, bias, A, B, s, p, cd)
    return y


def _keep_fast(cache, key, x, w, bias, A, B, s, p, cd):
    """After a fused call the op accepted: the same call bound to x alone (`ops.lora.bind`),
    kept with the `_fast_key` it was planned under. A 4-bit bias cast per call is not bound."""
    base = cache["static"][1]
    if bias is _param(base, "bias"):
        call = ops.lora.bind(x, w, bias, A, B, s, p, cd)
        weight = _param(base, "weight")  # held, with its quant_state: their ids stay taken
        cache["fast"] = None if call is None else \
            (key, call, weight, getattr(weight, "quant_state", None), base.__dict__.get("quant_state"))


def _facts(t):
    """What the op's checks and plan read of a tensor (its id: the kept call holds it)."""
    return None if t is None else (id(t), t.dtype, t.shape, t.device, t.requires_grad)


def _fast_key(layer, x):
    """Everything a single-adapter fused call reads that can change between calls, read in one
    pass: x; grad mode and autocast; the layer's adapter switches, its active adapter's modules,
    parameters, dropout and scaling; the base weight (a bnb one: its bytes and quant_state); and
    peftkern's dispatch state. Equal keys: the checks pass alike and the same plan runs, so the
    call kept under the key is reused (`_keep_fast`). Another adapter of the layer added or
    removed changes the count, so the layer is checked again. (Attributes that may be missing
    are read from `__dict__`: a miss through nn.Module's __getattr__ costs ~1 µs.)"""
    d = layer.__dict__
    mods, name = d["_modules"], layer._active_adapter
    if type(name) is list and len(name) == 1:
        name = name[0]
    if type(name) is not str:  # several active adapters: the full checks every call
        return None
    A, B = _mods(mods["lora_A"]).get(name), _mods(mods["lora_B"]).get(name)
    if A is None or B is None:
        return None
    base = _base_of(layer)
    bd, w = base.__dict__, _param(base, "weight")
    quant = getattr(w, "quant_state", None) or bd.get("quant_state")
    return (type(x), x.dtype, x.shape, x.device, x.requires_grad, torch.is_grad_enabled(),
            torch._C._is_any_autocast_enabled(), layer._disable_adapters,
            bool(layer.merged_adapters), name, len(_mods(mods["lora_A"])), layer.scaling.get(name),
            (d.get("lora_variant") or {}).get(name), d.get("cast_input_dtype_enabled"), A, B,
            _mods(mods["lora_dropout"]).get(name), _dropout_p(layer, name), mods["base_layer"],
            base, _facts(_param(A, "weight")), _facts(_param(B, "weight")),
            _facts(_param(B, "bias")), _facts(w), _facts(_param(base, "bias")),
            None if quant is None else (w.data_ptr(), id(quant)), bd.get("compute_dtype"),
            dispatch.stamp())


def _base_operand(layer, x, cache):
    """`(weight, bias, compute_dtype)` of the base layer as the fused ops take them."""
    _, base, kind = cache["static"]
    bias = _param(base, "bias")
    if kind == "4bit":  # computed in bnb's compute_dtype, returned in x's dtype, as bnb does
        cd = base.compute_dtype or x.dtype
        return _qweight(base, cache), None if bias is None else bias.to(cd), cd
    w = _param(base, "weight")
    return (w if kind == "dense" else w.t()), bias, None  # Conv1D: [in, out]


def _stacks(layer, used, cache):
    """`(A [n, r, K], B [n, N, r], scalings [n])` of the adapters `used`, ranks zero-padded;
    cached while the parameters keep their storage and version, unless autograd records."""
    factors = [_factors(layer, a)[:3] for a in used]
    grad = torch.is_grad_enabled() and any(A.requires_grad or B.requires_grad
                                           for A, B, _ in factors)
    key = tuple((id(A), A._version, A.data_ptr(), id(B), B._version, B.data_ptr(), s)
                for A, B, s in factors)
    if grad or cache.get("stack_key") != key:
        r = max(A.shape[0] for A, _, _ in factors)
        A = torch.stack([torch.nn.functional.pad(A, (0, 0, 0, r - A.shape[0])) for A, _, _ in factors])
        B = torch.stack([torch.nn.functional.pad(B, (0, r - B.shape[1])) for _, B, _ in factors])
        s = torch.tensor([s for _, _, s in factors], dtype=torch.float32, device=A.device)
        if grad:
            return A, B, s
        cache["stack_key"], cache["stacks"] = key, (A, B, s)
    return cache["stacks"]


def _row_index(adapter_names, used, x, cache):
    """Each row's adapter (its position in `used`, -1 for "__base__" or one this layer lacks),
    one entry per sample repeated over its tokens, and the kernels' block table; cached for
    the last list seen."""
    key = (tuple(adapter_names), tuple(used), tuple(x.shape[:-1]), x.device)
    if cache.get("index_key") != key:
        pos = {a: i for i, a in enumerate(used)}
        per_sample = torch.tensor([pos.get(a, -1) for a in adapter_names], device=x.device)
        idx = per_sample.repeat_interleave(x[0, ..., 0].numel())
        cache["index_key"] = key
        cache["index"] = (idx, multi_lora.block_table(idx, len(used)))
    return cache["index"]


def _mixed_forward(layer, x, adapter_names, cache):
    """PEFT's `_mixed_batch_forward` through the grouped op."""
    used = _used(layer, adapter_names)
    w, bias, cd = _base_operand(layer, x, cache)
    A, B, s = _stacks(layer, used, cache)
    idx, table = _row_index(adapter_names, used, x, cache)
    return multi_lora.grouped_lora_linear(x, w, bias, A, B, s, idx, cd, table)


def _dora_norm(dora, name, w, A, B, s):
    """PEFT's DoRA norm cache: kept in the DoraLinearLayer's own cache, under PEFT's key, in eval
    mode when ENABLE_DORA_CACHING is on (else cleared, as PEFT does; None: computed per call)."""
    from peft.tuners.lora import dora as peft_dora
    if not peft_dora.ENABLE_DORA_CACHING or dora.training:
        dora._cache_clear()
        return None
    key = f"weight-norm-{name}"
    if dora._cache_get(key, None) is None:
        dora._cache_store(key, ops.dora_weight_norm(w, A, B, s))
    return dora._cache_get(key, None)


class _FusedForward:
    """The forward `enable` installs: peftkern where it fuses, else the forward it replaced.

    A plain object rather than a closure, so that `copy.deepcopy`, pickle and `torch.save` carry
    it along with the layer it belongs to (a copy runs with the copy's weights).
    """

    def __init__(self, layer, attr: str, replaced):
        self.layer, self.attr = layer, attr
        self.replaced = replaced  # the instance attribute it replaced; None: the class's forward
        self.cache = {}  # per-layer results of the per-call checks (keys say when they are stale)

    def peft_forward(self, x, *args, **kwargs):
        if self.replaced is None:
            return type(self.layer).forward(self.layer, x, *args, **kwargs)
        return self.replaced(x, *args, **kwargs)

    def __call__(self, x, *args, **kwargs):
        return fused_forward(self.layer, x, self.peft_forward, *args, cache=self.cache, **kwargs)

    def __getstate__(self):  # copies and pickles start with an empty cache (ids differ there)
        return {**self.__dict__, "cache": {}}

    def uninstall(self) -> None:
        if self.replaced is None:
            delattr(self.layer, self.attr)
        else:
            setattr(self.layer, self.attr, self.replaced)


def _slot(m) -> str:
    """Where the layer's forward lives: under an accelerate hook, the hook calls
    `_old_forward`, and peftkern goes there so the hook (device moves, offload) still wraps it."""
    return "_old_forward" if hasattr(m, "_hf_hook") and "_old_forward" in m.__dict__ else "forward"


def _installed(m) -> _FusedForward | None:
    f = m.__dict__.get(_slot(m))
    return f if isinstance(f, _FusedForward) else None


def _install(m) -> None:
    attr = _slot(m)
    replaced = m.__dict__.get(attr)
    if attr == "forward" and getattr(replaced, "__self__", None) is m and \
            getattr(replaced, "__func__", None) is type(m).forward:
        replaced = None  # just the class's forward, bound: call it through the class instead
    setattr(m, attr, _FusedForward(m, attr, replaced))


def _lora_layers(model):
    # PEFT's LoRA layers and AdaLoRA's SVD layers (which AdaLoRA's custom-module hook ignores);
    # of nested ParamWrappers (several parameters of one module targeted) only the outermost,
    # which runs them all
    from peft.tuners.adalora.layer import AdaLoraLayer
    modules = list(model.named_modules())
    inner = {id(m.base_layer) for _, m in modules if isinstance(m, lora_layer.ParamWrapper)}
    for name, m in modules:
        if isinstance(m, (lora_layer.LoraLayer, AdaLoraLayer)) and isinstance(m, nn.Module) \
                and hasattr(m, "lora_A") and id(m) not in inner:
            yield name, m


def _check_peft_model(model) -> None:
    from peft import PeftModel
    if isinstance(model, PeftModel) or \
            (isinstance(model, nn.Module) and next(_lora_layers(model), None) is not None):
        return  # a PeftModel, or a module with PEFT layers (inject_adapter_in_model)
    raise TypeError(f"model must be a peft.PeftModel (from get_peft_model or "
                    f"PeftModel.from_pretrained) or a module holding PEFT LoRA layers, got "
                    f"{type(model).__name__} without any")


def enable(model) -> int:
    """Make every fusable PEFT LoRA layer of `model` compute through peftkern; returns how many
    were switched by this call (already switched ones are left as they are).

    Modules and parameters are untouched (only their forward changes), so `save_pretrained`,
    optimizers and state dicts behave exactly as before.
    """
    _check_peft_model(model)
    todo, skipped = [], []
    for name, m in _lora_layers(model):  # decide everything first: this may raise, harmlessly
        if _installed(m) is not None or getattr(type(m), "_peftkern_fused", False):
            continue
        reason = unsupported_reason(m)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
        else:
            todo.append(m)
    done = []
    try:
        for m in todo:
            _install(m)
            done.append(m)
    except BaseException:  # all or nothing: the layers switched so far get their forward back
        for m in reversed(done):
            _installed(m).uninstall()
        raise
    if skipped:
        log.warning("peftkern: %d LoRA layer(s) keep PEFT's forward: %s", len(skipped), "; ".join(skipped))
    return len(done)


def disable(model) -> int:
    """Undo `enable`: every switched layer gets back the forward it had; returns how many."""
    _check_peft_model(model)
    installed = [f for f in map(_installed, (m for _, m in _lora_layers(model))) if f is not None]
    for f in installed:
        f.uninstall()
    return len(installed)


def coverage(model) -> dict[str, int]:
    """`{reason: number of LoRA layers}`: "fused" for those that run through peftkern, else why
    not ("not enabled" where `enable` would switch them)."""
    counts = collections.Counter()
    for _, m in _lora_layers(model):
        reason = unsupported_reason(m)
        if reason is None and _installed(m) is None and not getattr(type(m), "_peftkern_fused", False):
            reason = "not enabled"
        counts[reason or FUSED] += 1
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] != FUSED, -kv[1], kv[0])))


# ---- the PEFT-native route: LoraConfig._register_custom_module ------------------------------------


def _peft_builds(base_layer, adapter_name, config, **kwargs):
    """The layer PEFT itself would build (its dispatchers, without the custom-module mapping)."""
    import copy

    from peft.tuners.lora.model import LoraModel
    config = copy.copy(config)
    config._custom_modules = None
    return LoraModel._create_new_module(config, adapter_name, base_layer, **kwargs)


_CACHE = "_peftkern_cache"  # the custom-route layer's per-layer cache, in its __dict__


class _CustomRoute:
    """The custom-module classes: PEFT's layer, computing through peftkern. A target they do not
    fuse (a parameter: `target_parameters`; a subclass such as bnb's Linear8bitLt, which PEFT's
    mapping also hands them) gets the layer PEFT would build instead. The repr is PEFT's."""
    _peftkern_fused = True
    _peft_name = "Linear"

    def __new__(cls, base_layer=None, adapter_name=None, config=None, **kwargs):
        if base_layer is None:  # unpickling
            return super().__new__(cls)
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if kwargs.get("parameter_name") is not None or _base_kind(base) is None:
            return _peft_builds(base_layer, adapter_name, config, **kwargs)
        return super().__new__(cls)

    def forward(self, x, *args, **kwargs):
        cache = self.__dict__.get(_CACHE)
        if cache is None:
            cache = self.__dict__[_CACHE] = {}
        return fused_forward(self, x, super().forward, *args, cache=cache, **kwargs)

    def __getstate__(self):  # copies and pickles start with an empty cache (ids differ there)
        state = super().__getstate__()
        state.pop(_CACHE, None)
        return state

    def _get_name(self):
        return self._peft_name


class LoraLinear(_CustomRoute, lora_layer.Linear):
    """PEFT's LoRA `Linear`, computing through peftkern (for `_register_custom_module`)."""


class LoraConv1D(LoraLinear):
    """`LoraLinear` over transformers' `Conv1D` (GPT-2): weight stored `[in, out]`."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        if not config.fan_in_fan_out:  # as PEFT's own dispatcher does for Conv1D
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.")
            config.fan_in_fan_out = True
        kwargs["fan_in_fan_out"] = True
        super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=True,
                         **kwargs)


def __getattr__(name):
    # LoraLinear4bit subclasses PEFT's bnb layer, which exists only with bitsandbytes: built on
    # first use, as a module attribute (so pickle and torch.save find it by name).
    if name != "LoraLinear4bit" or _linear4bit_type() is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from peft.tuners.lora import bnb as lora_bnb

    cls = type("LoraLinear4bit", (_CustomRoute, lora_bnb.Linear4bit), {
        "__doc__": "PEFT's LoRA `Linear4bit`, computing through peftkern.",
        "__module__": __name__, "_peft_name": "Linear4bit"})
    globals()[name] = cls
    return cls


def custom_modules() -> dict:
    """`{bnb.nn.Linear4bit: ..., Conv1D: ..., nn.Linear: ...}` for
    `LoraConfig._register_custom_module`. PEFT takes the first entry the base layer is an instance
    of, and `Linear4bit` subclasses `nn.Linear`, so it comes first."""
    mapping = {}
    if _linear4bit_type() is not None:
        mapping[_linear4bit_type()] = __getattr__("LoraLinear4bit")
    if _conv1d_type() is not None:
        mapping[_conv1d_type()] = LoraConv1D
    mapping[nn.Linear] = LoraLinear
    return mapping
