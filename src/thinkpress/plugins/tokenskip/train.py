"""Ratio-conditioned LoRA SFT and controllable evaluation (one variant per gamma)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from thinkpress.api import (
    EVAL_ONLY,
    ConfigError,
    EvalVariant,
    StageContext,
    TestSetResult,
    Trainer,
    TrainingError,
    TrainingSet,
    TrainResult,
    atomic_write_json,
    paired_savings,
)
from thinkpress.toolkit.lora import SFTConfig, train_lora_sft

TAGS_FILE = "ratio_tags.json"
POSITION_FILE = "ratio_tag_position.json"  # absent in adapters trained before tag_position: the question


class TokenSkipSFTConfig(SFTConfig):
    """The published TokenSkip recipe (LLaMA-Factory defaults: no LoRA dropout); presets scale it for CPU."""

    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    lr: float = Field(default=5e-5, gt=0.0, description="Peak learning rate")
    epochs: float = Field(default=3.0, gt=0.0, description="Passes over the training set")
    batch_size: int = Field(default=4, ge=1, description="Examples per micro-batch")
    grad_accum: int = Field(default=2, ge=1, description="Micro-batches per optimizer step (effective batch 8)")
    max_length: int = Field(default=2048, ge=8, description="Cutoff of prompt+completion(+EOS) tokens; the cut "
                            "examples are counted (stats truncated_examples) and training refuses to start when "
                            "more than 5% would be cut")
    scale_max_tokens: bool = Field(default=False, description="Evaluate gamma with max_new_tokens scaled by "
                                   "gamma (as the original does for MATH)")
    eval_gammas: list[float] | None = Field(default=None, json_schema_extra=EVAL_ONLY,
                                            description="Evaluate only these trained gammas (1.0, the reference "
                                            "of the actual ratio, is kept when trained); default: every trained "
                                            "gamma. Not part of the training cache key")

    @field_validator("eval_gammas")
    @classmethod
    def _eval_gammas_in_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not 0.0 < g <= 1.0 for g in v)):
            raise ValueError(f"eval_gammas must be a non-empty list of ratios in (0, 1], got {v}")
        return v


def ratio_tags(data: TrainingSet) -> dict[str, str]:
    """``{gamma: tag}`` from the pruner's examples (all carry the same table)."""
    tags: dict[str, str] = {}
    for e in data.examples:
        tags.update(e.meta.get("ratio_tags") or {})
    return tags


def tag_position(data: TrainingSet) -> str:
    """Where the pruner put the tags: ``question`` (the user turn) or ``response`` (the model's turn)."""
    found = {e.meta.get("tag_position", "question") for e in data.examples if e.meta.get("ratio_tags")}
    if len(found) > 1:
        raise TrainingError(f"the examples put the ratio tag in different places ({sorted(found)})")
    return found.pop() if found else "question"


def controllability(result: TestSetResult, tokens: dict[str, list[float]] | None = None) -> list[dict[str, Any]]:
    """Per gamma variant: actual ratio (mean tokens at gamma / at 1.0) and adherence error |actual - gamma|.

    With ``tokens`` (variant name -> output tokens per problem, the same problems in the same order),
    ``actual_ratio_ci`` is the paired-bootstrap 95% interval of the ratio. The keys are added to the
    variants' rows; the rows with a gamma are returned, largest gamma first.
    """
    gammas = [(v.variant.params["gamma"], v.row) for v in result.variants if "gamma" in v.variant.params]
    full = next((row for g, row in gammas if g == 1.0), None)
    if full is None or not full["mean_tokens"]:
        return []
    for g, r in gammas:
        r["actual_ratio"] = r["mean_tokens"] / full["mean_tokens"]
        r["adherence_error"] = abs(r["actual_ratio"] - g)
        r["accuracy_vs_full"] = r["accuracy"] - full["accuracy"]
        if tokens and full["name"] in tokens and r["name"] in tokens:
            saved = paired_savings(tokens[full["name"]], tokens[r["name"]])
            r["actual_ratio_ci"] = None if saved is None else [1.0 - saved[1], 1.0 - saved[0]]
    return [r for _, r in sorted(gammas, key=lambda gr: -gr[0])]


def tokens_per_problem(eval_dir: Path, names: list[str]) -> dict[str, list[float]] | None:
    """Output tokens per problem of each variant from ``eval_dir/<variant>/predictions.jsonl``, aligned by
    problem id (None when a variant's predictions are missing or cover other problems)."""
    by_name = {}
    for name in names:
        path = eval_dir / name.replace("/", "_") / "predictions.jsonl"
        if not path.exists():
            return None
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        by_name[name] = {r["problem_id"]: float(r["n_tokens"]) for r in rows}
    ids = sorted(next(iter(by_name.values()), {}))
    if any(sorted(v) != ids for v in by_name.values()):
        return None
    return {name: [v[i] for i in ids] for name, v in by_name.items()}


def plot_ratio(rows: list[dict[str, Any]], path: Path) -> None:
    from thinkpress.api import figure

    with figure(path, 2) as (a1, a2):
        _ratio_panels(a1, a2, rows)


