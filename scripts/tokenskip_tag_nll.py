"""Diagnostic: does a TokenSkip adapter condition on the ratio tag? Per gamma, own tag vs. the others.

Every training target of a TokenSkip run (the pruner stage's examples: a CoT pruned to gamma, its
prompt tagged with gamma) is teacher-forced under every ratio's prompt: its own tag, and the same
question with each other gamma's tag (gamma 1.0: no tag). An adapter that reads the tag gives each
target its lowest NLL under its own tag; the untrained model (``--base``) is the control. Scored
with the hf engine in fp32, the adapter unmerged. Prints a markdown table, one row per gamma: the
mean NLL under the own tag and under the other tags, and how often the own tag is the lowest.

    .venv/bin/python scripts/tokenskip_tag_nll.py runs/main-tokenskip-default [--base] [--n 60]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.models import ensure_embedded
from thinkpress.plugins.tokenskip.prune import tagged_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=None, help="first N training examples (default: all)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--base", action="store_true", help="score with the untrained model (control)")
    a = ap.parse_args()
    stages = a.run / "stages"
    pruner = next(stages.glob("*-pruner-tokenskip"))
    examples = [json.loads(line) for line in (pruner / "examples.jsonl").open()][: a.n]
    engine = HFEngine.from_pretrained(str(ensure_embedded(a.model)), dtype="float32")
    if not a.base:
        engine = engine.with_adapter(str(next(stages.glob("*-trainer-tokenskip-sft")) / "adapter"))
    tags = examples[0]["meta"]["ratio_tags"]  # {"1": "", "0.9": "<tag>", ...}
    gammas = sorted(tags, key=float, reverse=True)
    position = examples[0]["meta"].get("tag_position", "question")
    prompts, targets, owners = [], [], []
    for i, ex in enumerate(examples):
        for g in gammas:
            prompts.append(tagged_prompt(engine, ex["meta"]["question"], tags[g], position))
            targets.append(ex["completion"])
            owners.append((i, g))
    nll = [-mean(lp) for lp in engine.score(prompts, targets, batch_size=6)]
    by_example: dict[int, dict[str, float]] = defaultdict(dict)
    for (i, g), v in zip(owners, nll, strict=True):
        by_example[i][g] = v
    print(f"{'untrained model' if a.base else 'trained adapter'}, {len(examples)} training targets, "
          f"each under {len(gammas)} prompts")
    print("| target gamma | n | NLL, own tag | NLL, other tags (mean) | own tag lowest |")
    print("|---|---|---|---|---|")
    for g in gammas:
        rows = [by_example[i] for i, ex in enumerate(examples) if f"{ex['meta']['gamma']:g}" == g]
        if not rows:
            continue
        own = [r[g] for r in rows]
        other = [mean(v for k, v in r.items() if k != g) for r in rows]
        lowest = sum(min(r, key=r.get) == g for r in rows)
        print(f"| {g} | {len(rows)} | {mean(own):.4f} | {mean(other):.4f} ({100 * (mean(other) / mean(own) - 1):+.1f}%)"
              f" | {lowest} / {len(rows)} (chance {len(rows) / len(gammas):.1f}) |")


if __name__ == "__main__":
    main()
