"""DTensor arguments for the row-wise ops (`lora_linear`, `qlora_linear`, `dora_linear`).

Each output row depends only on its input row, so an `x` that is a DTensor replicated or
sharded along any dimension but the features runs on its local rows, and the result is a DTensor
with x's placements. Parameters may be plain tensors or replicated DTensors on x's mesh: their
gradient is then marked Partial along the mesh dimensions that shard x, so DTensor sums it over
those ranks as its own matmul would. A parameter sharded over a mesh (tensor-parallel LoRA) or
a Partial x is refused by name: the fused ops compute whole rows of whole weights.
Without DTensors nothing is paid: the check reads `sys.modules` (torch.distributed.tensor not
imported: no DTensor can exist) and imports nothing.
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch

def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def on_local_rows(fn):
    """Let `fn(x, ...)` (a row-wise op) take DTensor arguments, as the module docstring says."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        DT = _dtensor_type()
        if DT is None or not any(type(a) is DT for a in (x, *args, *kwargs.values())):
            return fn(x, *args, **kwargs)  # plain tensors, or another subclass: the op's own way
        return _local_call(fn, DT, sig.bind(x, *args, **kwargs))

    return call


def _local_call(fn, DT, bound):
    from torch.distributed.tensor import Partial, Replicate, Shard
    x = bound.arguments["x"]
    mesh, sharded = None, []
    if type(x) is DT:
        for p in x.placements:
            if not (isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim % x.ndim != x.ndim - 1)):
                raise ValueError(f"x must be a DTensor replicated or sharded along its rows (not its "
                                 f"features), got placements {x.placements}")
        mesh, sharded = x.device_mesh, [isinstance(p, Shard) for p in x.placements]
    for name, a in bound.arguments.items():
        if name != "x" and type(a) is DT:
            bound.arguments[name] = _replicated_local(name, a, mesh, sharded, Partial, Replicate)
    if mesh is None:
        return fn(*bound.args, **bound.kwargs)
    bound.arguments["x"] = x.to_local()
    y = fn(*bound.args, **bound.kwargs)
    shape = (*x.shape[:-1], y.shape[-1])
    stride = torch.empty(shape, device="meta").stride()
    return DT.from_local(y, mesh, x.placements, run_check=False, shape=shape, stride=stride)


def _replicated_local(name, a, mesh, sharded, Partial, Replicate):
    """The local tensor of a replicated DTensor argument, its gradient Partial where x is sharded."""
    if not all(isinstance(p, Replicate) for p in a.placements):
        raise ValueError(f"{name} must be a plain tensor or a replicated DTensor, got placements "
                         f"{a.placements}: peftkern's fused ops take whole weights (sharded, "
                         f"tensor-parallel LoRA factors are not supported)")
    if mesh is None:
        return a.to_local()
    if a.device_mesh != mesh:
        raise ValueError(f"{name} must be on x's device mesh {mesh}, got {a.device_mesh}")
    return a.to_local(grad_placements=[Partial() if s else Replicate() for s in sharded])
