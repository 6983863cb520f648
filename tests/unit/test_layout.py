"""Issue 9: the import rules of the layout, enforced.

- ``llmctl`` never imports ``llmosd`` (the client is the wire contract's other side);
- the control-loop modules (top level of ``llmosd``), ``ops/``, ``store/``, ``jobs/queue.py``
  and ``serve/request.py`` never import torch, not even indirectly;
- ``models/`` imports nothing of the daemon but ``store/``;
- there are no import cycles between llmosd's modules (imports inside functions count too).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


ALL = {**modules("llmosd"), **modules("llmctl")}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth in the file), as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)   # 'from pkg import module'
    return {m for m in out if m}


def internal_edges(name: str) -> set[str]:
    return {m for m in imports_of(ALL[name]) if m in ALL and m != name}


def test_i9_llmctl_never_imports_llmosd():
    bad = {n: sorted(m for m in imports_of(p) if m.split(".")[0] == "llmosd")
           for n, p in modules("llmctl").items()}
    assert not {n: v for n, v in bad.items() if v}


def torch_free_modules() -> list[str]:
    names = [n for n, p in modules("llmosd").items()
             if p.parent == ROOT / "llmosd" and n not in ("llmosd.__main__",)]
    for pkg in ("ops", "store"):
        names += [n for n in modules(f"llmosd/{pkg}")]
    names += ["llmosd.jobs.queue", "llmosd.serve.request",
              "llmosd.mem.policy", "llmosd.mem.estimate", "llmosd.mem.manager"]
    return sorted(set(names))


def test_i9_control_loop_modules_never_import_torch():
    code = ("import importlib, sys\n"
            "bad = []\n"
            f"for name in {torch_free_modules()!r}:\n"
            "    importlib.import_module(name)\n"
            "    if 'torch' in sys.modules:\n"
            "        bad.append(name)\n"
            "        break\n"
            "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"imports torch (itself or through what it imports): {r.stdout}"


@pytest.mark.parametrize("name", sorted(modules("llmosd/models")))
def test_i9_models_import_only_store(name):
    daemon = {m for m in internal_edges(name) if m.startswith("llmosd.")}
    outside = {m for m in daemon if not m.startswith(("llmosd.models", "llmosd.store"))}
    assert not outside, f"{name} imports {sorted(outside)}"


def test_i9_no_import_cycles():
    graph = {n: internal_edges(n) for n in modules("llmosd")}
    # a package's __init__ re-exporting its own submodules is not a cycle of the design
    for n in graph:
        graph[n] = {m for m in graph[n] if not (ALL[n].name == "__init__.py" and m.startswith(n + "."))}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"
    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_i9_the_rules_see_the_real_tree():
    """The checks above are only as good as their module lists."""
    assert "llmosd.server" in torch_free_modules() and "llmosd.ops.serve" in torch_free_modules()
    assert "llmosd.serve.engine" not in torch_free_modules()
    assert "llmosd.models.llama" in ALL and internal_edges("llmosd.ops")
