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
