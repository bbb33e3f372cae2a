"""One trade-off curve from several ablation studies that share a base model and a test set.

Reads each study's ``study.json`` (``core ablate`` output), keeps one row per variant (a variant name
that two studies share, such as their common control, is kept once: the first study's), and writes a
markdown table sorted by mean tokens (accuracy, tokens saved and the change against the base model, each
with its 95% interval and McNemar p) to stdout and, with ``--plot``, accuracy vs. mean tokens with error
bars and the Pareto front (``core ablate``'s plot) to a PNG.

    .venv/bin/python scripts/tradeoff.py --plot docs/studies/tokensqueeze-tradeoff.png --rename default=q-dyn \\
        docs/studies/tokensqueeze-ablation/study.json docs/studies/tokensqueeze-hparams/study.json
"""

import argparse
import json
from pathlib import Path

from thinkpress.core.ablate import _ci as ci
from thinkpress.core.ablate import pareto_plot


def merged(paths: list[Path], test_set: str | None, rename: dict[str, str] | None = None) -> dict:
    studies = [json.loads(p.read_text()) for p in paths]
    sets = {r["test_set"] for s in studies for r in s["rows"]}
    ts = test_set or (sets.pop() if len(sets) == 1 else None)
    if ts is None:
        raise SystemExit(f"several test sets {sorted(sets)}: pick one with --set")
    bases = {json.dumps(s["base_model"].get(ts), sort_keys=True) for s in studies}
    if len(bases) != 1:
        raise SystemExit(f"the studies' base models differ on {ts}: they cannot share one curve")
    rows, seen = [], set()
    for s in studies:
        for r in s["rows"]:
            if r["test_set"] == ts and r["variant"] not in seen:
                seen.add(r["variant"])
                rows.append({**r, "variant": (rename or {}).get(r["variant"], r["variant"])})
    return {"study": " + ".join(s["study"] for s in studies), "compare": "trained", "rows": rows,
            "base_model": {ts: studies[0]["base_model"][ts]}}


def table(s: dict) -> str:
    (ts, base), = s["base_model"].items()
    out = [f"Test set {ts}: base model {100 * base['accuracy']:.1f}%{ci(base.get('accuracy_ci'))}, "
           f"{base['mean_tokens']:.0f} tokens.", "",
           "| variant | accuracy [95% CI] | mean tokens | saved vs base [95% CI] | vs base, pt [95% CI] | "
           "lost / gained (p) |", "|---|---|---|---|---|---|"]
    for r in sorted(s["rows"], key=lambda r: r["mean_tokens"]):
        out.append(f"| {r['variant']} | {100 * r['accuracy']:.1f}%{ci(r.get('accuracy_ci'))} | "
                   f"{r['mean_tokens']:.0f} | {100 * r['tokens_saved']:.1f}%{ci(r.get('tokens_saved_ci'))} | "
                   f"{100 * r['accuracy_delta']:+.1f}{ci(r.get('accuracy_delta_ci'), signed=True)} | "
                   f"{r['lost']} / {r['gained']} ({r['flip_p']:.2g}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+", type=Path, help="study.json files")
    ap.add_argument("--set", dest="test_set", help="test set (default: the only one)")
    ap.add_argument("--plot", type=Path, help="write the curve to this PNG")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="show a variant under "
                    "another name")
    args = ap.parse_args()
    s = merged(args.studies, args.test_set, dict(r.split("=", 1) for r in args.rename))
    print(table(s))
    if args.plot:
        pareto_plot(s, args.plot)


if __name__ == "__main__":
    main()
