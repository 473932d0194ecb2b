"""Statistics against the uncompressed baseline on the same samples.

- relative score: the method's primary metric as a percentage of the baseline's, both aggregated by
  the task over the samples that succeeded in both runs;
- paired bootstrap: resample those samples with replacement (seeded), re-aggregate both runs on the
  same resample, and take the percentile interval of the relative score. Samples the task scores
  jointly (``Task.bootstrap_unit``: MME's pairs, MMBench's circular groups) are resampled as units.
  Where the primary metric is proportional to the mean of one per-sample score
  (``Task.per_sample_score``: accuracy, VQA accuracy), every replicate's mean comes from one
  vectorised sum over the same resample indices; otherwise (POPE's F1, MME's acc+, MMBench's
  circular accuracy) the task's ``aggregate`` runs once per replicate;
- agreement: the fraction of those samples where both runs gave the same (normalised) answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Aggregate = Callable[[Sequence[Mapping[str, Any]]], Mapping[str, float]]


def _normalise(text: str | None) -> str:
    return " ".join((text or "").lower().replace(".", " ").split())


def paired(method: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]]
           ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The records of both runs on the samples that succeeded in both, in the same order."""
    ok_base = {r["sample_id"]: r for r in baseline if not r.get("error")}
    pairs = [(r, ok_base[r["sample_id"]]) for r in method if not r.get("error") and r["sample_id"] in ok_base]
    return [m for m, _ in pairs], [b for _, b in pairs]


def relative_score(method_score: float | None, baseline_score: float | None) -> float | None:
    if method_score is None or baseline_score is None or baseline_score == 0:
        return None
    return 100.0 * method_score / baseline_score


def agreement(method: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]]) -> float | None:
    """Fraction of paired samples with the same normalised answer."""
    if not method:
        return None
    same = sum(_normalise(m.get("prediction")) == _normalise(b.get("prediction"))
               for m, b in zip(method, baseline))
    return same / len(method)


def units(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[list[int]]:
    """Indices of ``records`` grouped by the values of their ``meta[key]`` for ``keys`` (first
    appearance order); a record without any of those keys is a group of its own."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        meta = record.get("meta") or {}
        values = tuple(meta.get(key) for key in keys)
        groups[tuple(map(str, values)) if any(v is not None for v in values) else ("", index)].append(index)
    return list(groups.values())


def bootstrap_relative(method: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]],
                       aggregate: Aggregate, metric: str, *, seed: int, resamples: int = 1000,
                       level: float = 0.95, unit: Sequence[str] = (),
                       per_sample_score: str | None = None) -> list[float] | None:
    """Percentile interval of the relative score under a paired bootstrap over samples, or over
    groups of samples with equal ``meta`` values for the keys in ``unit``.

    ``per_sample_score``: the key of ``record["scores"]`` whose mean the metric is proportional to;
    each replicate is then a ratio of sums over the resampled groups (vectorised, same draws);
    None calls ``aggregate`` on every replicate."""
    groups = units(method, unit)
    if len(groups) < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, len(groups), size=(resamples, len(groups)))
    if per_sample_score is not None:
        values = _vectorised_relative(method, baseline, groups, draws, per_sample_score)
    else:
        values = []
        for draw in draws:
            rows = [i for g in draw for i in groups[g]]
            rel = relative_score(aggregate([method[i] for i in rows]).get(metric),
                                 aggregate([baseline[i] for i in rows]).get(metric))
            if rel is not None:
                values.append(rel)
    if len(values) == 0:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _vectorised_relative(method: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]],
                         groups: Sequence[Sequence[int]], draws: np.ndarray, score: str) -> np.ndarray:
    """The relative score of every replicate (row of ``draws``) for a mean-of-scores metric: the
    replicate's mean of ``score`` for the method over the baseline's (replicates where the baseline's
    mean is 0 are left out, as :func:`relative_score` does)."""
    sizes = np.array([len(g) for g in groups])[draws].sum(axis=1)

    def means(records: Sequence[Mapping[str, Any]]) -> np.ndarray:  # in percent, as the tasks give them
        values = np.array([float(r["scores"][score]) for r in records])
        return 100.0 * np.array([values[g].sum() for g in groups])[draws].sum(axis=1) / sizes

    method_means, baseline_means = means(method), means(baseline)
    defined = baseline_means != 0
    return 100.0 * method_means[defined] / baseline_means[defined]


def compare(method: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]],
            aggregate: Aggregate, metric: str, *, seed: int, resamples: int = 1000,
            unit: Sequence[str] = (), per_sample_score: str | None = None) -> dict[str, Any]:
    """Relative score, its paired bootstrap CI (resampling ``unit`` groups, vectorised where
    ``per_sample_score`` names the score the metric averages, see :func:`bootstrap_relative`) and
    agreement on the shared successful samples."""
    m, b = paired(method, baseline)
    if not m:
        return {"relative": None, "relative_ci": None, "agreement": None, "n_paired": 0}
    rel = relative_score(aggregate(m).get(metric), aggregate(b).get(metric))
    return {"relative": rel,
            "relative_ci": bootstrap_relative(m, b, aggregate, metric, seed=seed, resamples=resamples, unit=unit,
                                              per_sample_score=per_sample_score),
            "agreement": agreement(m, b), "n_paired": len(m)}
