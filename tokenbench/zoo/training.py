"""What both zoo trainers share: the learning-rate schedule, the stopwatch of their stages, the
held-out evaluation and the ``training.json`` record they leave beside the model."""

from __future__ import annotations

import json
import math
import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


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


def write_record(out: Path, program: str, argv: Sequence[str], args: Namespace, **fields: Any) -> dict[str, Any]:
    """Write (and print) ``out/training.json``: the command, its arguments, ``fields``, and, for a run
    that went on from ``args.init_model``, that model's own record as ``started_from``."""
    record = {"command": " ".join([f"python -m {program}", *argv]),
              "arguments": {k: str(v) for k, v in vars(args).items()}, **fields}
    earlier = args.init_model / "training.json" if args.init_model else None
    if earlier is not None and earlier.is_file():
        record["started_from"] = json.loads(earlier.read_text())
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record


@torch.no_grad()
def held_out_accuracy(model: Any, task: Any, tokenizer: Any, inputs_of: Callable[[list], Any], limit: int | None,
                      batch: int) -> dict[str, float]:
    """``task``'s metrics on its first ``limit`` samples through the stock greedy ``generate``;
    ``inputs_of(samples)`` builds one batch's model inputs (the model's own processor)."""
    samples = list(task.samples(limit))
    records = []
    model.eval()
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        inputs = inputs_of(chunk)
        out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False)
        replies = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        records += [{"sample_id": s.id, "prediction": r, "scores": task.score(s, r), "meta": s.meta}
                    for s, r in zip(chunk, replies, strict=True)]
    return task.aggregate(records)
