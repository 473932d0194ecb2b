"""Test plugin: ``tiny-video``, one sample per video file in ``$TINY_VIDEO_DIR`` (sorted by name),
decoded lazily by :func:`tokenbench.video.read_video`, so an unreadable file fails its sample only."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from tokenbench.tasks.base import Sample

import tokenbench
from tokenbench import Task
from tokenbench.video import read_video


class TinyVideoTask(Task):
    name = "tiny-video"
    primary_metric = "answered"
    max_new_tokens = 2
    source = "generated"
    description = "harness test task for video samples"

    def samples(self, limit=None):
        files = sorted(Path(os.environ["TINY_VIDEO_DIR"]).iterdir())
        items = [Sample(path.stem, "what color is the square ?", None, "red", {"family": "all"},
                        video=functools.partial(read_video, path, 4)) for path in files]
        return iter(items[:limit] if limit else items)

    def score(self, sample, prediction):
        return {"answered": 1.0}

    def aggregate(self, records):
        return {"answered": 100.0 * sum(r["scores"]["answered"] for r in records) / max(len(records), 1)}


@tokenbench.hookimpl
def register_tasks(register):
    register(TinyVideoTask)
