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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
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


def _render_range(split: int, start: int, stop: int, max_objects: int | None, cycle: Sequence[str]
                  ) -> tuple[list[shapes.Scene], list[str], list, np.ndarray, np.ndarray]:
    scenes, families, focuses, images, labels = [], [], [], [], []
    for index in range(start, stop):
        family = cycle[index % len(cycle)]
        scene, _, focus = shapes.make_scene(split, index, family, max_objects)
        scenes.append(scene)
        families.append(family)
        focuses.append(focus)
        images.append(np.asarray(shapes.render(scene), dtype=np.uint8))
        labels.append(patch_labels(scene).numpy())
    return scenes, families, focuses, np.stack(images), np.stack(labels)


@dataclass
class ScenePool:
    """``len(scenes)`` rendered scenes of one split: scene ``i`` was built for ``families[i]``, and
    ``focuses[i]`` steers that family's question as in the evaluation split (the shape a counting
    scene was built to count; None for the other families)."""

    split: int
    scenes: list[shapes.Scene]
    families: list[str]
    focuses: list
    images: torch.Tensor  # [N, 336, 336, 3] uint8
    labels: torch.Tensor  # [N, 4, 144] int64, see patch_labels

    @classmethod
    def render(cls, split: int, count: int, *, start: int = 0, workers: int = 1,
               max_objects: int | None = None, families: Sequence[str] = shapes.FAMILIES) -> ScenePool:
        """Scenes ``start .. start + count`` of ``split``, scene ``i`` built for ``families[i % len]``
        (a family named twice gets twice the scenes); deterministic whatever ``workers`` is."""
        chunk = 250
        ranges = [(split, lo, min(lo + chunk, start + count), max_objects, tuple(families))
                  for lo in range(start, start + count, chunk)]
        if workers > 1 and len(ranges) > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                parts = list(pool.map(_render_range, *zip(*ranges)))
        else:
            parts = [_render_range(*r) for r in ranges]
        return cls(split, *([item for p in parts for item in p[k]] for k in range(3)),
                   torch.from_numpy(np.concatenate([p[3] for p in parts])),
                   torch.from_numpy(np.concatenate([p[4] for p in parts])))

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        return pixel_values(self.images[index])


# ----------------------------------------------------------------------------------- questions


COLUMN_WORDS = tuple(f"col{k}" for k in range(1, GRID + 1))
TOTAL_WORDS = (*shapes.COUNT_WORDS[1:], "five", "six")


def vocabulary() -> list[str]:
    """Every word the task's questions and answers use, plus the chat roles and the words of the
    training-only questions (appended last, so the task's words keep their ids)."""
    words = ["user", "assistant", ":", "?", "is", "there", "a", "how", "many", "are", "what", "color",
             "the", "shape", "object", "left", "or", "right", "of", "letter", "in", "image", "yes", "no"]
    words += [*shapes.COLOURS, *shapes.SHAPES, *shapes.PLURALS.values(), *shapes.COUNT_WORDS,
              *(c.lower() for c in shapes.LETTERS)]
    words += ["which", "column", "objects", *COLUMN_WORDS, *TOTAL_WORDS]
    return list(dict.fromkeys(words))


# Training-only questions, each a part of an evaluated skill with a richer answer than yes/no:
# - position, "is the circle left or right?": one object's side, the first half of left/right;
# - column, "which column is the circle in?" (col1 .. col12 of the 12×12 grid): the same lookup
#   with 3.6 bits per answer instead of 1, so the decoder gets a gradient towards reading an
#   object's x before it can compare two;
# - objects, "how many objects are there?": counting without the shape filter.
TRAINING_FAMILIES = (*shapes.FAMILIES, "position", "column", "objects")


def _single_shapes(scene: shapes.Scene) -> list[shapes.Shape]:
    single = set(shapes.unique_values([o.shape for o in scene.objects]))
    return [o for o in scene.objects if o.shape in single]


