"""Table and plot of several runs' trained variants against their common base, one test set.

Each run is ``LABEL=RUN_DIR``; its report.json gives, for the test set, the trained variant's accuracy
and mean tokens with their intervals, the paired change against base and the lost/gained count.
Writes a markdown table to stdout and, with ``--plot``, accuracy vs. mean tokens with 95% error
bars (base as a reference point) to a PNG.

    .venv/bin/python scripts/ablation_table.py --set gsm8k-val --plot docs/img/ablation.png \\
        default=/tmp/tune/r0 lr1e-4=/tmp/tune/lr1e-4
"""

import argparse
import json
from pathlib import Path


def rows_of(run: Path, test_set: str) -> dict[str, dict]:
    rep = json.loads((run / "report.json").read_text())
    ts = next((t for t in rep["test_sets"] if t["name"] == test_set), None)
    if ts is None:
        raise SystemExit(f"{run}: no test set {test_set!r} (has {[t['name'] for t in rep['test_sets']]})")
    return {v["name"]: v for v in ts["variants"]}


def pct(ci):
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--set", dest="test_set", required=True, help="test set name (as in the report)")
    ap.add_argument("--variant", default="trained")
    ap.add_argument("--plot", type=Path)
    a = ap.parse_args()
    runs = [(r.split("=", 1)[0], Path(r.split("=", 1)[1])) for r in a.runs]
    base = None
    points = []
    print("| run | accuracy [95% CI] | vs base, pt [95% CI] | lost / gained (p) | mean tokens | saved vs base "
          "[95% CI] | truncated |")
    print("|---|---|---|---|---|---|---|")
    for label, run in runs:
        rows = rows_of(run, a.test_set)
        b, t = rows["base"], rows.get(a.variant)
        if base is None:
            base = b
            print(f"| base | {100 * b['accuracy']:.1f}% {pct(b.get('accuracy_ci'))} | | | {b['mean_tokens']:.0f} | | "
                  f"{100 * b.get('truncation_rate', 0):.1f}% |")
        elif b["accuracy"] != base["accuracy"] or b["mean_tokens"] != base["mean_tokens"]:
            print(f"| ({label}: another base: {100 * b['accuracy']:.1f}%, {b['mean_tokens']:.0f} tokens) |||||||")
        if t is None:
            continue
        d = t.get('accuracy_delta_ci')
        p = t.get('flip_p')
        print(f"| {label} | {100 * t['accuracy']:.1f}% {pct(t.get('accuracy_ci'))} | "
              f"{100 * t['accuracy_delta']:+.1f} {pct(d) if d else ''} | {t.get('lost', '-')} / {t.get('gained', '-')}"
              f"{f' ({p:.2g})' if p is not None else ''} | {t['mean_tokens']:.0f} | "
              f"{100 * t.get('tokens_saved', 0):.1f}% {pct(t.get('tokens_saved_ci'))} | "
              f"{100 * t.get('truncation_rate', 0):.1f}% |")
        points.append((label, t))
    if a.plot and base is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for label, v in [("base", base), *points]:
            ci = v.get("accuracy_ci") or [v["accuracy"]] * 2
            tci = v.get("mean_tokens_ci") or [v["mean_tokens"]] * 2
            ax.errorbar(v["mean_tokens"], 100 * v["accuracy"],
                        yerr=[[100 * (v["accuracy"] - ci[0])], [100 * (ci[1] - v["accuracy"])]],
                        xerr=[[v["mean_tokens"] - tci[0]], [tci[1] - v["mean_tokens"]]], fmt="o", capsize=3,
                        color="black" if label == "base" else None)
            ax.annotate(label, (v["mean_tokens"], 100 * v["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel("mean output tokens")
        ax.set_ylabel(f"accuracy on {a.test_set} (%)")
        ax.set_title(f"{a.test_set}: accuracy vs. length, 95% intervals")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        a.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
