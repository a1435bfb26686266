"""peftkern's Triton kernels, installed as `peftkern.kernels` (setup.py maps this folder there).

This folder sits at the repository root, where `python -m ...` puts it on sys.path ahead of the
PyPI package of the same name (Hugging Face's `kernels` hub, which bitsandbytes tries to import).
Imported as top-level `kernels`, it hands the import on to that package when installed, and
otherwise leaves an empty placeholder (no `__file__`, an empty `__path__`: what transformers and
bitsandbytes treat as a shadowing namespace, i.e. absent), so nothing in this folder is reachable
through that name and nothing mistakes it for the hub.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        __file__, __path__ = None, []
        del _root, _path, _spec
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