def ask_position(scene: shapes.Scene, rng: random.Random) -> tuple[str, str] | None:
    """"is the circle left or right?" about a shape that occurs once and is clearly off the middle."""
    middle = shapes.IMAGE_SIZE // 2
    candidates = [o for o in _single_shapes(scene) if abs(o.cx - middle) >= PATCH // 2]
    if not candidates:
        return None
    chosen = rng.choice(candidates)
    return f"is the {chosen.shape} left or right?", "left" if chosen.cx < middle else "right"


def ask_column(scene: shapes.Scene, rng: random.Random) -> tuple[str, str] | None:
    """"which column is the circle in?" about a shape that occurs once: the grid column of its centre."""
    candidates = _single_shapes(scene)
    if not candidates:
        return None
    chosen = rng.choice(candidates)
    return f"which column is the {chosen.shape} in?", COLUMN_WORDS[min(chosen.cx // PATCH, GRID - 1)]


def ask_objects(scene: shapes.Scene, rng: random.Random) -> tuple[str, str] | None:
    """"how many objects are there?" (the shapes; the letter is not one)."""
    if not 1 <= len(scene.objects) <= len(TOTAL_WORDS):
        return None
    return "how many objects are there?", TOTAL_WORDS[len(scene.objects) - 1]


_TRAINING_ASKERS = {"position": ask_position, "column": ask_column, "objects": ask_objects}


def ask(family: str, scene: shapes.Scene, rng: random.Random, focus=None) -> tuple[str, str] | None:
    """One (question, answer) of any of the TRAINING_FAMILIES, or None when the scene has none;
    ``focus`` steers a task family's question (see :func:`tokenbench.tasks.shapes.ask`)."""
    if family in _TRAINING_ASKERS:
        return _TRAINING_ASKERS[family](scene, rng)
    asked = shapes.ask(family, scene, rng, focus)
    return None if asked is None else asked[:2]


class Turn(NamedTuple):
    question: str
    answer: str
    family: str


def questions(scene: shapes.Scene, family: str, rng: random.Random, turns: int, focus=None) -> list[Turn]:
    """Up to ``turns`` distinct questions about ``scene``: first one of ``family`` (the kind of
    question the scene was built for) steered by ``focus`` as the evaluation split's question is,
    so the first turns follow the evaluation's answer distribution (a counting scene is asked about
    the shape it holds 1-4 of, not about whichever single distractor); then rounds of all training
    families in random order."""
    asked: list[Turn] = []
    order = [family]
    for round_ in range(turns + 1):
        for asked_family in order:
            pair = ask(asked_family, scene, rng, focus if round_ == 0 else None)
            if pair is not None and pair[0] not in (t.question for t in asked):
                asked.append(Turn(*pair, asked_family))
            if len(asked) == turns:
                return asked
        order = rng.sample(TRAINING_FAMILIES, len(TRAINING_FAMILIES))
    return asked


def conversation_ids(tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str] | Turn],
                     n_visual: int, placeholder: str = "<image>") -> tuple[list[int], list[int], list[int]]:
    """Several questions about one image in one sequence: (ids, labels, turn).

    The sequence is the evaluation prompt's image prefix (``USER: <image>×n_visual``; a video
    model's ``placeholder`` is ``<video>``) followed by
    every ``question ASSISTANT: answer EOS``; ``turn`` is 0 on the prefix and k on the k-th question.
    :func:`turn_mask` lets each question see only the prefix and itself, so every turn is exactly
    the evaluation prompt and no answer can be copied from an earlier one. Labels are -100 except
    the answers and their EOS.
    """
    ids = tokenizer.encode("USER: " + placeholder * n_visual, add_special_tokens=False)
    labels = [-100] * len(ids)
    turn = [0] * len(ids)
    for k, (question, answer, *_) in enumerate(pairs, start=1):
        prompt = tokenizer.encode(f"{question} ASSISTANT:", add_special_tokens=False)
        reply = [tokenizer.convert_tokens_to_ids(answer), tokenizer.eos_token_id]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
        turn += [k] * (len(prompt) + len(reply))
    return ids, labels, turn


def turn_mask(turn: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive 4-D attention mask [B, 1, L, L] and the position ids [B, L] of a batch of
    :func:`conversation_ids` ``turn`` rows (-1 = padding): causal, and a question sees the image
    prefix and its own tokens only; each question's positions continue from the prefix, as in
    the evaluation prompt."""
    length = turn.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = turn[:, :, None], turn[:, None, :]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    segment = turn.clamp(min=0)
    # rank of each token inside its own segment (prefix or question)
    rank = F.one_hot(segment).cumsum(1).gather(2, segment[..., None])[..., 0] - 1
    prefix = (turn == 0).sum(1, keepdim=True)
    positions = torch.where(turn > 0, prefix + rank, rank)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None], positions


def language_batch(tokenizer: PreTrainedTokenizerFast, pool: ScenePool, rows: Sequence[int], *, turns: int,
                   seed: int, background: float = 1.0) -> dict:
    """A right-padded batch of conversations about ``pool`` scenes ``rows``.

    Only the patches an object or the letter covers and a ``background`` fraction of the others
    reach the decoder (``visual_index``: the kept patch indices per row, in raster order). ``seed``
    picks the questions and the background patches, so each pass asks something new. The batch's
    ``attention_mask`` and ``position_ids`` isolate the questions (:func:`turn_mask`); ``families``
    names each row's questions' families in order.
    """
    generator = torch.Generator().manual_seed(seed)
    items, kept_rows, families = [], [], []
    for row in rows:
        rng = random.Random(seed * 1_000_003 + int(row))
        asked = questions(pool.scenes[row], pool.families[row], rng, turns, pool.focuses[row])
        families.append([t.family for t in asked])
        occupied = pool.labels[row, 1] > 0
        kept = (occupied | (torch.rand(N_VISUAL, generator=generator) < background)).nonzero().flatten()
        items.append(conversation_ids(tokenizer, asked, len(kept)))
        kept_rows.append(kept)
    length = max(len(ids) for ids, _, _ in items)
    input_ids = torch.full((len(items), length), tokenizer.pad_token_id)
    labels = torch.full((len(items), length), -100)
    turn = torch.full((len(items), length), -1)
    for k, (ids, lab, seg) in enumerate(items):
        input_ids[k, :len(ids)] = torch.tensor(ids)
        labels[k, :len(lab)] = torch.tensor(lab)
        turn[k, :len(seg)] = torch.tensor(seg)
    mask, positions = turn_mask(turn)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
            "rows": torch.as_tensor(list(rows)), "visual_index": kept_rows, "families": families}
