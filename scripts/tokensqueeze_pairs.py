"""Diagnostic: do TokenSqueeze's preference pairs teach dropping steps? And do the trained answers drop them?

A proxy for "used every quantity": the share of the question's distinct numbers that appear in an
answer (``coverage``). A correct answer that reaches the number without using a quantity was lucky or
skipped a step; a chosen answer with lower coverage than its rejected one teaches the policy to drop
quantities. Reads a run directory (its published stages and evaluation predictions):

1. samples: per problem with correct and incorrect samples, coverage of the shortest correct sample vs.
   the median-length correct one (does "shortest" mean "skipped a quantity"?);
2. pairs (after refinement when there is a refiner): coverage of chosen vs. rejected, and the share of
   pairs whose chosen answer covers fewer of the question's numbers;
3. evaluation (each test set with base and trained predictions): coverage and tokens of the base and
   trained answers on the problems the trained model lost, gained and kept.

    .venv/bin/python scripts/tokensqueeze_pairs.py runs/main-tokensqueeze-default
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean, median

from thinkpress.core.config import RunConfig, load_yaml
from thinkpress.core.planning import load_problems
from thinkpress.core.plugins import get_registry

NUM = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")


def numbers(text: str) -> set[str]:
    out = set()
    for m in NUM.findall(text):
        v = m.replace(",", "").rstrip(".")
        if "." in v:
            v = v.rstrip("0").rstrip(".")
        out.add(v)
    return out


def coverage(question_nums: set[str], answer: str) -> float | None:
    return len(question_nums & numbers(answer)) / len(question_nums) if question_nums else None


def question_of(prompt: str) -> str:
    """The user turn of a chat prompt (ChatML: between '<|im_start|>user' and '<|im_end|>')."""
    m = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S)
    return m.group(1) if m else prompt


def fmt(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    return f"{mean(xs):.3f} (n={len(xs)})" if xs else "-"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    a = ap.parse_args()
    stages = a.run / "stages"
    print(f"# {a.run}\n")
    sampler = next(iter(sorted(stages.glob("*1-sampler-*"))), None)
    if sampler:
        by_pid: dict[str, list[dict]] = defaultdict(list)
        for s in read(sampler / "samples.jsonl"):
            by_pid[s["problem_id"]].append(s)
        short, med, lucky = [], [], 0
        for group in by_pid.values():
            qn = numbers(question_of(group[0]["prompt"]))
            ok = sorted((s for s in group if s["correct"] and s["finish_reason"] != "length"),
                        key=lambda s: s["n_tokens"])
            if not ok or len(ok) == len(group) or not qn:
                continue
            c_short, c_med = coverage(qn, ok[0]["completion"]), coverage(qn, ok[len(ok) // 2]["completion"])
            short.append(c_short)
            med.append(c_med)
            lucky += c_short < c_med
        print("## Samples: problems with both correct and incorrect samples\n")
        print(f"- coverage of the shortest correct sample: {fmt(short)}; of the median-length correct one: {fmt(med)}")
        print(f"- the shortest correct sample covers fewer question numbers than the median one in {lucky} of "
              f"{len(short)} problems\n")
    pair_stage = sorted([*stages.glob("*-refiner-*"), *stages.glob("*2-selector-*")])
    if pair_stage:
        pairs = read(pair_stage[-1] / "pairs.jsonl")
        cc, cr, fewer, ratio = [], [], 0, []
        for p in pairs:
            qn = numbers(question_of(p["prompt"]))
            if not qn:
                continue
            a_, b_ = coverage(qn, p["chosen"]), coverage(qn, p["rejected"])
            cc.append(a_)
            cr.append(b_)
            fewer += a_ < b_
            ratio.append(p["meta"].get("rejected_tokens", 1) / max(1, p["meta"].get("chosen_tokens", 1)))
        print(f"## Pairs ({pair_stage[-1].name})\n")
        print(f"- {len(pairs)} pairs; coverage of chosen {fmt(cc)} vs. rejected {fmt(cr)}")
        print(f"- chosen covers fewer question numbers than rejected in {fewer} of {len(cc)} pairs")
        if ratio:
            print(f"- rejected/chosen length ratio: median {median(ratio):.2f}, mean {mean(ratio):.2f}\n")
    cfg = RunConfig.model_validate(load_yaml(a.run / "config.yaml"))
    reg = get_registry()
    questions = {spec.display_name(): {p.id: p.question for p in load_problems(spec, reg, cfg.seed, "test_data")[0]}
                 for spec in cfg.test_data}
    for ts in sorted((a.run / "eval").glob("*")):
        base = {r["problem_id"]: r for r in read(ts / "base" / "predictions.jsonl")}
        trained = {r["problem_id"]: r for r in read(ts / "trained" / "predictions.jsonl")}
        if not base or not trained:
            continue
        groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
        for pid, b in base.items():
            t = trained.get(pid)
            if t is None:
                continue
            kind = {(True, False): "lost", (False, True): "gained", (True, True): "both right",
                    (False, False): "both wrong"}[(b["correct"], t["correct"])]
            groups[kind].append((b, t))
        print(f"## Evaluation: {ts.name}\n")
        print("| problems | n | base coverage | trained coverage | base tokens | trained tokens |")
        print("|---|---|---|---|---|---|")
        for kind in ("lost", "gained", "both right", "both wrong"):
            rows = groups.get(kind, [])
            if not rows:
                continue
            qn = [numbers(questions.get(ts.name, {}).get(b["problem_id"], "")) for b, _ in rows]
            cb = [coverage(q, b["completion"]) for q, (b, _) in zip(qn, rows, strict=True)]
            ct = [coverage(q, t["completion"]) for q, (_, t) in zip(qn, rows, strict=True)]
            print(f"| {kind} | {len(rows)} | {fmt(cb)} | {fmt(ct)} | {mean(b['n_tokens'] for b, _ in rows):.0f} | "
                  f"{mean(t['n_tokens'] for _, t in rows):.0f} |")
        print()


if __name__ == "__main__":
    main()
