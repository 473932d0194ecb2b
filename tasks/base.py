"""The task protocol: where samples come from and how predictions are scored.

A task is a class registered through ``register_tasks(register)``. The harness instantiates it
with ``data_dir`` (a local copy of the data, or None for the default source), draws
:class:`Sample` objects, generates an answer per sample, stores ``score(sample, prediction)`` in the
sample's record, and finally calls ``aggregate(records)`` for the task-level metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image


class TaskDataError(Exception):
    """The task's data are missing or malformed; the message names the task and how to get them."""


@dataclass
class Sample:
    """One question about one image.

    ``prompt`` is the user's text (question plus answer-format instruction); the adapter wraps it
    in the model's chat template with the image. ``image`` is a PIL image or a zero-argument
    callable that decodes it lazily (so a broken image fails that sample only). A video sample has
    ``image=None`` and ``video``: its sampled frames, or a callable that decodes them lazily.
    ``target`` is what the scorer compares against; ``meta`` carries what ``aggregate`` needs
    (family, split, pair id).
    """

    id: str
    prompt: str
    image: Image.Image | Callable[[], Image.Image] | None
    target: Any
    meta: dict[str, Any] = field(default_factory=dict)
    video: Sequence[Image.Image] | Callable[[], Sequence[Image.Image]] | None = None

    def load_image(self) -> Image.Image | None:
        image = self.image() if callable(self.image) else self.image
        return image.convert("RGB") if image is not None else None

    def load_video(self) -> list[Image.Image] | None:
        """The video's frames as RGB images (``None`` for an image sample)."""
        frames = self.video() if callable(self.video) else self.video
        return [frame.convert("RGB") for frame in frames] if frames is not None else None


class Task:
    """Base class for tasks. Subclasses set the class attributes and implement the three methods.

    - ``primary_metric``: key of ``aggregate``'s result used for the leaderboard's relative score.
    - ``metric_scale``: the primary metric's full scale (100 for a percentage, 2000 for MME perception).
    - ``max_new_tokens``: the greedy-decoding length the answers need.
    - ``source``: where the data come from (a hub id, or "generated").
    - ``scoring``: ``official`` or ``lenient`` (see the attribute).
    - ``bootstrap_unit``: ``meta`` keys whose values together identify the samples ``aggregate``
      scores jointly (MME's question pair per image, MMBench's circular group); the bootstrap CI
      resamples those units whole. Empty: every sample is its own unit.
    - ``per_sample_score``: the key of :meth:`score`'s result whose mean, in percent
      (``100 * sum / count``), is the primary metric (accuracy, VQA accuracy); the bootstrap then
      resamples those scores vectorised. None (the default, and for F1, MME's acc+, CircularEval):
      the bootstrap calls :meth:`aggregate` on every replicate.
    """

    name: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "accuracy"
    metric_scale: ClassVar[float] = 100.0
    max_new_tokens: ClassVar[int] = 8
    source: ClassVar[str] = ""
    description: ClassVar[str] = ""
    bootstrap_unit: ClassVar[tuple[str, ...]] = ()
    per_sample_score: ClassVar[str | None] = None
    #: ``official`` (each benchmark's own rule) or ``lenient`` (tokenbench's wider answer parsing,
    #: where a task has one); the harness sets it from ``--scoring``.
    scoring: str = "official"

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir else None

    def provenance(self) -> dict[str, Any]:
        """What the run record's provenance says about this task's data and scoring rule."""
        return {"scoring": self.scoring}

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        """Yield evaluation samples in a fixed order (the first ``limit`` of them)."""
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        """Per-sample scores (JSON-serialisable), stored in the sample's record."""
        raise NotImplementedError

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Task metrics from per-sample records; each has ``sample_id``, ``prediction``, ``scores``
        (from :meth:`score`) and ``meta`` (the sample's). Must include ``primary_metric``."""
        raise NotImplementedError
