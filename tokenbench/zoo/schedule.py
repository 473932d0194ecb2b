"""What both zoo trainers share: the learning-rate schedule and the stopwatch of their stages."""

from __future__ import annotations

import math
import time


def warmup_cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine down to a tenth of it at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Stopwatch:
    """Whole seconds per named stage (``lap`` ends the current one and prints it), for ``training.json``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.time()

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self._start)
        self._start = now
        print(f"[{name}: {self.seconds[name]} s]", flush=True)
