"""The KV pruners' report: per budget, quality and memory against the same model with the full cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thinkpress.api import flips, fmt


def reference_name(row: dict[str, Any]) -> str:
    """The full-cache variant a KV variant is compared with (``base+rkv@budget=256`` -> ``base``)."""
    return row["reference"]


def budget_report(policy: str, rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Add ``kv_ratio`` and ``speed_ratio`` to this policy's rows; a table and a plot."""
    by_name = {r["name"]: r for r in rows}
    mine = [r for r in rows if r.get("params", {}).get("kv_policy") == policy]
    if not mine:
        return []
    lines = [f"### KV policy `{policy}` vs. the full cache", "",
             "| variant | accuracy | vs full | lost / gained (p) | mean tok | peak KV MB | KV % of full | decode tok/s "
             "| speed vs full "
             "| token agreement | identical outputs | NLL full -> pruned | entries evicted |",
             "|" + "---|" * 13]
    noop = []
    for r in mine:
        ref = by_name.get(reference_name(r))
        if ref is not None:
            if r.get("peak_kv_bytes") and ref.get("peak_kv_bytes"):
                r["kv_ratio"] = r["peak_kv_bytes"] / ref["peak_kv_bytes"]
            if r.get("decode_tokens_per_s") and ref.get("decode_tokens_per_s"):
                r["speed_ratio"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        if r.get("kv_evicted") == 0:
            noop.append(r["name"])
        nll = (f"{r['nll_full']:.3f} -> {r['nll_pruned']:.3f}" if r.get("nll_pruned") is not None else "-")
        kv = r.get("peak_kv_bytes")
        lines.append("| " + " | ".join([
            r["name"], fmt(r["accuracy"], True),
            "-" if r.get("accuracy_delta") is None else f"{100 * r['accuracy_delta']:+.1f} pt", flips(r),
            fmt(r["mean_tokens"]),
            fmt(kv / 2**20 if kv else None), fmt(r.get("kv_ratio"), True), fmt(r["decode_tokens_per_s"]),
            f"{r['speed_ratio']:.2f}x" if "speed_ratio" in r else "-", fmt(r.get("token_agreement"), True),
            fmt(r.get("exact_match"), True), nll, fmt(r.get("kv_evicted")),
        ]) + " |")
    lines += ["", "Token agreement: the share of each full-cache output (answers that ended with EOS) that the "
              "pruned run reproduced before its first differing token; NLL: mean per-token NLL of those full-cache "
              "outputs, teacher-forced through the decode loop with the full and with the pruned cache; lost / gained: "
              "problems the full cache got right and the pruned cache wrong, the reverse, and the exact McNemar p."]
    if noop:
        lines += ["", f"No entry was evicted in {', '.join(noop)}: every sequence fit in the budget (+ buffer), so "
                  "these variants are the full cache (a no-op, not a result about the policy)."]
    if len(mine) > 1:
        path = Path(out_dir) / f"kv_{policy}.png"
        plot_budget_curve(policy, mine, path)
        lines += ["", f"![{policy} budget curve]({path.name})"]
    return lines + [""]


def plot_budget_curve(policy: str, rows: list[dict[str, Any]], path: Path) -> None:
    from thinkpress.api import figure

    with figure(path, 2) as (a1, a2):
        _budget_panels(a1, a2, policy, rows)


def _budget_panels(a1, a2, policy: str, rows: list[dict[str, Any]]) -> None:
    key = "budget" if all("budget" in r["params"] for r in rows) else "ratio"
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(reference_name(r), []).append(r)
    for ref, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["params"][key])
        xs = [r["params"][key] for r in rs]
        a1.plot(xs, [100 * r["accuracy"] for r in rs], "o-", label=f"{ref} accuracy")
        if all(r.get("token_agreement") is not None for r in rs):
            a1.plot(xs, [100 * r["token_agreement"] for r in rs], "s--", label=f"{ref} token agreement")
        if all(r.get("kv_ratio") is not None for r in rs):
            a2.plot(xs, [100 * r["kv_ratio"] for r in rs], "o-", label=f"{ref} peak KV")
    for ax, label in ((a1, "%"), (a2, "% of the full cache")):
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
    a1.set_title(f"{policy}: quality vs. {key}")
    a2.set_title(f"{policy}: peak KV bytes vs. {key}")
