"""``report.json`` (the stable contract), ``report.md`` and ``plot.png`` (accuracy vs. mean tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thinkpress.core.files import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from thinkpress.core.results import RunResult

CONTRACT_KEYS = ("name", "params", "n", "accuracy", "mean_tokens", "mean_tokens_correct", "p50_tokens", "p90_tokens",
                 "truncation_rate", "latency_s", "decode_tokens_per_s", "peak_kv_bytes")


def fmt(v: Any, pct: bool = False) -> str:
    """A table cell: ``-`` for None, a percentage, or a number with precision that suits its size."""
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def fmt_pct_ci(ci: list[float] | None, signed: bool = False) -> str:
    """`` [lo, hi]`` of a fraction's interval in percent (empty without one)."""
    if ci is None:
        return ""
    f = "{:+.1f}" if signed else "{:.1f}"
    return f" [{f.format(100 * ci[0])}, {f.format(100 * ci[1])}]"


def fmt_num_ci(ci: list[float] | None, digits: int = 0) -> str:
    """`` [lo, hi]`` of a number's interval (empty without one)."""
    return "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per variant; brackets hold 95% intervals (see :mod:`thinkpress.core.stats`)."""
    head = ("variant", "n", "accuracy [95% CI]", "vs ref, pt [95% CI]", "lost / gained (p)", "mean tok [95% CI]",
            "saved vs base [95% CI]", "mean tok (correct)", "p50", "p90", "truncated", "latency/problem s",
            "decode tok/s", "peak KV MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kv = r.get("peak_kv_bytes")
        delta = r.get("accuracy_delta")
        lines.append("| " + " | ".join([
            r["name"], str(r["n"]), fmt(r["accuracy"], True) + fmt_pct_ci(r.get("accuracy_ci")),
            "-" if delta is None else f"{100 * delta:+.1f}" + fmt_pct_ci(r.get("accuracy_delta_ci"), signed=True),
            flips(r), fmt(r["mean_tokens"]) + fmt_num_ci(r.get("mean_tokens_ci")),
            fmt(r.get("tokens_saved"), True) + fmt_pct_ci(r.get("tokens_saved_ci"), signed=True),
            fmt(r["mean_tokens_correct"]), fmt(r["p50_tokens"]), fmt(r["p90_tokens"]),
            fmt(r["truncation_rate"], True), fmt(r["latency_s"]), fmt(r["decode_tokens_per_s"]),
            fmt(kv / 2**20 if kv else None),
        ]) + " |")
    return "\n".join(lines)


def summary_lines(set_name: str, rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per non-base variant: the change in accuracy and length, with intervals, in words."""
    from thinkpress.core.stats import excludes_zero

    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        ref = by_name.get(r.get("flips_vs") or "")
        if ref is None:
            continue
        d, ci = r.get("accuracy_delta"), r.get("accuracy_delta_ci")
        acc = (f"accuracy {100 * ref['accuracy']:.1f}% -> {100 * r['accuracy']:.1f}% "
               f"({100 * d:+.1f} pt, 95% CI {fmt_pct_ci(ci, signed=True).strip()[1:-1] or 'n/a'}; "
               f"{r['lost']} lost / {r['gained']} gained, McNemar p = {r['flip_p']:.2g}): "
               + ("significant" if excludes_zero(ci) and r["flip_p"] < 0.05 else "no significant change"))
        text = f"{set_name} (n={r['n']}), {r['name']} vs {ref['name']}: {acc}"
        if r.get("tokens_saved") is not None:
            sv, sci = r["tokens_saved"], r.get("tokens_saved_ci")
            base = by_name.get("base", ref)
            change = f"{100 * abs(sv):.1f}% {'fewer' if sv >= 0 else 'more'}"
            text += (f". Tokens {base['mean_tokens']:.0f} (base) -> {r['mean_tokens']:.0f}: {change} "
                     f"(95% CI {fmt_pct_ci(sci, signed=True).strip()[1:-1] or 'n/a'} saved): "
                     + ("significant" if excludes_zero(sci) else "no significant change in length"))
        if r.get("truncation_rate"):
            text += f". Cut off at the token limit: {100 * r['truncation_rate']:.1f}% (graded wrong)"
        out.append(text + ".")
    return out


def flips(r: dict[str, Any]) -> str:
    """``lost / gained (p)`` against the variant's reference (see ``evaluation.paired_flips``)."""
    if r.get("flips_vs") is None:
        return "-"
    return f"{r['lost']} / {r['gained']} ({r['flip_p']:.2f})"


INTERVALS_NOTE = ("Brackets: 95% intervals. Accuracy: Wilson score interval. Change vs. the reference and tokens "
                  "saved vs. base: percentile bootstrap over problems, resampling the pairs (seeded). An answer cut "
                  "off at the token limit is graded wrong unless it already stated a final answer.")

FLIPS_NOTE = ("lost / gained (p): problems right in the reference variant (base; for a KV variant, the same model "
              "with the full cache) and wrong in this one, the reverse, and the exact two-sided McNemar p-value: "
              "a large p means the accuracy difference is within chance on this many problems.")


def plot(results: dict[str, list[dict[str, Any]]], path) -> None:
    """Accuracy vs. mean tokens, one panel per test set, with 95% intervals as error bars."""
    from thinkpress.core.plots import figure

    sets = [(name, rows) for name, rows in results.items() if rows]
    with figure(path, len(sets), panel=(6, 4.4)) as axes:
        _panels(axes, sets)


def _panels(axes, sets) -> None:
    for ax, (name, rows) in zip(axes, sets, strict=True):
        for r in rows:
            x, y = r["mean_tokens"], 100 * r["accuracy"]
            aci, tci = r.get("accuracy_ci"), r.get("mean_tokens_ci")
            yerr = [[max(0.0, y - 100 * aci[0])], [max(0.0, 100 * aci[1] - y)]] if aci else None
            xerr = [[max(0.0, x - tci[0])], [max(0.0, tci[1] - x)]] if tci else None
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, ms=6)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        # Axes start at zero so that small differences are not drawn as large ones.
        ax.set_xlim(0, 1.15 * max((r.get("mean_tokens_ci") or [0, r["mean_tokens"]])[1] for r in rows) or 1.0)
        ax.set_ylim(0, 100)
        ax.set_xlabel("mean output tokens")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{name} (n={rows[0]['n']}): accuracy vs. length, 95% CIs", fontsize=10)


def write_report(run: RunResult) -> dict[str, Any]:
    """Write report.json (the contract; ``dataset``/``variants`` are the primary test set's), report.md, plot.png."""
    cfg = run.config
    primary = run.primary
    rows = primary.rows if primary else []
    results = run.rows()

    def contract(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: r.get(k) for k in CONTRACT_KEYS} | {k: v for k, v in r.items() if k not in CONTRACT_KEYS}
                for r in rs]

    summary = [line for ts in run.test_sets for line in summary_lines(ts.name, ts.rows)]
    report = {
        "config_hash": cfg.config_hash(),
        "plugins": cfg.plugins,
        "model": cfg.model,
        "dataset": (primary.test_set.describe() if primary else {})
        | {"train_skipped_rows": run.skipped_rows.get("train_data", 0)},
        "variants": contract(rows),
        "test_sets": [{"name": ts.name, "dataset": ts.test_set.describe(), "variants": contract(ts.rows)}
                      for ts in run.test_sets],
        "summary": summary,
        "stages": run.stages,
        "plan": run.plan.describe(),
        "timings": run.timings,
        "nondeterminism": run.nondeterminism,
    }
    sets = [ts.test_set for ts in run.test_sets]
    out = run.out_dir
    atomic_write_json(out / "report.json", report)
    if any(results.values()):
        plot(results, out / "plot.png")
    md = [f"# thinkpress run: {', '.join(cfg.plugins)}", "",
          f"- model: `{cfg.model}`  ",
          "- engines: " + (", ".join(f"{what}: `{_used_engine(run.stages, what, eng)}`"
                                     for what, eng in run.plan.engines.items()) or f"`{cfg.engine}`") + "  ",
          "- test sets: " + ", ".join(f"`{ts.name}` ({ts.spec.split}, n={len(ts.problems)})" for ts in sets) + "  ",
          f"- config hash: `{report['config_hash']}`  ",
          f"- wall time: {run.timings.get('total_s', 0):.0f} s (training stages "
          f"{run.timings.get('train_s', 0):.0f} s, evaluation {run.timings.get('eval_s', 0):.0f} s)", ""]
    if run.nondeterminism:
        md += ["**Not reproducible bit for bit:** " + "; ".join(run.nondeterminism), ""]
    if summary:
        md += ["## Summary", "", *[f"- {line}" for line in summary], ""]
    for ts in sets:
        if results.get(ts.name):
            md += [f"## Evaluation: {ts.name} ({ts.spec.split}, n={len(ts.problems)})", "",
                   markdown_table(results[ts.name]), ""]
    if any(results.values()):
        md += [INTERVALS_NOTE, "", FLIPS_NOTE, "", "![accuracy vs tokens](plot.png)", ""]
    extra = run.report_lines
    if extra:
        md += [*extra, ""]
    if cfg.rounds > 1:
        md += rounds_table(run.stages, cfg.rounds)
    if run.stages:
        md += ["## Stages", "", "| stage | plugin | engine | wall s | cached | stats |", "|---|---|---|---|---|---|"]
        for label, s in run.stages.items():
            stats = ", ".join(f"{k}={fmt(v)}" for k, v in (s.get("stats") or {}).items())
            md.append(f"| {label} | {s['plugin']} | {s.get('engine') or cfg.engine} | {fmt(s['wall_s'])} | "
                      f"{s['cached']} | {stats} |")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return report


