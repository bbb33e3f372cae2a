"""TokenSkip ratio adherence per run, test set and gamma, with intervals; optionally a curve over runs.

For each run directory (a finished ``core run --plugins tokenskip``) and each of its test sets, one
row per gamma: accuracy [Wilson 95%], change vs. base [paired bootstrap] with lost/gained and the
exact McNemar p, mean output tokens, the actual ratio (mean tokens at gamma / at gamma 1.0) with its
paired-bootstrap interval, the adherence error |actual - gamma| and the truncation rate.

``--trained-only`` keeps, in test sets drawn from a train split, only the problems whose CoT the run
trained on (the pruner stage's examples): the fitting check next to the held-out test set.
``--curve FILE.png`` plots the adherence error per gamma against the number of training CoTs, one
point per run with the interval that the actual ratio's interval gives (the data-size curve), and
prints the curve as a table.

    .venv/bin/python scripts/tokenskip_adherence.py runs/tks-e1-all-draws [more runs] [--trained-only]
"""

import argparse
import json
from pathlib import Path
from statistics import mean

from thinkpress.api import (
    figure,
    flips,
    fmt_num_ci,
    fmt_pct_ci,
    mcnemar_exact,
    paired_difference,
    paired_savings,
    wilson,
)


def _rows(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["problem_id"]] = r
    return out


def trained_problems(run: Path) -> set[str]:
    pruner = next((run / "stages").glob("*-pruner-tokenskip"))
    return {json.loads(line)["problem_id"] for line in (pruner / "examples.jsonl").open() if line.strip()}


def adherence(run: Path, test_set: str, only: set[str] | None = None) -> list[dict]:
    """One dict per gamma variant of ``run`` on ``test_set`` (largest gamma first)."""
    d = run / "eval" / test_set
    preds = {p.name: _rows(p / "predictions.jsonl") for p in d.iterdir() if (p / "predictions.jsonl").exists()}
    full = preds.get("trained@gamma=1")
    if full is None or "base" not in preds:
        return []
    ids = sorted(i for i in full if only is None or i in only)
    if any(set(ids) - set(v) for v in preds.values()):
        raise SystemExit(f"{d}: the variants cover different problems")
    base_ok = [float(preds["base"][i]["correct"]) for i in ids]
    full_tok = [float(full[i]["n_tokens"]) for i in ids]
    out = []
    for name, rows in preds.items():
        if not name.startswith("trained@gamma="):
            continue
        g = float(name.split("=", 1)[1])
        ok = [float(rows[i]["correct"]) for i in ids]
        tok = [float(rows[i]["n_tokens"]) for i in ids]
        lost = sum(bool(b and not o) for b, o in zip(base_ok, ok, strict=True))
        gained = sum(bool(o and not b) for b, o in zip(base_ok, ok, strict=True))
        saved = paired_savings(full_tok, tok)
        ratio = mean(tok) / mean(full_tok)
        out.append({"gamma": g, "n": len(ids), "accuracy": mean(ok), "accuracy_ci": wilson(int(sum(ok)), len(ok)),
                    "vs_base": mean(ok) - mean(base_ok), "vs_base_ci": paired_difference(base_ok, ok),
                    "flips_vs": "base", "lost": lost, "gained": gained, "flip_p": mcnemar_exact(lost, gained),
                    "mean_tokens": mean(tok),
                    "base_tokens": mean(float(preds["base"][i]["n_tokens"]) for i in ids), "actual_ratio": ratio,
                    "ratio_ci": None if saved is None else (1 - saved[1], 1 - saved[0]),
                    "adherence_error": abs(ratio - g),
                    "truncated": mean(rows[i]["finish_reason"] == "length" for i in ids)})
    return sorted(out, key=lambda r: -r["gamma"])


def error_ci(r: dict) -> tuple[float, float] | None:
    """The adherence error's interval, from the actual ratio's: |ratio - gamma| over the ratio interval."""
    if r["ratio_ci"] is None:
        return None
    lo, hi = (x - r["gamma"] for x in r["ratio_ci"])
    return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))


def table(rows: list[dict]) -> str:
    lines = ["| gamma | n | accuracy [95% CI] | vs base, pt [95% CI] | lost / gained (p) | mean tokens "
             "| actual ratio [95% CI] | adherence error | truncated |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gamma']:g} | {r['n']} | {100 * r['accuracy']:.1f}%{fmt_pct_ci(r['accuracy_ci'])} "
                     f"| {100 * r['vs_base']:+.1f}{fmt_pct_ci(r['vs_base_ci'], signed=True)} | {flips(r)} "
                     f"| {r['mean_tokens']:.1f} | {r['actual_ratio']:.3f}{fmt_num_ci(r['ratio_ci'], 3)} "
                     f"| {r['adherence_error']:.3f} | {100 * r['truncated']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--trained-only", action="store_true", help="train-split test sets: only trained problems")
    ap.add_argument("--curve", type=Path, help="plot adherence error vs. training CoTs (one point per run)")
    ap.add_argument("--test-set", default=None, help="test set for the curve (default: the first one)")
    a = ap.parse_args()
    curve = []
    for run in a.runs:
        trained = trained_problems(run)
        sets = json.loads((run / "report.json").read_text())["test_sets"]
        for ts in sets:
            name, split = ts["name"], ts["dataset"].get("split")
            only = trained if a.trained_only and split == "train" else None
            rows = adherence(run, name, only)
            label = f"{name} ({split}{', trained-on problems only' if only else ''})"
            print(f"\n### {run.name}: {label}, {len(trained)} training CoTs\n\n{table(rows)}")
            if rows and name == (a.test_set or sets[0]["name"]):
                curve.append((len(trained), run.name, rows))
    if a.curve and curve:
        print("\n### Data-size curve\n\n| training CoTs | run | gamma | actual ratio [95% CI] "
              "| adherence error [95% CI] |\n|---|---|---|---|---|")
        for n, name, rows in sorted(curve):
            for r in rows:
                if r["gamma"] < 1:
                    print(f"| {n} | {name} | {r['gamma']:g} | {r['actual_ratio']:.3f}{fmt_num_ci(r['ratio_ci'], 3)} "
                          f"| {r['adherence_error']:.3f}{fmt_num_ci(error_ci(r), 3)} |")
        with figure(a.curve, 1) as (ax,):
            gammas = sorted({r["gamma"] for _, _, rows in curve for r in rows if r["gamma"] < 1}, reverse=True)
            for g in gammas:
                pts = sorted((n, r["adherence_error"], error_ci(r)) for n, _, rows in curve for r in rows
                             if r["gamma"] == g)
                bars = None
                if all(p[2] for p in pts):
                    bars = [[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=bars, fmt="o-", capsize=3,
                            label=f"gamma {g:g}")
            ax.axhline(0.1, ls="--", c="grey", lw=1, label="target 0.1")
            ax.set_xscale("log")
            ax.set_xlabel("training CoTs")
            ax.set_ylabel("adherence error |actual - gamma|")
            ax.legend(fontsize=8)
        print(f"\ncurve: {a.curve}")


if __name__ == "__main__":
    main()
