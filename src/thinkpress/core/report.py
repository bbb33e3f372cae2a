"""``report.json`` (the stable contract), ``report.md`` and ``plot.png`` (accuracy vs. mean tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thinkpress.core.store import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from thinkpress.core.pipeline import Runner

CONTRACT_KEYS = ("name", "params", "n", "accuracy", "mean_tokens", "mean_tokens_correct", "p50_tokens", "p90_tokens",
                 "truncation_rate", "latency_s", "decode_tokens_per_s", "peak_kv_bytes")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "n", "accuracy", "mean tok", "mean tok (correct)", "p50", "p90", "truncated", "saved vs base",
            "latency/problem s", "decode tok/s", "peak KV MB", "lost / gained (p)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kv = r.get("peak_kv_bytes")
        lines.append("| " + " | ".join([
            r["name"], str(r["n"]), _fmt(r["accuracy"], True), _fmt(r["mean_tokens"]), _fmt(r["mean_tokens_correct"]),
            _fmt(r["p50_tokens"]), _fmt(r["p90_tokens"]), _fmt(r["truncation_rate"], True),
            _fmt(r.get("tokens_saved"), True), _fmt(r["latency_s"]), _fmt(r["decode_tokens_per_s"]),
            _fmt(kv / 2**20 if kv else None), flips(r),
        ]) + " |")
    return "\n".join(lines)


def flips(r: dict[str, Any]) -> str:
    """``lost / gained (p)`` against the variant's reference (see ``evaluation.paired_flips``)."""
    if r.get("flips_vs") is None:
        return "-"
    return f"{r['lost']} / {r['gained']} ({r['flip_p']:.2f})"


FLIPS_NOTE = ("lost / gained (p): problems right in the reference variant (base; for a KV variant, the same model "
              "with the full cache) and wrong in this one, the reverse, and the exact two-sided McNemar p-value: "
              "a large p means the accuracy difference is within chance on this many problems.")


def plot(rows: list[dict[str, Any]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in rows:
        ax.scatter(r["mean_tokens"], 100 * r["accuracy"], s=50)
        ax.annotate(r["name"], (r["mean_tokens"], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    # Axes start at zero so that small differences are not drawn as large ones.
    ax.set_xlim(0, 1.1 * max((r["mean_tokens"] for r in rows), default=1.0) or 1.0)
    ax.set_ylim(0, 100)
    ax.set_xlabel("mean output tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs. output length (one point per variant)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runner: Runner, rows: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = runner.cfg
    spec = cfg.test_data
    report = {
        "config_hash": cfg.config_hash(),
        "plugins": cfg.plugins,
        "model": cfg.model,
        "dataset": {"name": spec.name, "split": spec.split, "path": spec.path, "n": len(runner.test_problems),
                    "skipped_rows": runner.skipped_rows["test_data"],
                    "train_skipped_rows": runner.skipped_rows["train_data"]},
        "variants": [{k: r.get(k) for k in CONTRACT_KEYS} | {k: v for k, v in r.items() if k not in CONTRACT_KEYS}
                     for r in rows],
        "stages": runner.stage_info,
        "plan": runner.plan.describe(),
        "timings": runner.timings,
    }
    out = runner.store.dir
    atomic_write_json(out / "report.json", report)
    if rows:
        plot(rows, out / "plot.png")
    md = [f"# thinkpress run: {', '.join(cfg.plugins)}", "",
          f"- model: `{cfg.model}`  ", f"- test data: `{spec.name}` ({spec.split}, n={len(runner.test_problems)})  ",
          f"- config hash: `{report['config_hash']}`  ",
          f"- wall time: {runner.timings.get('total_s', 0):.0f} s (training stages "
          f"{runner.timings.get('train_s', 0):.0f} s, evaluation {runner.timings.get('eval_s', 0):.0f} s)", ""]
    if rows:
        md += ["## Evaluation", "", markdown_table(rows), ""]
        if any(r.get("flips_vs") for r in rows):
            md += [FLIPS_NOTE, ""]
        md += ["![accuracy vs tokens](plot.png)", ""]
    extra = getattr(runner, "report_lines", [])
    if extra:
        md += [*extra, ""]
    if runner.stage_info:
        md += ["## Stages", "", "| stage | plugin | wall s | cached | stats |", "|---|---|---|---|---|"]
        for label, s in runner.stage_info.items():
            stats = ", ".join(f"{k}={_fmt(v)}" for k, v in (s.get("stats") or {}).items())
            md.append(f"| {label} | {s['plugin']} | {_fmt(s['wall_s'])} | {s['cached']} | {stats} |")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return report
