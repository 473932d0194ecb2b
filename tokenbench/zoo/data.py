"""Training data for the embedded model: pools of rendered ``shapes`` scenes, dense patch labels and
question batches.

Rendering a scene costs about as much as a training step of the vision tower, so the training code
renders each split once into a :class:`ScenePool` (in worker processes) and then makes many passes
over it; every pass over the language pool asks new questions about the same images.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from tokenbench.tasks import shapes

PATCH = 28
GRID = shapes.IMAGE_SIZE // PATCH
N_VISUAL = GRID * GRID
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PATCH_PIXELS = 24  # pixels an object needs inside a 28×28 patch to label it
# label rows of :func:`patch_labels`; index 0 of each means "nothing there"
LABELS = {"colour": len(shapes.COLOURS) + 1, "shape": len(shapes.SHAPES) + 2,
          "letter": len(shapes.LETTERS) + 1, "centre": 2}
LETTER_SHAPE = len(shapes.SHAPES) + 1  # the "shape" class of the letter's patches


def patch_labels(scene: shapes.Scene) -> torch.Tensor:
    """[4, 144] per-patch targets (colour, shape, letter, centre) of the object covering each patch."""
    mask = shapes.object_mask(scene)
    n_ids = len(scene.objects) + 2
    onehot = np.eye(n_ids, dtype=np.int32)[mask].reshape(GRID, PATCH, GRID, PATCH, n_ids)
    counts = onehot.sum(axis=(1, 3)).reshape(N_VISUAL, n_ids)
    counts[:, 0] = 0
    owner = np.where(counts.max(axis=1) >= MIN_PATCH_PIXELS, counts.argmax(axis=1), 0)
    colour_ids = [list(shapes.COLOURS).index(o.colour) + 1 for o in scene.objects]
    shape_ids = [shapes.SHAPES.index(o.shape) + 1 for o in scene.objects]
    letter_box = scene.letter.box
    centres = [(o.cy // PATCH) * GRID + o.cx // PATCH for o in scene.objects]
    centres.append(((letter_box[1] + letter_box[3]) // 2 // PATCH) * GRID
                   + (letter_box[0] + letter_box[2]) // 2 // PATCH)
    table = np.zeros((4, n_ids), dtype=np.int64)
    table[0, 1:-1], table[1, 1:-1] = colour_ids, shape_ids
    table[1, -1] = LETTER_SHAPE
    table[2, -1] = shapes.LETTERS.index(scene.letter.char) + 1
    labels = table[:, owner]
    labels[3] = 0
    for index, centre in enumerate(centres):
        if owner[min(max(centre, 0), N_VISUAL - 1)] == index + 1:
            labels[3, centre] = 1
    return torch.from_numpy(labels)


def pixel_values(images: torch.Tensor | Sequence) -> torch.Tensor:
    """CLIP normalisation of 336-px RGB images (PIL images or a uint8 [B, H, W, 3] tensor): what the
    processor computes, without its overhead."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()


def _render_range(split: int, start: int, stop: int, max_objects: int | None
                  ) -> tuple[list[shapes.Scene], list[str], np.ndarray, np.ndarray]:
    scenes, families, images, labels = [], [], [], []
    for index in range(start, stop):
        family = shapes.FAMILIES[index % len(shapes.FAMILIES)]
        scene = shapes.make_scene(split, index, family, max_objects)[0]
        scenes.append(scene)
        families.append(family)
        images.append(np.asarray(shapes.render(scene), dtype=np.uint8))
        labels.append(patch_labels(scene).numpy())
    return scenes, families, np.stack(images), np.stack(labels)


@dataclass
class ScenePool:
    """``len(scenes)`` rendered scenes of one split: scene ``i`` was built for ``families[i]``."""

    split: int
    scenes: list[shapes.Scene]
    families: list[str]
    images: torch.Tensor  # [N, 336, 336, 3] uint8
    labels: torch.Tensor  # [N, 4, 144] int64, see patch_labels

    @classmethod
    def render(cls, split: int, count: int, *, start: int = 0, workers: int = 1,
               max_objects: int | None = None) -> ScenePool:
        """Scenes ``start .. start + count`` of ``split``; deterministic whatever ``workers`` is."""
        chunk = 250
        ranges = [(split, lo, min(lo + chunk, start + count), max_objects)
                  for lo in range(start, start + count, chunk)]
        if workers > 1 and len(ranges) > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                parts = list(pool.map(_render_range, *zip(*ranges)))
        else:
            parts = [_render_range(*r) for r in ranges]
        return cls(split, [s for p in parts for s in p[0]], [f for p in parts for f in p[1]],
                   torch.from_numpy(np.concatenate([p[2] for p in parts])),
                   torch.from_numpy(np.concatenate([p[3] for p in parts])))

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        return pixel_values(self.images[index])