def _used_engine(stages: dict[str, Any], what: str, assigned: str) -> str:
    """The engine a planned stage (``"<stage> <component>"``) used by its stage records (``none`` when every
    round's stage used none, e.g. a trainer with its own model copy), else the one the plan assigned."""
    stage, _, name = what.partition(" ")
    used = {s.get("engine") for label, s in stages.items() if label.endswith(f"-{stage}-{name}")}
    return "none" if used == {"none"} else assigned


def rounds_table(stages: dict[str, Any], rounds: int) -> list[str]:
    """Per self-improvement round: what the round's policy sampled on the training problems, what was
    selected, and how training went (from the stages' stats, labelled ``r<round>-...``)."""
    md = ["## Rounds", "", "Round r samples with round r-1's adapter (round 1: the base model), on the training "
          "problems.", "", "| round | samples | correct | mean tokens | truncated | pairs | examples | train steps | "
          "loss first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    for r in range(1, rounds + 1):
        mine = {label.split("-", 3)[2]: s.get("stats") or {} for label, s in stages.items()
                if label.startswith(f"r{r}-")}
        smp, sel, trn = mine.get("sampler", {}), mine.get("selector", {}), mine.get("trainer", {})
        n = smp.get("samples") or 0
        md.append(f"| {r} | {n} | {fmt(smp['correct'] / n, pct=True) if n and 'correct' in smp else '-'} | "
                  f"{fmt(smp.get('mean_tokens', sel.get('mean_sample_tokens')))} | {smp.get('truncated', '-')} | "
                  f"{sel.get('pairs', '-')} | "
                  f"{sel.get('examples', '-')} | {trn.get('steps', '-')} | "
                  f"{fmt(trn.get('loss_first'))} -> {fmt(trn.get('loss_last'))} |")
    return [*md, ""]
