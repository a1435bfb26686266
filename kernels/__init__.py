"""peftkern's Triton kernels, installed as `peftkern.kernels` (setup.py maps this folder there).

This folder sits at the repository root, where `python -c`/`python -m` put it on sys.path ahead
of the PyPI package of the same name (Hugging Face's `kernels` hub, which bitsandbytes and
transformers probe). Imported as top-level `kernels`, this file steps aside: it loads the hub
when one is installed elsewhere on sys.path, and otherwise leaves in `sys.modules` a bare module
with no file, path or origin (what transformers reads as "not installed"), so no module of this
folder is reachable through that name. Python's import returns whatever `sys.modules` then holds.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        _absent = types.ModuleType("kernels", "Placeholder: the `kernels` hub is not installed.")
        _absent.__spec__ = importlib.machinery.ModuleSpec("kernels", None)
        sys.modules["kernels"] = _absent
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
