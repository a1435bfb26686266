"""Packaging: import works without optional dependencies or the extension; ops trace in compile."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import peftkern
from peftkern import ops
from peftkern.ops import quant


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_without_bitsandbytes_peft_transformers():
    code = ("import sys\n"
            "for m in ('bitsandbytes', 'peft', 'transformers'): sys.modules[m] = None\n"
            "import torch, peftkern\n"
            "q = peftkern.quantize_4bit(torch.randn(4, 64))\n"
            "print(peftkern.dequantize_4bit(q).shape)\n"
            "try:\n    peftkern.to_bnb(q)\nexcept ImportError as e:\n    print('to_bnb:', e)\n")
    run = _run(code)
    assert run.returncode == 0, run.stderr
    assert "torch.Size([4, 64])" in run.stdout and "to_bnb() needs bitsandbytes" in run.stdout


def test_import_without_extension_warns_once_and_falls_back():
    code = ("import sys, warnings\n"
            "sys.modules['peftkern._C'] = None\n"
            "import torch, peftkern\n"
            "from peftkern import ops\n"
            "assert ops.available(torch.device('cpu')) == ('reference',), ops.available(torch.device('cpu'))\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3): peftkern.quantize_4bit(torch.randn(4, 64))\n"
            "print(len(w), w[0].message)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("1 peftkern: the C++ extension is not available"), run.stdout


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if "cpp" in ops.available(torch.device("cpu")) else []))
def test_ops_compile_fullgraph(backend):
    """The custom ops have fake implementations: torch.compile traces them with no graph break."""
    q = peftkern.quantize_4bit(torch.randn(8, 64))

    def f(x, data, absmax, absmax2, code8, offset):
        w = quant.dequantize_blocks(data, absmax, absmax2, code8, offset, "nf4", 64, [8, 64], torch.float32)
        packed, amax = quant.quantize_blocks(w, "nf4", 64)
        return x @ w.t(), packed, amax

    args = (torch.randn(3, 64), q.data, q.absmax, q.absmax2, q.code8, q.offset)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        for got, want in zip(compiled(*args), f(*args)):
            assert torch.equal(got, want)


# ---- package structure: no import cycles, an independent oracle, no shadowed `kernels` -------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict:
    """{module name: source path} for peftkern, with peftkern.kernels at the top-level kernels/."""
    out = {}
    for pkg, folder in (("peftkern", "peftkern"), ("peftkern.kernels", "kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__pycache__" in dirpath or (folder == "peftkern" and "/kernels" in dirpath):
                continue
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            base = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    out[base if f == "__init__.py" else f"{base}.{f[:-3]}"] = os.path.join(dirpath, f)
                elif f.endswith((".so", ".pyd")):  # the compiled extension: imports nothing here
                    out[f"{base}.{f.split('.')[0]}"] = None
    return out


def _imports(name: str, path: str, modules: dict) -> set:
    """peftkern modules `name` imports anywhere in its file (inside functions too)."""
    own = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = own[:len(own) - node.level + 1] + ([node.module] if node.module else [])
                base = ".".join(parts)
            else:
                base = node.module
            for a in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {m: _imports(m, p, modules) if p else set() for m, p in modules.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_compute_path_module_imports_the_reference():
    """The oracle stays independent: only the reference backend, the demo and the bench use it."""
    modules = _modules()
    allowed = ("peftkern", "peftkern.reference", "peftkern.ops.backends.reference", "peftkern.demo")
    users = [m for m, p in modules.items() if p and "peftkern.reference" in _imports(m, p, modules)
             and m not in allowed and not m.startswith("peftkern.bench")]
    assert not users, f"compute-path modules importing peftkern.reference: {users}"


def _site_without_the_hub(tmp_path):
    """A copy (symlinks) of site-packages without the `kernels` hub: transformers >= 5.25 depends on
    the hub, so "not installed" has to be made, not found."""
    import site
    farm = tmp_path / "site"
    farm.mkdir()
    for sp in site.getsitepackages():
        for entry in os.listdir(sp):
            if entry != "kernels" and not entry.startswith("kernels-") and not (farm / entry).exists():
                (farm / entry).symlink_to(os.path.join(sp, entry))
    return site.getsitepackages(), str(farm)


def test_import_kernels_from_the_repo_root_is_not_this_folder(tmp_path):
    """Without the hub package, `import kernels` from the repo root gives a bare module with no
    file, path or origin: transformers sees no `kernels`, no module of this folder is reachable
    through that name, and bitsandbytes' message names no file of this repo."""
    pytest.importorskip("transformers")
    real, farm = _site_without_the_hub(tmp_path)
    code = (f"import site, sys\nsys.path[:] = [p for p in sys.path if p not in {real!r}]\n"
            f"site.addsitedir({farm!r})\n"
            "import kernels, transformers.utils.import_utils as iu\n"
            "print(repr(kernels), getattr(kernels, '__file__', None), getattr(kernels, '__path__', None),\n"
            "      kernels.__spec__.origin, iu.is_kernels_available())\n"
            "for stmt in ('from kernels import get_kernel', 'import kernels.lora_linear'):\n"
            "    try:\n        exec(stmt)\n    except ImportError as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "<module 'kernels'> None None None False", out.stdout
    assert "No module named 'kernels.lora_linear'" in out.stdout, out.stdout
    assert ROOT not in out.stdout, out.stdout
    import peftkern.kernels
    assert os.path.samefile(os.path.dirname(peftkern.kernels.__file__), os.path.join(ROOT, "kernels"))


def test_import_kernels_from_the_repo_root_finds_the_real_hub():
    """Where the hub is installed (transformers >= 5.25 pulls it in), `import kernels` from the repo
    root is the hub: transformers sees it and no module of this folder is reachable by that name."""
    import importlib.machinery
    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT])
    if spec is None:
        pytest.skip("the `kernels` hub is not installed")
    pytest.importorskip("transformers")
    code = ("import kernels, transformers.utils.import_utils as iu\n"
            "print(kernels.__file__, iu.is_kernels_available(), callable(kernels.get_kernel))\n"
            "try:\n    import kernels.lora_linear\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"{spec.origin} True True", out.stdout
    assert "No module named 'kernels.lora_linear'" in out.stdout, out.stdout


def test_import_kernels_from_the_repo_root_finds_the_installed_hub(tmp_path):
    """With a `kernels` package installed (a stand-in for the hub, later on sys.path than the
    repo root), `import kernels` from the repo root is that package, not this folder."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    code = "import kernels\nprint(kernels.__file__)\nprint(kernels.get_kernel('ok'))\n"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(tmp_path / "kernels" / "__init__.py"), "ok"], out.stdout
