"""scripts/tradeoff.py: one curve from several studies (run on the committed TokenSqueeze studies)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = [ROOT / f"docs/studies/tokensqueeze-{name}/study.json" for name in ("ablation", "hparams")]


def _script():
    spec = importlib.util.spec_from_file_location("tradeoff", ROOT / "scripts/tradeoff.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merges_studies_keeps_a_shared_control_once_and_plots(tmp_path):
    mod = _script()
    s = mod.merged(STUDIES, None, {"default": "q-dyn"})
    names = [r["variant"] for r in s["rows"]]
    each = [{r["variant"] for r in json.loads(p.read_text())["rows"]} for p in STUDIES]
    assert len(names) == len(set(names)) == len(each[0] | each[1])  # "default" is in both, kept once
    assert "q-dyn" in names and "default" not in names
    md = mod.table(s)
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    tokens = [float(line.split("|")[3]) for line in rows]
    assert len(rows) == len(names) and tokens == sorted(tokens)
    mod.pareto_plot(s, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_refuses_studies_with_different_base_models(tmp_path):
    mod = _script()
    other = json.loads(STUDIES[1].read_text())
    (ts, base), = other["base_model"].items()
    other["base_model"] = {ts: {**base, "accuracy": base["accuracy"] + 0.01}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="base models differ"):
        mod.merged([STUDIES[0], tmp_path / "other.json"], None)
