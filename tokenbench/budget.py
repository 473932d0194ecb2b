"""Budgets: the layer-averaged number of visual tokens the LLM decoder processes.

A budget is written either as a token count (``64``) or as a retention ratio (``11.1%``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_COUNT = re.compile(r"^\s*(\d+)\s*$")


class BudgetError(ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    """``tokens`` for a count, ``ratio`` in (0, 1] for a percentage; exactly one is set."""

    tokens: int | None = None
    ratio: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        if m := _COUNT.match(text):
            value = int(m.group(1))
            if value <= 0:
                raise BudgetError(f"budget {text!r} must be a positive token count, e.g. 64")
            return cls(tokens=value)
        if m := _PERCENT.match(text):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise BudgetError(f"budget {text!r} must be a percentage in (0, 100], e.g. 11.1%")
            return cls(ratio=pct / 100)
        raise BudgetError(
            f"budget {text!r} is neither a positive integer (64) nor a percentage in (0, 100] (11.1%)")

    def target(self, n_visual: int) -> float:
        """The layer-averaged visual-token target for an image with ``n_visual`` tokens."""
        if self.tokens is not None:
            return float(min(self.tokens, n_visual))
        assert self.ratio is not None
        return self.ratio * n_visual

    @property
    def label(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        return f"{self.ratio * 100:g}%"

    def __str__(self) -> str:
        return self.label


def parse_budgets(text: str) -> list[Budget]:
    """Parse ``"192,128,64"`` or ``"33.3%,22.2%,11.1%"`` (mixed is allowed)."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise BudgetError("no budgets given; write e.g. --budgets 192,128,64 or 33.3%,22.2%,11.1%")
    budgets = [Budget.parse(p) for p in parts]
    seen: set[str] = set()
    for b in budgets:  # the label keys results, so two budgets must not share one
        if b.label in seen:
            raise BudgetError(f"budget {b.label} is given twice")
        seen.add(b.label)
    return budgets
