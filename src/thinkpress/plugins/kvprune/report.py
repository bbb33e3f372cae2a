"""The KV pruners' report: per budget, quality and memory against the same model with the full cache."""

from __future__ import annotations

from pathlib import Path

from thinkpress.api import TestSetResult, VariantResult, flips, fmt


def budget_report(policy: str, result: TestSetResult, out_dir: Path) -> list[str]:
    """Add ``kv_ratio`` and ``speed_ratio`` to this policy's rows; a table and a plot."""
    variants = [v for v in result.variants if v.variant.kv_pruner == policy]
    if not variants:
        return []
    mine = [v.row for v in variants]
    lines = [f"### KV policy `{policy}` vs. the full cache", "",
             "| variant | accuracy | vs full | lost / gained (p) | mean tok | peak KV MB | peak KV kept | mean KV kept "
             "| decode tok/s | speed vs full "
             "| token agreement | identical outputs | NLL full -> pruned | entries evicted |",
             "|" + "---|" * 14]
    noop, unequal = [], []
    for v, r in zip(variants, mine, strict=True):
        if r.get("kv_kept_peak") is not None:  # each answer against its own full cache: no padding, no other rows
            r["kv_ratio"] = r["kv_kept_peak"]
        ref = result.get(v.reference)
        if ref is not None:
            ref = ref.row
            if r.get("kv_kept_peak") is None and r.get("peak_kv_bytes") and ref.get("peak_kv_bytes"):
                r["kv_ratio"] = r["peak_kv_bytes"] / ref["peak_kv_bytes"]  # engines that do not count entries
            if r.get("decode_tokens_per_s") and ref.get("decode_tokens_per_s"):
                if r.get("threads") and r.get("threads") == ref.get("threads"):
                    r["speed_ratio"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
                else:  # e.g. one of them read from a cache filled with another thread count
                    unequal.append(r["name"])
        if r.get("kv_evicted") == 0:
            noop.append(r["name"])
        nll = (f"{r['nll_full']:.3f} -> {r['nll_pruned']:.3f}" if r.get("nll_pruned") is not None else "-")
        kv = r.get("peak_kv_bytes")
        lines.append("| " + " | ".join([
            r["name"], fmt(r["accuracy"], True),
            "-" if r.get("accuracy_delta") is None else f"{100 * r['accuracy_delta']:+.1f} pt", flips(r),
            fmt(r["mean_tokens"]),
            fmt(kv / 2**20 if kv else None), fmt(r.get("kv_ratio"), True), fmt(r.get("kv_kept_mean"), True),
            fmt(r["decode_tokens_per_s"]),
            f"{r['speed_ratio']:.2f}x" if "speed_ratio" in r else "-", fmt(r.get("token_agreement"), True),
            fmt(r.get("exact_match"), True), nll, fmt(r.get("kv_evicted")),
        ]) + " |")
    lines += ["", "Peak KV kept: per answer, the most cache entries it held at once while decoding (after the "
              "policy pruned its prompt) over its own full cache (prompt + output), averaged over answers; mean KV "
              "kept: the same, step-averaged; peak KV MB: the physical cache tensor of the batch (the whole prompt "
              "at the prefill, left padding, and the holes one row's evictions leave while another row is longer), "
              "so it falls less than the entries kept.",
              "", "Token agreement: the share of each full-cache output (answers that ended with EOS) that the "
              "pruned run reproduced before its first differing token; NLL: mean per-token NLL of those full-cache "
              "outputs, teacher-forced through the decode loop with the full and with the pruned cache; lost / gained: "
              "problems the full cache got right and the pruned cache wrong, the reverse, and the exact McNemar p."]
    if unequal:
        lines += ["", f"No speed ratio for {', '.join(unequal)}: it and its full-cache reference were not timed at one "
                  "thread count (an evaluation read from a cache filled by another run, or a run resumed with other "
                  "threads)."]
    if noop:
        lines += ["", f"No entry was evicted in {', '.join(noop)}: every sequence fit in the budget (+ buffer), so "
                  "these variants are the full cache (a no-op, not a result about the policy)."]
    if len(mine) > 1:
        path = Path(out_dir) / f"kv_{policy}.png"
        plot_budget_curve(policy, variants, path)
        lines += ["", f"![{policy} budget curve]({path.name})"]
    return lines + [""]


def plot_budget_curve(policy: str, variants: list[VariantResult], path: Path) -> None:
    from thinkpress.api import figure

    with figure(path, 2) as (a1, a2):
        _budget_panels(a1, a2, policy, variants)


def _budget_panels(a1, a2, policy: str, variants: list[VariantResult]) -> None:
    key = "budget" if all("budget" in v.variant.kv_params for v in variants) else "ratio"
    groups: dict[str, list[VariantResult]] = {}
    for v in variants:
        groups.setdefault(v.reference, []).append(v)
    for ref, vs in groups.items():
        vs = sorted(vs, key=lambda v: v.variant.kv_params[key])
        xs = [v.variant.kv_params[key] for v in vs]
        rs = [v.row for v in vs]
        a1.plot(xs, [100 * r["accuracy"] for r in rs], "o-", label=f"{ref} accuracy")
        if all(r.get("token_agreement") is not None for r in rs):
            a1.plot(xs, [100 * r["token_agreement"] for r in rs], "s--", label=f"{ref} token agreement")
        if all(r.get("kv_ratio") is not None for r in rs):
            a2.plot(xs, [100 * r["kv_ratio"] for r in rs], "o-", label=f"{ref} peak KV kept")
    for ax, label in ((a1, "%"), (a2, "% of the full cache")):
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
    a1.set_title(f"{policy}: quality vs. {key}")
    a2.set_title(f"{policy}: peak KV kept vs. {key}")
