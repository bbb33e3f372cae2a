"""The package's layers, checked from the source: plugins see only the public API, toolkit and kernels."""

import ast
import inspect
from pathlib import Path

import pytest

import thinkpress.api as api

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "thinkpress"
PUBLIC = ("thinkpress.api", "thinkpress.toolkit", "thinkpress.kernels")


def _thinkpress_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a thinkpress module in ``path``, at any depth (functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(n, m) for n, m in out if m == "thinkpress" or m.startswith("thinkpress.")]


def _allowed(module: str, own: str | None) -> bool:
    if module == "thinkpress" or any(module == p or module.startswith(p + ".") for p in PUBLIC):
        return True
    return own is not None and (module == own or module.startswith(own + "."))


def _plugin_files():
    for path in sorted((PKG / "plugins").rglob("*.py")):
        rel = path.relative_to(PKG / "plugins").parts
        yield path, (f"thinkpress.plugins.{rel[0]}" if len(rel) > 1 else None)
    for path in sorted((ROOT / "examples").rglob("*.py")):
        yield path, None


@pytest.mark.parametrize(("path", "own"), list(_plugin_files()), ids=lambda x: getattr(x, "name", str(x)))
def test_plugins_import_only_the_public_api_toolkit_kernels_and_their_own_package(path, own):
    bad = [f"{path.relative_to(ROOT)}:{n} imports {m}" for n, m in _thinkpress_imports(path) if not _allowed(m, own)]
    assert not bad, "\n".join(bad)


def test_the_toolkit_and_the_api_import_no_plugin():
    files = [PKG / "api.py", *sorted((PKG / "toolkit").rglob("*.py"))]
    bad = [f"{p.relative_to(ROOT)}:{n} imports {m}" for p in files for n, m in _thinkpress_imports(p)
           if m.startswith("thinkpress.plugins")]
    assert not bad, "\n".join(bad)


def test_every_public_name_is_documented():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing_doc = [n for n in api.__all__ if f"`{n}`" not in doc]
    assert not missing_doc, f"not in docs/api.md: {missing_doc}"
    no_docstring = [n for n in api.__all__ if (inspect.isclass(getattr(api, n)) or inspect.isfunction(getattr(api, n)))
                    and not (getattr(api, n).__doc__ or "").strip()]
    assert not no_docstring, f"no docstring: {no_docstring}"
    assert len(set(api.__all__)) == len(api.__all__)
    assert all(hasattr(api, n) for n in api.__all__)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string literals in ``path`` that are not docstrings (f-string parts included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
        # attribute docstrings: a bare string right after an assignment
        body = getattr(node, "body", None)
        for prev, stmt in zip(body, body[1:], strict=False) if isinstance(body, list) else []:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(
                    prev, ast.Assign | ast.AnnAssign):
                docs.add(id(stmt.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_core_names_no_built_in_method():
    """Presets, bundles and fallbacks come from the plugins' hooks: no method or component name in core code."""
    import re

    from thinkpress.core.plugins import build_registry
    from thinkpress.plugins import BUILTIN_PLUGINS

    reg = build_registry(load_entry_points=False)
    names = {n for n in BUILTIN_PLUGINS if n != "core"} | set(reg.bundles)
    names |= {n for stage in reg.components.values() for n, e in stage.items() if e.plugin in BUILTIN_PLUGINS}
    assert {"baseline", "tokensqueeze", "rkv", "kvprune", "lora-sft", "q-dyn"} <= names  # the scan is not empty
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    pattern = re.compile(r"(?<![\w-])(" + alternatives + r")(?![\w-])")
    hits = [f"{p.relative_to(ROOT)}:{n}: {m.group(1)!r} in {text!r}"
            for p in sorted((PKG / "core").rglob("*.py")) for n, text in _string_constants(p)
            for m in [pattern.search(text)] if m]
    assert not hits, "\n".join(hits)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_edges() -> dict[str, set[str]]:
    """Module -> the thinkpress modules it imports when it is imported (top level, not TYPE_CHECKING)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        out = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in ast.walk(node) if isinstance(node, ast.Import | ast.ImportFrom | ast.Try | ast.If) else []:
                targets = []
                if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                    targets = [sub.module] + [f"{sub.module}.{a.name}" for a in sub.names]
                elif isinstance(sub, ast.Import):
                    targets = [a.name for a in sub.names]
                out |= {t for t in targets if t in modules and t != name}
        # a package's __init__ importing its own submodules is not a cycle: drop submodule -> parent edges
        edges[name] = {t for t in out if not name.startswith(t + ".")}
    return edges


def test_no_import_cycles():
    edges = _import_time_edges()
    assert "thinkpress.core.runner" in edges and "thinkpress.core.planning" in edges["thinkpress.core.runner"]
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
