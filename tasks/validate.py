"""``tokenbench tasks --validate``: can a task's data be read and scored here?

Draws the first samples of the task, decodes their images, scores each with an answer the
scorer must accept (the target, or the annotators' most common answer) and aggregates. Missing
data come back as the task's own one-line ``TaskDataError`` message, which says how to get them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenbench.tasks.base import Task, TaskDataError


def validate_task(task_cls: type[Task], data_dir: str | Path | None = None,
                  samples: int = 2) -> tuple[bool, str]:
    """``(ok, message)`` for one task: ok when ``samples`` samples load, decode and score.

    The message does not repeat the task's name (the caller prints it in front)."""
    name = task_cls.name
    try:
        task = task_cls(data_dir=data_dir)
        drawn = list(itertools.islice(task.samples(limit=samples), samples))
    except TaskDataError as exc:
        return False, str(exc).removeprefix(f"task '{name}': ")
    origin = data_dir or task_cls.source or "the default source"
    if not drawn:
        return False, f"{origin} holds no samples"
    records = []
    for sample in drawn:
        try:
            sample.load_image()
        except Exception as exc:  # noqa: BLE001 -- any failure to decode is the finding we report
            text, own = str(exc), f"task '{name}' "
            return False, text.removeprefix(own) if text.startswith(own) else f"sample {sample.id}: {text}"
        reference = getattr(task, "reference_prediction", lambda s: str(s.target))
        prediction = reference(sample)
        records.append({"sample_id": sample.id, "prediction": prediction,
                        "scores": task.score(sample, prediction), "meta": sample.meta})
    metrics = task.aggregate(records)
    if task.primary_metric not in metrics:
        return False, f"aggregate() lacks the primary metric '{task.primary_metric}'"
    shown = ", ".join(f"{key}={metrics[key]:.1f}" for key in dict.fromkeys([task.primary_metric, "accuracy"])
                      if key in metrics)
    return True, f"{len(drawn)} samples from {origin} scored with reference answers: {shown}"