# ----------------------------------------------------------------------------------- questions


def vocabulary() -> list[str]:
    """Every word the task's questions and answers use, plus the chat roles."""
    words = ["user", "assistant", ":", "?", "is", "there", "a", "how", "many", "are", "what", "color",
             "the", "shape", "object", "left", "or", "right", "of", "letter", "in", "image", "yes", "no"]
    words += [*shapes.COLOURS, *shapes.SHAPES, *shapes.PLURALS.values(), *shapes.COUNT_WORDS,
              *(c.lower() for c in shapes.LETTERS)]
    return list(dict.fromkeys(words))


# a training-only question: which half of the image a named shape is in. It is the first half of
# the left/right relation (find one object's column) and a stepping stone to it.
TRAINING_FAMILIES = (*shapes.FAMILIES, "position")


def ask_position(scene: shapes.Scene, rng: random.Random) -> tuple[str, str] | None:
    """"is the circle left or right?" about a shape that occurs once and is clearly off the middle."""
    single = set(shapes.unique_values([o.shape for o in scene.objects]))
    middle = shapes.IMAGE_SIZE // 2
    candidates = [o for o in scene.objects if o.shape in single and abs(o.cx - middle) >= PATCH // 2]
    if not candidates:
        return None
    chosen = rng.choice(candidates)
    return f"is the {chosen.shape} left or right?", "left" if chosen.cx < middle else "right"


def questions(scene: shapes.Scene, family: str, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    """Up to ``turns`` (question, answer) pairs about ``scene``: first one of ``family`` (the kind of
    question the scene was built for), then rounds of all training families in random order."""
    asked: list[tuple[str, str]] = []
    order = [family]
    for _ in range(turns + 1):
        for asked_family in order:
            pair = ask_position(scene, rng) if asked_family == "position" else shapes.ask(asked_family, scene, rng)
            if pair is not None:
                asked.append(pair[:2])
            if len(asked) == turns:
                return asked
        order = rng.sample(TRAINING_FAMILIES, len(TRAINING_FAMILIES))
    return asked


def conversation_ids(tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]],
                     n_visual: int) -> tuple[list[int], list[int]]:
    """A multi-turn chat whose first turn is exactly the evaluation prompt, with ``n_visual`` image
    tokens: (ids, labels), labels -100 except the answers and their EOS."""
    ids: list[int] = []
    labels: list[int] = []
    for question, answer in pairs:
        image = "<image>" * n_visual if not ids else ""
        prompt = tokenizer.encode(f"USER: {image} {question} ASSISTANT:", add_special_tokens=False)
        reply = [tokenizer.convert_tokens_to_ids(answer), tokenizer.eos_token_id]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    return ids, labels


def language_batch(tokenizer: PreTrainedTokenizerFast, pool: ScenePool, rows: Sequence[int], *, turns: int,
                   seed: int, background: float = 1.0) -> dict:
    """A right-padded batch of conversations about ``pool`` scenes ``rows``.

    Only the patches an object or the letter covers and a ``background`` fraction of the others
    reach the decoder (``visual_index``: the kept patch indices per row, in raster order). ``seed``
    picks the questions and the background patches, so each pass asks something new.
    """
    generator = torch.Generator().manual_seed(seed)
    items, kept_rows = [], []
    for row in rows:
        rng = random.Random(seed * 1_000_003 + int(row))
        pairs = questions(pool.scenes[row], pool.families[row], rng, turns)
        occupied = pool.labels[row, 1] > 0
        kept = (occupied | (torch.rand(N_VISUAL, generator=generator) < background)).nonzero().flatten()
        items.append(conversation_ids(tokenizer, pairs, len(kept)))
        kept_rows.append(kept)
    length = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), length), tokenizer.pad_token_id)
    labels = torch.full((len(items), length), -100)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    for k, (ids, lab) in enumerate(items):
        input_ids[k, :len(ids)] = torch.tensor(ids)
        labels[k, :len(lab)] = torch.tensor(lab)
        attention[k, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "rows": torch.as_tensor(list(rows)), "visual_index": kept_rows}
