"""Test plugin for the harness tests: a tiny task with faulty samples and a method that fails.

``tiny`` yields small generated images; sample ``broken`` has an image that fails to decode,
``long`` has a prompt longer than the tiny model's 2048-token context, and ``boom`` makes the
``flaky`` method raise. ``TINY_SCORE_LOG`` (a file) records every scored sample, so tests can see
what was (re)computed; ``TINY_SCORE_SLEEP`` slows scoring so a run can be killed mid-way;
``TINY_DECODE_LOG`` (a file) records every image decode.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from PIL import Image
from tokenbench.tasks.base import Sample

import tokenbench
from tokenbench import Infeasible, Reduction, Site, Stage, Task, TokenCompressor

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (40, 60, 220)}


def _broken_image() -> Image.Image:
    raise OSError("cannot identify image file 'broken.png'")


def _logged_decode(sample_id: str, image: Image.Image, log: str):
    """A lazily decoded image that writes ``sample_id`` to ``log`` on every decode."""
    def decode() -> Image.Image:
        with open(log, "a") as handle:
            handle.write(sample_id + "\n")
        return image.copy()
    return decode


class TinyTask(Task):
    name = "tiny"
    primary_metric = "answered"
    max_new_tokens = 2
    source = "generated"
    description = "harness test task"

    def samples(self, limit=None):
        count = int(os.environ.get("TINY_SAMPLES", "6"))
        items = []
        for index in range(count):
            colour = list(COLOURS)[index % 3]
            image = Image.new("RGB", (64, 64), COLOURS[colour])
            if os.environ.get("TINY_DECODE_LOG"):
                image = _logged_decode(f"s{index}", image, os.environ["TINY_DECODE_LOG"])
            items.append(Sample(f"s{index}", "what color is the square ?", image, colour, {"family": colour}))
        if os.environ.get("TINY_FAULTS"):
            items.append(Sample("broken", "what color ?", _broken_image, "red", {"family": "red"}))
            items.append(Sample("long", " ".join(["red"] * 2100), Image.new("RGB", (64, 64)), "red",
                                {"family": "red"}))
            items.append(Sample("boom", "what color is the square ? " + "blue " * 30,
                                Image.new("RGB", (64, 64), COLOURS["blue"]), "blue", {"family": "blue"}))
        return iter(items[:limit] if limit else items)

    def score(self, sample, prediction):
        if os.environ.get("TINY_SCORE_LOG"):
            with open(os.environ["TINY_SCORE_LOG"], "a") as log:
                log.write(sample.id + "\n")
        time.sleep(float(os.environ.get("TINY_SCORE_SLEEP", "0")))
        return {"answered": float(len(prediction) % 2 == 0), "exact": float(prediction == sample.target)}

    def aggregate(self, records):
        return {"answered": 100.0 * sum(r["scores"]["answered"] for r in records) / max(len(records), 1),
                "exact": 100.0 * sum(r["scores"]["exact"] for r in records) / max(len(records), 1)}


class Flaky(TokenCompressor):
    """Keeps the first ``budget`` tokens; raises on prompts with many text tokens (sample ``boom``);
    infeasible below 10 tokens."""

    name = "flaky"
    stages = (Stage.VISION_OUT,)
    needs = frozenset({"text"})

    def schedule(self, n_visual, budget, info):
        if budget < 10:
            raise Infeasible(f"flaky needs at least 10 tokens, asked {budget:g}")
        return [(Site(Stage.VISION_OUT), round(budget))]

    def reduce(self, x):
        if 20 < x.text.shape[1] < 200:
            raise RuntimeError("flaky exploded on a long prompt")
        b = x.visual.shape[0]
        return Reduction(torch.arange(x.keep).expand(b, x.keep).clone())


class OutOfMemoryAtFirst(TokenCompressor):
    """Keeps the first ``budget`` tokens; its first ``TINY_OOM_CALLS`` calls (counted in the file
    ``TINY_OOM_COUNTER``, across runs) raise the error CUDA raises when memory runs out."""

    name = "oomy"
    stages = (Stage.VISION_OUT,)

    def schedule(self, n_visual, budget, info):
        return [(Site(Stage.VISION_OUT), round(budget))]

    def reduce(self, x):
        counter = os.environ.get("TINY_OOM_COUNTER")
        if counter:
            calls = int(Path(counter).read_text() or 0) if os.path.exists(counter) else 0
            Path(counter).write_text(str(calls + 1))
            if calls < int(os.environ.get("TINY_OOM_CALLS", "0")):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        b = x.visual.shape[0]
        return Reduction(torch.arange(x.keep).expand(b, x.keep).clone())


class _FirstTokens(TokenCompressor):
    stages = (Stage.VISION_OUT,)

    def schedule(self, n_visual, budget, info):
        return [(Site(Stage.VISION_OUT), round(budget))]

    def reduce(self, x):
        b = x.visual.shape[0]
        return Reduction(torch.arange(x.keep).expand(b, x.keep).clone())


class Greedy(_FirstTokens):
    """Keeps twice its budget: over budget on every sample."""

    name = "greedy"

    def schedule(self, n_visual, budget, info):
        return [(Site(Stage.VISION_OUT), min(n_visual, round(2 * budget)))]


class Doomed(_FirstTokens):
    """Fails on every sample."""

    name = "doomed"

    def reduce(self, x):
        raise ValueError("doomed never keeps anything")  # DOOMED-LINE


class Sneaky(_FirstTokens):
    """Reads the text signal without declaring it in ``needs``."""

    name = "sneaky"

    def reduce(self, x):
        if x.text is not None:  # SNEAKY-LINE
            raise AssertionError("unreachable: text was not requested")
        return super().reduce(x)


class Deep(_FirstTokens):
    """Schedules a site after the 40th decoder layer (the tiny models have 4)."""

    name = "deep"
    stages = (Stage.LLM,)

    def schedule(self, n_visual, budget, info):
        return [(Site(Stage.LLM, 40), round(budget))]


@tokenbench.hookimpl
def register_tasks(register):
    register(TinyTask)


@tokenbench.hookimpl
def register_compressors(register):
    register(Flaky)
    register(OutOfMemoryAtFirst)
    for cls in (Greedy, Doomed, Sneaky, Deep):
        register(cls)
