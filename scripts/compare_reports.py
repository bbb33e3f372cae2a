"""Compare the numbers of two runs' report.json: same config, same numbers?

    python scripts/compare_reports.py runs/A runs/B [runs/C runs/D ...]   (pairs)

Compares, per test set and variant, every number that describes the results (accuracy, token
counts, intervals, lost/gained, KV agreement, ...), and the stages' statistics (samples, pairs, steps,
losses). Timings, memory and throughput are left out: they differ between runs by nature. Exits 1
when any pair differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SKIP = ("latency_s", "decode_tokens_per_s", "wall_s", "s_per_step", "peak_rss", "speed_ratio", "peak_kv_bytes",
        "kv_ratio")


def numbers(run: Path) -> dict[str, object]:
    rep = json.loads((run / "report.json").read_text())
    out: dict[str, object] = {}
    for ts in rep.get("test_sets", []):
        for v in ts["variants"]:
            for k, val in v.items():
                if not any(s in k for s in SKIP):
                    out[f"{ts['name']}/{v['name']}/{k}"] = val
    for label, st in rep.get("stages", {}).items():
        for k, val in (st.get("stats") or {}).items():
            if not any(s in k for s in SKIP):
                out[f"stage {label.split('-', 1)[1]}/{k}"] = val
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__)
        return 2
    bad = 0
    for a, b in zip(argv[::2], argv[1::2], strict=True):
        na, nb = numbers(Path(a)), numbers(Path(b))
        common = na.keys() & nb.keys()
        diff = sorted(k for k in common if na[k] != nb[k])
        print(f"{a} vs {b}: {len(common)} numbers in both, {'identical' if not diff else f'{len(diff)} differ'}")
        only = sorted(na.keys() ^ nb.keys())
        if only:  # keys that one version reports and the other does not (new metadata, not a difference)
            print(f"  in one report only: {', '.join(only[:10])}{' ...' if len(only) > 10 else ''}")
        for k in diff[:20]:
            print(f"  {k}: {na.get(k)!r} != {nb.get(k)!r}")
        bad += bool(diff)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