def _ratio_panels(a1, a2, rows: list[dict[str, Any]]) -> None:
    gs = [r["params"]["gamma"] for r in rows]
    a1.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="ideal")
    a1.plot(gs, [r["actual_ratio"] for r in rows], "o-", label="trained")
    a1.set_xlim(0, 1.05)
    a1.set_ylim(0, max(1.1, 1.05 * max(r["actual_ratio"] for r in rows)))
    a1.set_xlabel("requested ratio gamma")
    a1.set_ylabel("actual ratio (tokens at gamma / tokens at 1.0)")
    a1.set_title("ratio adherence")
    a1.legend()
    a2.plot([r["mean_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], "o-")
    for r in rows:
        a2.annotate(f"{r['params']['gamma']:g}", (r["mean_tokens"], 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    a2.set_xlim(0, 1.1 * max(r["mean_tokens"] for r in rows))
    a2.set_ylim(0, 100)
    a2.set_xlabel("mean output tokens")
    a2.set_ylabel("accuracy (%)")
    a2.set_title("accuracy vs. tokens, one point per gamma")


class TokenSkipSFT(Trainer):
    name = "tokenskip-sft"
    description = "ratio-conditioned LoRA SFT (completion-only loss); evaluated at every gamma via the ratio tag"

    Config = TokenSkipSFTConfig

    def train(self, data: TrainingSet, ctx: StageContext) -> TrainResult:
        tags = ratio_tags(data)
        if not tags:
            raise TrainingError("tokenskip-sft trains on ratio-tagged examples from the 'tokenskip' pruner; none of "
                                f"the {len(data.examples)} examples carries a ratio tag table (meta.ratio_tags). "
                                "Run with --plugins tokenskip (or add 'tokenskip' to stages.pruners).")
        atomic_write_json(ctx.workdir / TAGS_FILE, tags)
        atomic_write_json(ctx.workdir / POSITION_FILE, {"tag_position": tag_position(data)})
        result = train_lora_sft(data.examples, ctx, self.config, out_dir=ctx.workdir, component=self.name)
        drawn: dict[str, int] = {}
        for e in data.examples:
            drawn[f"{e.meta['gamma']:g}"] = drawn.get(f"{e.meta['gamma']:g}", 0) + 1
        result.metrics["examples_per_gamma"] = drawn
        return result

    def check_plan(self, plan) -> None:
        """``eval_gammas`` must be ratios the planned TokenSkip pruner trains (1.0 always may be named).

        Without such a pruner in the plan (another component made the data), the trained ratios are known
        only from the data, so :meth:`eval_variants` checks them after training.
        """
        wanted = self.config.eval_gammas
        pruners = [p.instance for p in plan.trace_pruners if hasattr(p.instance, "all_gammas")]
        if wanted is None or not pruners:
            return
        trained = {1.0} | {g for p in pruners for g in p.all_gammas()}
        missing = [g for g in wanted if not any(abs(g - t) < 1e-9 for t in trained)]
        if missing:
            names = " / ".join(f"components.{p.name}.gammas" for p in pruners)
            raise ConfigError(f"components.{self.name}.eval_gammas: {missing} would not be trained; {names} "
                              f"trains {sorted(trained)}")

    def eval_variants(self, ctx: StageContext) -> list[EvalVariant]:
        tags = json.loads((ctx.workdir / TAGS_FILE).read_text())
        pos_file = ctx.workdir / POSITION_FILE
        position = json.loads(pos_file.read_text())["tag_position"] if pos_file.exists() else "question"
        max_new = ctx.config.eval.generation.max_new_tokens
        wanted = self.config.eval_gammas
        if wanted is not None:
            missing = [g for g in wanted if g != 1.0 and not any(abs(float(t) - g) < 1e-9 for t in tags)]
            if missing:
                raise TrainingError(f"tokenskip-sft.eval_gammas {missing} were not trained; trained gammas: "
                                    f"{sorted(float(t) for t in tags)}")
        out = []
        for g_str, tag in sorted(tags.items(), key=lambda kv: -float(kv[0])):
            g = float(g_str)
            if wanted is not None and g != 1.0 and not any(abs(g - w) < 1e-9 for w in wanted):
                continue
            where = {"response_prefix": tag} if position == "response" else {"prompt_suffix": tag}
            out.append(EvalVariant(name=f"trained@gamma={g_str}", params={"gamma": g}, **where,
                                   max_new_tokens=math.ceil(g * max_new) if self.config.scale_max_tokens else None))
        return out

    def report_extras(self, result: TestSetResult, out_dir: Path) -> list[str]:
        names = [v.name for v in result.variants if "gamma" in v.variant.params]
        tokens = tokens_per_problem(out_dir / "eval" / result.name.replace("/", "_"), names)
        ctrl = controllability(result, tokens)
        if not ctrl:
            return []
        plot_ratio(ctrl, out_dir / "ratio.png")
        lines = ["## Controllability (TokenSkip)", "",
                 "| gamma | accuracy | vs. gamma 1.0 | mean tokens | actual ratio [95% CI] | adherence error |",
                 "|---|---|---|---|---|---|"]
        for r in ctrl:
            ci = r.get("actual_ratio_ci")
            ci_txt = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"| {r['params']['gamma']:g} | {100 * r['accuracy']:.1f}% "
                         f"| {100 * r['accuracy_vs_full']:+.1f} | {r['mean_tokens']:.1f} "
                         f"| {r['actual_ratio']:.3f}{ci_txt} | {r['adherence_error']:.3f} |")
        return [*lines, "", "![actual vs requested ratio; accuracy vs tokens](ratio.png)"]
