"""Paired intervals for a KV study's NLL column: each policy vs. the full cache, and policies at one budget.

A KV variant's ``nll_full`` / ``nll_pruned`` (study.json) are token-weighted means over the full
cache's EOS-ended answers; the per-answer sums live in the NLL journals of the study's stage cache
(``<out>/.cache/*/journal.jsonl``, records ``problem_id, nll_sum, n``). This script finds each
variant's journal by its mean, then resamples the answers (percentile bootstrap, seeded, the same
resamples for every comparison) for the change in token-weighted NLL. With few answers (7 in the
shipped kv-budgets study) a percentile bootstrap is optimistic: read the intervals as a guide.

    .venv/bin/python scripts/kv_nll_intervals.py /work/studyruns/kv-budgets --against streaming
"""

import argparse
import json
import random
from pathlib import Path


def nll_journals(study_dir: Path) -> list[dict[str, tuple[float, int]]]:
    out = []
    for path in sorted((study_dir / ".cache").glob("*/journal.jsonl")):
        recs = [r for line in path.read_text().splitlines() if line for r in json.loads(line)["records"]]
        if recs and "nll_sum" in recs[0]:
            out.append({r["problem_id"]: (r["nll_sum"], r["n"]) for r in recs})
    return out


def mean(d: dict[str, tuple[float, int]], ids: list[str]) -> float:
    return sum(d[i][0] for i in ids) / sum(d[i][1] for i in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--against", default="streaming", help="policy the others are compared with at each budget")
    ap.add_argument("--n-boot", type=int, default=10000)
    args = ap.parse_args()
    rows = [r for r in json.loads((args.study_dir / "study.json").read_text())["rows"] if r.get("nll_pruned")]
    journals = nll_journals(args.study_dir)

    def find(value: float) -> dict[str, tuple[float, int]]:
        hits = [d for d in journals if abs(mean(d, list(d)) - value) < 1e-9]
        if len(hits) != 1:
            raise SystemExit(f"{len(hits)} NLL journals have mean {value}: cannot tell them apart")
        return hits[0]

    full = find(rows[0]["nll_full"])
    variants = {r["model"]: find(r["nll_pruned"]) for r in rows}
    ids = sorted(full)
    rng = random.Random(0)
    boots = [[rng.choice(ids) for _ in ids] for _ in range(args.n_boot)]
    lo_i, hi_i = int(0.025 * args.n_boot), int(0.975 * args.n_boot) - 1

    def change(a, b) -> str:
        diffs = sorted(mean(b, s) - mean(a, s) for s in boots)
        return f"{mean(b, ids) - mean(a, ids):+.3f} [{diffs[lo_i]:+.3f}, {diffs[hi_i]:+.3f}]"

    print(f"{len(ids)} full-cache answers; full-cache NLL {mean(full, ids):.3f}\n")
    print("| variant | NLL | vs full cache [95% CI] |\n|---|---|---|")
    for name, d in variants.items():
        print(f"| {name} | {mean(d, ids):.3f} | {change(full, d)} |")
    print(f"\n| budget | policy | NLL vs {args.against} [95% CI] |\n|---|---|---|")
    for name, d in variants.items():
        policy, _, setting = name.removeprefix("base+").partition("@")
        ref = variants.get(f"base+{args.against}@{setting}")
        if ref is not None and policy != args.against:
            print(f"| {setting} | {policy} | {change(ref, d)} |")


if __name__ == "__main__":
    main()
