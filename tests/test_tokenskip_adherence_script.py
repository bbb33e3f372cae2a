"""scripts/tokenskip_adherence.py on a run directory laid out as `core run` writes it (built here)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("adherence", ROOT / "scripts/tokenskip_adherence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(tmp_path: Path, n_trained: int) -> Path:
    """8 problems per set; gamma 0.5 writes exactly half of gamma 1's tokens; base is right on 0-3."""
    run = tmp_path / f"run{n_trained}"
    ids = {"t": [f"test-{i}" for i in range(8)], "fit": [f"train-{i}" for i in range(8)]}
    for name, pids in ids.items():
        for variant, tok, ok in (("base", 300, lambda i: i < 4), ("trained@gamma=1", 200, lambda i: i < 5),
                                 ("trained@gamma=0.5", 100, lambda i: i < 2)):
            _write(run / "eval" / name / variant / "predictions.jsonl",
                   [{"problem_id": p, "n_tokens": tok * (10 + i) // 10, "correct": ok(i), "finish_reason": "eos"}
                    for i, p in enumerate(pids)])
    # the fit set: tokens at gamma 0.5 are half only on the trained problems (0..n_trained-1)
    _write(run / "eval" / "fit" / "trained@gamma=0.5" / "predictions.jsonl",
           [{"problem_id": p, "n_tokens": 10 * (10 + i) if i < n_trained else 20 * (10 + i), "correct": i < 2,
             "finish_reason": "length" if i == 7 else "eos"} for i, p in enumerate(ids["fit"])])
    _write(run / "stages" / "3-pruner-tokenskip" / "examples.jsonl",
           [{"problem_id": f"train-{i}", "meta": {"gamma": g}} for i in range(n_trained) for g in (1.0, 0.5)])
    (run / "report.json").write_text(json.dumps({"test_sets": [
        {"name": "t", "dataset": {"split": "test"}}, {"name": "fit", "dataset": {"split": "train"}}]}))
    return run


def test_adherence_rows_intervals_and_the_trained_only_filter(tmp_path):
    mod = _script()
    run = _run(tmp_path, 4)
    rows = mod.adherence(run, "t")
    assert [r["gamma"] for r in rows] == [1.0, 0.5]
    half = rows[1]
    assert half["actual_ratio"] == pytest.approx(0.5) and half["adherence_error"] == pytest.approx(0.0)
    assert half["ratio_ci"] == pytest.approx((0.5, 0.5))
    assert half["accuracy"] == 0.25 and half["lost"] == 2 and half["gained"] == 0 and half["vs_base"] == -0.25
    fit_all, fit_trained = mod.adherence(run, "fit"), mod.adherence(run, "fit", mod.trained_problems(run))
    assert fit_trained[1]["n"] == 4 and fit_trained[1]["actual_ratio"] == pytest.approx(0.5)
    assert fit_all[1]["n"] == 8 and fit_all[1]["actual_ratio"] > 0.7 and fit_all[1]["truncated"] == 1 / 8
    md = mod.table(rows)
    assert "| 0.5 | 8 | 25.0% [" in md and "| 2 / 0 (0.50) |" in md and "| 0.500 [0.500, 0.500] |" in md


def test_the_cli_prints_each_set_and_plots_the_data_size_curve(tmp_path):
    runs = [_run(tmp_path, 2), _run(tmp_path, 6)]
    png = tmp_path / "curve.png"
    out = subprocess.run([sys.executable, str(ROOT / "scripts/tokenskip_adherence.py"), *map(str, runs),
                          "--trained-only", "--curve", str(png)], capture_output=True, text=True, check=True).stdout
    assert out.count("### run2: ") == 2 and "fit (train, trained-on problems only), 2 training CoTs" in out
    assert png.stat().st_size > 1000
    assert "| 2 | run2 | 0.5 | 0.500 [0.500, 0.500] | 0.000 [0.000, 0.000] |" in out  # the curve as a table


def test_the_adherence_error_interval_follows_the_ratio_interval():
    mod = _script()
    assert mod.error_ci({"gamma": 0.5, "ratio_ci": (0.9, 1.05)}) == pytest.approx((0.4, 0.55))
    assert mod.error_ci({"gamma": 0.5, "ratio_ci": (0.3, 0.55)}) == pytest.approx((0.0, 0.2))  # contains gamma
    assert mod.error_ci({"gamma": 0.5, "ratio_ci": None}) is None
