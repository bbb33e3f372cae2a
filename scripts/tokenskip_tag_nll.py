"""Diagnostic: does a TokenSkip adapter condition on the ratio tag?

Needs a run with ``components.tokenskip.draws_per_example=2`` (each CoT at two ratios). For each of the
first N problems whose two draws have different gammas, every training target is teacher-forced under its
own tagged prompt and under the other draw's prompt (same question, other tag). An adapter that reads the
tag gives its own target a clearly lower NLL; compare with ``--base`` (the untrained model) as control.

    .venv/bin/python scripts/tokenskip_tag_nll.py runs/tks-384 --n 24 [--base]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from thinkpress.core.engines.hf import HFEngine
from thinkpress.core.models import ensure_embedded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=24, help="problems (two targets each)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--base", action="store_true", help="score with the untrained model (control)")
    a = ap.parse_args()
    by_problem = defaultdict(list)
    for line in (a.run / "stages" / "3-pruner-tokenskip" / "examples.jsonl").open():
        ex = json.loads(line)
        by_problem[ex["problem_id"]].append(ex)
    pairs = [v for v in by_problem.values() if len(v) == 2 and v[0]["meta"]["gamma"] != v[1]["meta"]["gamma"]]
    pairs = pairs[: a.n]
    engine = HFEngine.from_pretrained(str(ensure_embedded(a.model)), dtype="float32")
    if not a.base:
        from peft import PeftModel

        engine.model = PeftModel.from_pretrained(engine.model, str(a.run / "stages" / "4-trainer-tokenskip-sft" /
                                                                   "adapter")).eval()
    prompts, targets = [], []
    for x, y in [(p, q) for d in pairs for p, q in (d, d[::-1])]:
        prompts += [x["prompt"], y["prompt"]]  # own tag, then the other draw's tag
        targets += [x["completion"]] * 2
    nll = [-mean(lp) for lp in engine.score(prompts, targets, batch_size=8)]
    own, other = nll[0::2], nll[1::2]
    lower = sum(o < t for o, t in zip(own, other, strict=True))
    print(f"{len(own)} targets: mean NLL own tag {mean(own):.4f}, other tag {mean(other):.4f} "
          f"({100 * (mean(other) / mean(own) - 1):+.1f}%), own tag lower for {lower}/{len(own)}")


if __name__ == "__main__":
    main()
