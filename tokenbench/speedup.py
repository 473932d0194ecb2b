"""Speed-ups as paired ratios: the baseline's time over the arm's, run by run.

The efficiency pass times the arms interleaved (baseline, A, B, baseline, A, B, ...), so a timed run
of an arm and the baseline's run of the same sample in the same round met the same machine load.
The ratio of each such pair is a speed-up measured under equal conditions; their median is the
speed-up, and the smallest and largest ratio bound it. On a busy CPU, where an arm's own latency
swings several-fold between rounds, this is far steadier than the ratio of two medians.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import median
from typing import Any


def ttft_ms(run: Mapping[str, float]) -> float:
    """Time to first token of one timed run: vision + prefill."""
    return run.get("vision", 0.0) + run.get("prefill", 0.0)


def paired_speedup(baseline: Sequence[Mapping[str, Any]], arm: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``ttft`` and ``end_to_end``: the median over pairs (same ``sample`` and ``repeat``) of the
    baseline's time over the arm's, with ``ttft_range`` / ``end_to_end_range`` (smallest and largest
    ratio) and the number of ``pairs``; None without a pair."""
    reference = {(r["sample"], r["repeat"]): r for r in baseline}
    pairs = [(reference[(r["sample"], r["repeat"])], r) for r in arm if (r["sample"], r["repeat"]) in reference]
    if not pairs:
        return None
    result: dict[str, Any] = {"pairs": len(pairs)}
    for name, time in (("ttft", ttft_ms), ("end_to_end", lambda r: r["end_to_end"])):
        ratios = [time(b) / time(a) for b, a in pairs if time(a) > 0]
        result[name] = median(ratios) if ratios else None
        result[f"{name}_range"] = [min(ratios), max(ratios)] if ratios else None
    return result
