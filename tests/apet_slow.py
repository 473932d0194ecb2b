"""An independent, deliberately plain ApET written from spec §2.12 with Python loops over images and
tokens, in float64. It shares no code with ``tokenbench.methods.apet``: the ridge reconstruction is
an augmented least-squares problem ([Sᵀ; √λ·I] w ≈ [x; 0], solved per token by ``lstsq``) instead
of the normal equations. Tests compare the fast implementation against it.
"""

from __future__ import annotations

import math

import torch


def slow_apet(x: torch.Tensor, keep: int, basis: int, starts: list[int], *, ridge: float = 1e-5,
              merge_scaling: float = 1.0, basis_mode: str = "replace", slot_order: str = "ascending"
              ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor | None]:
    """Return (kept indices per image, values [B, K, D] float64, appended basis [B, k, D] or None)."""
    all_keep, all_values, all_extra = [], [], []
    for b in range(x.shape[0]):
        kept, values, extra = _one_image(x[b].double(), keep, basis, starts[b], ridge, merge_scaling,
                                         basis_mode, slot_order)
        all_keep.append(kept)
        all_values.append(torch.stack(values))
        all_extra.append(torch.stack(extra) if extra else None)
    extra = torch.stack(all_extra) if all_extra[0] is not None else None
    return all_keep, torch.stack(all_values), extra


def _one_image(tokens, keep, basis, start, ridge, scaling, mode, slot_order):
    n = tokens.shape[0]
    rows = [tokens[i] for i in range(n)]
    if keep >= n:
        return list(range(n)), rows, []
    k = min(basis, keep - 1)
    picks = _farthest_points(rows, k, start)
    basis_rows = [rows[p] for p in picks]
    errors = [_residual(row, basis_rows, ridge) for row in rows]
    ranked = sorted(range(n), key=lambda i: -errors[i])  # stable: lower index first on ties

    n_targets = keep - k
    targets = ranked[:n_targets]
    sources = ranked[n_targets:] if mode == "append" else ranked[keep:]
    totals = {t: scaling * rows[t] for t in targets}
    counts = {t: scaling for t in targets}
    for u in sources:
        best, best_cos = None, -math.inf
        for t in targets:
            cos = _cosine(rows[u], rows[t])
            if cos > best_cos:
                best, best_cos = t, cos
        totals[best] = totals[best] + rows[u]
        counts[best] += 1
    out = {t: totals[t] / counts[t] for t in targets}

    extra = []
    if mode == "append":
        extra = basis_rows
    else:
        slots = ranked[n_targets:keep]
        if slot_order == "ascending":
            slots = sorted(slots)
        for j, position in enumerate(slots):
            out[position] = basis_rows[j] if mode == "replace" else 0.5 * basis_rows[j] + 0.5 * rows[position]
    kept = sorted(out)
    return kept, [out[i] for i in kept], extra


def _farthest_points(rows, k, start):
    nearest = [math.inf] * len(rows)
    picks, current = [], start
    for _ in range(k):
        picks.append(current)
        for i, row in enumerate(rows):
            nearest[i] = min(nearest[i], float(((row - rows[current]) ** 2).sum()))
        candidates = [i for i in range(len(rows)) if i not in picks]
        current = max(candidates, key=lambda i: nearest[i]) if candidates else None
    return picks


def _residual(row, basis_rows, ridge):
    if not basis_rows:
        return float(row.norm())
    s = torch.stack(basis_rows)  # k x D
    k = s.shape[0]
    design = torch.cat([s.T, math.sqrt(ridge) * torch.eye(k, dtype=s.dtype)])
    target = torch.cat([row, torch.zeros(k, dtype=s.dtype)]).unsqueeze(1)
    w = torch.linalg.lstsq(design, target).solution[:, 0]
    return float((row - s.T @ w).norm())


def _cosine(a, b, eps=1e-12):
    return float(a @ b) / (max(float(a.norm()), eps) * max(float(b.norm()), eps))
