"""CONTRIBUTING.md's recipes run as written: each recipe's code blocks, in order, in a fresh module."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", re.S)


def _recipes() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, code in BLOCK.findall((ROOT / "CONTRIBUTING.md").read_text()):
        out[name] = out.get(name, "") + code + "\n"
    return out


def test_the_four_recipes_are_there():
    assert sorted(_recipes()) == ["engine", "kernel", "kv", "method"]


@pytest.mark.parametrize("recipe", ["method", "kv", "engine"])
def test_recipe_runs(recipe):
    name = f"contributing_{recipe}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(_recipes()[recipe], f"CONTRIBUTING.md:{recipe}", "exec"), module.__dict__)
    finally:
        del sys.modules[name]


def test_kernel_recipe_runs_in_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _recipes()["kernel"]], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
