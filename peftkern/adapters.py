"""One-call LoRA/QLoRA for plain PyTorch models, with adapters in PEFT's on-disk format.

`inject` swaps matching `nn.Linear` modules for `LoRALinear` / `QLoRALinear`; `save_adapter` writes
`adapter_config.json` + `adapter_model.safetensors` exactly as PEFT names them
(`base_model.model.<module>.lora_A.weight`), so plain PEFT loads a peftkern adapter and
`load_adapter` loads a PEFT one.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .nn import LoRALinear, QLoRALinear
from .formulas import lora_scaling
from .format import atomic_write, save_safetensors
from .validation import check_bool, check_choice, check_path, check_real

_PREFIX = "base_model.model."
_LORA_TYPES = (LoRALinear, QLoRALinear)


def _matches(name: str, target_modules) -> bool:
    # PEFT's rule: a string is a regex that must match the whole name; a list matches a name equal
    # to an entry or ending with "." + entry.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: nn.Module, target_modules: Union[str, Iterable[str]], r: int = 8,
           lora_alpha: float = 16, lora_dropout: float = 0.0, quantize: Optional[str] = None,
           use_rslora: bool = False, double_quant: bool = True, blocksize: int = 64,
           compute_dtype: Optional[torch.dtype] = None,
           quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Swap every `nn.Linear` whose name matches `target_modules` for a LoRA layer, in place.

    `quantize="nf4"|"fp4"` makes the base weights 4-bit (`QLoRALinear`). Afterwards only the LoRA
    parameters require grad. Nothing changes if any argument is bad or nothing matches.
    """
    _check_model(model)
    if quantize is not None:
        check_choice("quantize", quantize, (None, "nf4", "fp4"))
    if not isinstance(target_modules, str):
        if not isinstance(target_modules, Iterable):
            raise TypeError(f"target_modules must be a regex string or a list of names, got "
                            f"{type(target_modules).__name__}")
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be a regex string or a non-empty list of names, "
                             f"got {target_modules!r}")
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and _matches(n, target_modules)]
    if not targets:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear][:10]
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear in the model "
                         f"(some of its Linear layers: {linears})")
    frozen = {p: p.requires_grad for p in model.parameters()}
    new = {}
    try:  # build everything first: a bad argument leaves the model untouched
        for name, lin in targets:
            if quantize is None:
                new[name] = LoRALinear.from_linear(lin, r, lora_alpha, lora_dropout, use_rslora)
            else:
                new[name] = QLoRALinear.from_linear(
                    lin, r, lora_alpha, lora_dropout, use_rslora, quantize, double_quant,
                    compute_dtype or lin.weight.dtype, blocksize, quant_storage)
    except BaseException:  # the layers built so far froze their shared weights: undo that
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        raise
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in f".{pname}" or ".lora_B." in f".{pname}")
    model._peftkern_config = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                  use_rslora=use_rslora, target_modules=sorted(new))
    return model


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _lora_modules(model: nn.Module) -> dict:
    _check_model(model)
    found = {n: m for n, m in model.named_modules() if isinstance(m, _LORA_TYPES)}
    if not found:
        raise ValueError("model has no peftkern LoRA layers (call peftkern.inject first)")
    return found


def merge(model: nn.Module) -> None:
    """Merge every LoRA layer's update into its base weight (4-bit merges are lossy)."""
    for m in _lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in _lora_modules(model).values():
        m.unmerge()


def trainable_parameters(model: nn.Module) -> list:
    """`(name, parameter)` for every parameter that requires grad (the LoRA ones after inject)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_adapter(model: nn.Module, path: str) -> None:
    """Write the LoRA weights and config in PEFT's format (loadable by `PeftModel.from_pretrained`).

    Each file is written atomically (a temporary file beside it, fsync, rename): a failure or a
    crash midway leaves an adapter already at `path` intact, and no partial file."""
    mods = _lora_modules(model)
    check_path("path", path)
    first = next(iter(mods.values()))
    if any(m.r != first.r or m.lora_alpha != first.lora_alpha for m in mods.values()):
        raise ValueError("model: save_adapter needs one r and lora_alpha for all layers (PEFT's "
                         "format)")
    tensors = {}
    for name, m in mods.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    config = json.dumps(dict(peft_type="LORA", r=first.r, lora_alpha=first.lora_alpha,
                             lora_dropout=first.lora_dropout, use_rslora=first.use_rslora,
                             target_modules=sorted(mods), bias="none", fan_in_fan_out=False,
                             task_type=None, inference_mode=True, base_model_name_or_path=None),
                        indent=2)  # before any write: a value JSON cannot hold fails here
    os.makedirs(path, exist_ok=True)
    save_safetensors(tensors, os.path.join(path, "adapter_model.safetensors"), {"format": "pt"})
    atomic_write(os.path.join(path, "adapter_config.json"), lambda tmp: _write_text(tmp, config))


def _write_text(file: str, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)


def load_adapter(model: nn.Module, path: str) -> None:
    """Load a PEFT LoRA adapter (or one from `save_adapter`) into `model`'s peftkern LoRA layers.

    Every tensor is checked (names, shapes, dtypes) before any is copied, so a mismatching or
    damaged adapter raises and leaves the model as it was. Safetensors only.
    """
    mods = _lora_modules(model)
    check_path("path", path)
    merged = [n for n, m in mods.items() if m.merged]
    if merged:  # new factors under a merged base weight: unmerge would subtract the wrong delta
        raise ValueError(f"model has merged LoRA layer(s) {merged[:5]}; unmerge before "
                         f"load_adapter")
    config = _read_config(path)
    import safetensors.torch
    file = os.path.join(path, "adapter_model.safetensors")
    try:
        tensors = safetensors.torch.load_file(file)
    except Exception as e:  # safetensors raises its own types for damaged files
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
    plan = []
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(_PREFIX) + r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if m is None or m.group(1) not in mods:
            raise ValueError(f"adapter tensor {key!r} matches no peftkern LoRA layer of the model")
        param = getattr(mods[m.group(1)], m.group(2)).weight
        if t.shape != param.shape:
            raise ValueError(f"adapter tensor {key!r} has shape {tuple(t.shape)}, but the model's "
                             f"layer expects {tuple(param.shape)} (adapter for another base shape "
                             f"or rank?)")
        if not t.is_floating_point():
            raise ValueError(f"adapter tensor {key!r} has dtype {t.dtype}, expected a float dtype")
        plan.append((param, t))
    loaded = {id(p) for p, _ in plan}
    missing = [n for n, m in mods.items() if id(m.lora_A.weight) not in loaded
               or id(m.lora_B.weight) not in loaded]
    if missing:
        raise ValueError(f"adapter has no weights for LoRA layer(s) {missing[:5]}")
    rslora = config.get("use_rslora", False)  # the adapter's scaling, as PEFT would apply it
    scaling = {n: (config.get("lora_alpha", m.lora_alpha), rslora) for n, m in mods.items()}
    scaling = {n: (a, rs, lora_scaling(mods[n].r, a, rs)) for n, (a, rs) in scaling.items()}
    with torch.no_grad():  # everything checked and computed: nothing below can fail halfway
        for param, t in plan:
            param.copy_(t)
    for n, m in mods.items():
        m.lora_alpha, m.use_rslora, m.scaling = scaling[n]


def _read_config(path) -> dict:
    """adapter_config.json, its fields that load_adapter reads checked."""
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if "lora_alpha" in config:
        check_real("adapter lora_alpha", config["lora_alpha"])
    if "use_rslora" in config:
        check_bool("adapter use_rslora", config["use_rslora"])
    return config
