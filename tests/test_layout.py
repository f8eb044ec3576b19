"""The package's layout rules, read from the source: which parts may import which.

Every import statement counts, at module level or inside a function (a lazy import is still a
dependency), except those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bitcompile"

# The runtime is what a device installs (requirements-device.txt): these are its only third-party
# imports, and of TVM only the runtime's Python side; the server adds its web stack.
DEVICE_PACKAGES = {"numpy", "ml_dtypes", "tokenizers", "jinja2", "cryptography", "tvm", "tvm_ffi"}
SERVER_PACKAGES = DEVICE_PACKAGES | {"starlette", "uvicorn", "prometheus_client"}
TVM_RUNTIME_MODULES = ("tvm", "tvm.runtime", "tvm.base")
# Of bitcompile itself, the runtime (and the server on top of it) may use only its own modules and
# the model config (plain Python: what the manifest's "model" section parses into).
RUNTIME_SIDE = ("bitcompile.runtime", "bitcompile.serve", "bitcompile.model.config", "bitcompile.version")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (not imported at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Absolute names of everything `name` imports; `from pkg import sub` names the submodule."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "__future__":
                continue
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            found |= subs or {base}
            if len(subs) < len(node.names):
                found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    """bitcompile module -> the bitcompile modules it imports."""
    mods = modules()
    return {name: {m for m in imports_of(name, path, set(mods)) if m in mods and m != name}
            for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _runtime_side(name: str) -> bool:
    """In RUNTIME_SIDE, or a package above one of its modules (imported on the way: kept empty)."""
    return _under(name, RUNTIME_SIDE) or any(p.startswith(name + ".") for p in RUNTIME_SIDE)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def runtime_violations(mods: dict[str, Path]) -> list[str]:
    known = set(mods)
    bad = []
    for name, path in mods.items():
        if not _under(name, RUNTIME_SIDE):
            continue
        for imported in sorted(imports_of(name, path, known)):
            top = imported.partition(".")[0]
            if top == "bitcompile":
                if not _runtime_side(imported):
                    bad.append(f"{name} imports {imported} (compiler side)")
            elif top in ("tvm", "tvm_ffi"):
                if top == "tvm" and imported not in TVM_RUNTIME_MODULES and not imported.startswith("tvm.runtime."):
                    bad.append(f"{name} imports {imported} (the TVM compiler)")
            elif top not in sys.stdlib_module_names and top not in (
                    SERVER_PACKAGES if _under(name, ("bitcompile.serve",)) else DEVICE_PACKAGES):
                bad.append(f"{name} imports {imported} (not in requirements-device.txt)")
    return bad


def test_runtime_imports_only_what_a_device_has():
    """runtime/ and serve/: no TVM compiler, no onnx or torch, nothing of the compiler side."""
    assert runtime_violations(modules()) == []


def test_the_runtime_check_catches_a_compiler_import(tmp_path):
    """The rule above must be able to fail: a copy of the runtime that imports tvm.relax lazily."""
    mods = modules()
    engine = tmp_path / "engine.py"
    engine.write_text(mods["bitcompile.runtime.engine"].read_text()
                      + "\n\ndef _sneaky():\n    from tvm.relax import frontend\n    import onnx\n"
                        "    from ..compiler import build\n")
    mods["bitcompile.runtime.engine"] = engine
    assert runtime_violations(mods) == ["bitcompile.runtime.engine imports bitcompile.compiler.build (compiler side)",
                                        "bitcompile.runtime.engine imports onnx (not in requirements-device.txt)",
                                        "bitcompile.runtime.engine imports tvm.relax (the TVM compiler)"]


def test_reference_imports_nothing_of_tvm_or_of_the_code_it_checks():
    mods = modules()
    imported = imports_of("bitcompile.reference", mods["bitcompile.reference"], set(mods))
    assert {m for m in imported if m.partition(".")[0] in ("tvm", "tvm_ffi", "bitcompile")} == set()


def test_importing_the_runtime_loads_no_compiler_side_module():
    """At run time too: importing every runtime module pulls in nothing of the compiler side."""
    runtime = sorted(m for m in modules() if _under(m, ("bitcompile.runtime", "bitcompile.serve")))
    script = ("import importlib, json, sys\n"
              f"for m in {runtime!r}: importlib.import_module(m)\n"
              "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PACKAGE.parent), "TVM_USE_RUNTIME_LIB": "1"})
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert [m for m in loaded if _under(m, ("bitcompile",)) and not _runtime_side(m)] == []
    assert [m for m in loaded if _under(m, ("onnx", "onnxruntime", "torch", "safetensors"))] == []

