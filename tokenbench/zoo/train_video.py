"""Train the embedded ``tiny-video-llava-shapes``: ``python -m tokenbench.zoo.train_video [--out DIR]``.

A stock ``VideoLlavaForConditionalGeneration`` (8 frames × 65 tokens: 224-px frames, 28-px patches,
Video-LLaVA's video features keep the CLS token) started from the trained ``tiny-llava-shapes``:

- its CLIP tower becomes both the video and the image tower, with the position embeddings resized
  from the 12×12 grid of 336-px images to the 8×8 grid of 224-px frames (bicubic; the objects keep
  their pixel size, so the tower's per-patch features still describe them);
- its projector and Llama decoder carry over, the word embeddings and the head row by row for the
  words the two vocabularies share (the video questions add words, and the ``<video>`` token).

Then the tower is frozen and its per-frame features are computed once per training clip; the
projector and decoder learn the ``shapes-video`` questions. Each clip carries all the questions
it has an answer to in one sequence, each seeing only the video and itself with the evaluation
prompt's positions (:func:`tokenbench.zoo.data.turn_mask`), so the 520 visual tokens are paid once
for several answers. Training-only questions (:data:`AUXILIARY_FAMILIES`: an object's column and row
in its first and last frame, whether it moves) lead up to ``direction`` and ``moving``. Loss on the
answers only. Snapshots (model + processor) are saved every ``--every`` steps, so an interrupted run
still leaves a model.

The shipped model took two runs (its ``training.json`` chains them): 1600 steps from the image model
without the training-only questions (80.8% held out; direction 41%, moving 68%), then 1500 steps on
3000 new clips with them and the motion families weighted up (``--init-model``, ``--families
direction,moving,direction,moving,appear,disappear,half,counting``): 90.0% held out, 23 minutes on
2 CPU cores.

Data splits: training 2, validation 3; the evaluation split 0 is never trained on.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import (
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaImageProcessor,
)

from tokenbench.tasks import shapes_video
from tokenbench.tiny_models import word_level_tokenizer
from tokenbench.zoo.data import COLUMN_WORDS, conversation_ids, pixel_values, turn_mask, vocabulary
from tokenbench.zoo.training import Stopwatch, held_out_accuracy, warmup_cosine_lr, write_record

PATCH = 28
GRID = shapes_video.FRAME_SIZE // PATCH
TOKENS_PER_FRAME = GRID * GRID + 1  # Video-LLaVA keeps each frame's CLS token
N_VISUAL = shapes_video.FRAMES * TOKENS_PER_FRAME
TRAIN_SPLIT, VALIDATION_SPLIT = 2, 3
ROW_WORDS = tuple(f"row{k}" for k in range(1, GRID + 1))
VIDEO_WORDS = ("way", "does", "move", "moves", "appears", "disappears", "half", "visible", "first", "last",
               "up", "down", "different", "shapes", "video", "row", *ROW_WORDS)  # new words go last: ids stay
# Training-only questions, each a step towards an evaluated skill with a richer answer than the
# evaluation's (as ``tokenbench.zoo.train`` does for images):
# - start-column / start-row / end-column / end-row, "which column is the red circle in first?"
#   (col1 .. col8, row1 .. row8 of the frame's 8×8 grid, in the first or last frame the object is
#   shown): reading one object's place in one frame, the two halves of ``direction``;
# - moves, "does the red circle move?" (yes / no): ``moving`` for one named object.
AUXILIARY_FAMILIES = ("start-column", "start-row", "end-column", "end-row", "moves")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% endif %}"
    "{% if item['type'] == 'video' %}<video> {% endif %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


class VideoProcessing(NamedTuple):
    """The checkpoint's processor parts. ``VideoLlavaProcessor`` itself needs torchvision (its video
    processor does), which tokenbench does not install, so the checkpoint ships what it is made of:
    the tokenizer with the chat template, the image processor (applied frame by frame) and
    ``processor_config.json`` with the placeholder geometry."""

    tokenizer: PreTrainedTokenizerFast
    image_processor: VideoLlavaImageProcessor

    def save_pretrained(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        (Path(directory) / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")

    def inputs(self, videos: Sequence[Sequence], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of (frames, question), as ``VideoLlavaProcessor`` builds them."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": p}]}], add_generation_prompt=True, tokenize=False)
            .replace("<video>", "<video>" * N_VISUAL) for p in prompts]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        frames = [frame for video in videos for frame in video]
        processed = self.image_processor(frames, return_tensors="pt")
        pixels = processed.get("pixel_values", processed.get("pixel_values_images"))
        return {**encoded, "pixel_values_videos": pixels.reshape(len(videos), -1, *pixels.shape[1:])}


PROCESSOR_CONFIG = {"processor_class": "VideoLlavaProcessor", "patch_size": PATCH, "num_additional_image_tokens": 1,
                    "vision_feature_select_strategy": "default", "image_token": "<image>", "video_token": "<video>",
                    "num_frames": shapes_video.FRAMES}


def build_processor() -> VideoProcessing:
    """Video-LLaVA's preprocessing at 224 px with 28-px patches; ``<video>`` → 8 × 65 placeholders."""
    tokenizer = word_level_tokenizer([*vocabulary(), *VIDEO_WORDS], special_tokens=["<image>", "<video>"],
                                     chat_template=CHAT_TEMPLATE,
                                     extra_attributes={"image_token": "<image>", "video_token": "<video>"})
    return VideoProcessing(tokenizer, VideoLlavaImageProcessor())


def _resized_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """CLIP position embeddings [1 + g², d] resized to [1 + grid², d] (bicubic over the patch grid)."""
    cls, patches = table[:1], table[1:]
    old = int(patches.shape[0] ** 0.5)
    square = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def _remap_rows(old: torch.Tensor, old_vocab: dict[str, int], new_vocab: dict[str, int],
                fresh: torch.Tensor) -> torch.Tensor:
    """Rows of ``fresh`` [new vocab, d] with the old rows copied for the tokens both vocabularies have."""
    rows = fresh.clone()
    for token, index in new_vocab.items():
        if token in old_vocab:
            rows[index] = old[old_vocab[token]]
    return rows


def build_from_image_model(image_dir: Path, tokenizer: PreTrainedTokenizerFast,
                           seed: int = 0) -> VideoLlavaForConditionalGeneration:
    """A Video-LLaVA whose towers, projector and decoder are those of the LLaVA in ``image_dir``."""
    torch.manual_seed(seed)
    source = LlavaForConditionalGeneration.from_pretrained(image_dir)
    old_vocab = PreTrainedTokenizerFast.from_pretrained(image_dir).get_vocab()
    vision = source.config.vision_config.to_dict()
    vision.update(image_size=shapes_video.FRAME_SIZE)
    text = source.config.text_config.to_dict()
    text.update(vocab_size=len(tokenizer), max_position_embeddings=1024)
    config = VideoLlavaConfig(vision_config=vision, text_config=text,
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                              video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                              projector_hidden_act="gelu", vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=GRID * GRID,
                              video_seq_length=N_VISUAL, pad_token_id=tokenizer.pad_token_id)
    config.vision_config.model_type = "clip_vision_model"
    model = VideoLlavaForConditionalGeneration(config)
    tower = dict(source.model.vision_tower.state_dict())
    key = next(k for k in tower if k.endswith("position_embedding.weight"))
    tower[key] = _resized_positions(tower[key], GRID)
    tower = {k: v for k, v in tower.items() if not k.endswith("position_ids")}
    for target in (model.model.video_tower, model.model.image_tower):
        missing, unexpected = target.load_state_dict(tower, strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    model.model.multi_modal_projector.load_state_dict(source.model.multi_modal_projector.state_dict())
    decoder = dict(source.model.language_model.state_dict())
    new_vocab = tokenizer.get_vocab()
    embed = "embed_tokens.weight"
    decoder[embed] = _remap_rows(decoder[embed], old_vocab, new_vocab,
                                 model.model.language_model.embed_tokens.weight.detach())
    model.model.language_model.load_state_dict(decoder)
    with torch.no_grad():
        model.lm_head.weight.copy_(_remap_rows(source.lm_head.weight.detach(), old_vocab, new_vocab,
                                               model.lm_head.weight.detach()))
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


# ----------------------------------------------------------------------------------- data


def ask_auxiliary(family: str, clip: shapes_video.Clip, rng: random.Random) -> tuple[str, str] | None:
    """One training-only question (see :data:`AUXILIARY_FAMILIES`) about an object the clip names
    unambiguously by colour and shape, or None when it has none; ``moves`` asks about the moving
    object half of the time when there is one."""
    names = [(t.shape, t.colour) for t in clip.tracks]
    named = [t for t in clip.tracks if t.visible and names.count((t.shape, t.colour)) == 1]
    if not named:
        return None
    movers = [t for t in named if t.moves]
    track = rng.choice(movers if family == "moves" and movers and rng.random() < 0.5 else named)
    name = f"{track.colour} {track.shape}"
    if family == "moves":
        return f"does the {name} move?", "yes" if track.moves else "no"
    end = "first" if family.startswith("start") else "last"
    x, y = track.path[track.visible[0] if end == "first" else track.visible[-1]]
    if family.endswith("column"):
        return f"which column is the {name} in {end}?", COLUMN_WORDS[min(x // PATCH, GRID - 1)]
    return f"which row is the {name} in {end}?", ROW_WORDS[min(y // PATCH, GRID - 1)]


def clip_questions(clip: shapes_video.Clip, family: str, rng: random.Random,
                   auxiliary: bool = False) -> list[tuple[str, str, str]]:
    """Every question family the clip answers, the family it was built for first, then (with
    ``auxiliary``) one question of each training-only family: (q, a, family)."""
    order = [family, *rng.sample([f for f in shapes_video.FAMILIES if f != family], len(shapes_video.FAMILIES) - 1)]
    asked = []
    for each in order:
        pair = shapes_video.ask(each, clip, rng)
        if pair is not None:
            asked.append((*pair, each))
    for each in AUXILIARY_FAMILIES if auxiliary else ():
        pair = ask_auxiliary(each, clip, rng)
        if pair is not None:
            asked.append((*pair, each))
    return asked


@torch.no_grad()
def encode_clips(model: VideoLlavaForConditionalGeneration, split: int, count: int, start: int = 0,
                 batch: int = 8, cycle: Sequence[str] = shapes_video.FAMILIES
                 ) -> tuple[torch.Tensor, list[shapes_video.Clip], list[str]]:
    """Frozen video-tower features [count, frames × 65, width] (fp16) of ``count`` clips of ``split``,
    built for the families of ``cycle`` in turn."""
    tower = model.model.video_tower
    features, clips, families = [], [], []
    for first in range(start, start + count, batch):
        frames = []
        for index in range(first, min(first + batch, start + count)):
            family = cycle[index % len(cycle)]
            clip, _ = shapes_video.make_clip(split, index, family)
            clips.append(clip)
            families.append(family)
            frames += shapes_video.render(clip)
        out = tower(pixel_values(frames), output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        features.append(out.reshape(-1, N_VISUAL, out.shape[-1]).half())
    return torch.cat(features), clips, families


def occupied_tokens(clip: shapes_video.Clip) -> torch.Tensor:
    """[frames × 65] bool: the frame's CLS token and the patches an object's box covers."""
    occupied = torch.zeros(shapes_video.FRAMES, TOKENS_PER_FRAME, dtype=torch.bool)
    occupied[:, 0] = True
    for track in clip.tracks:
        for t in track.visible:
            x0, y0, x1, y1 = track.at(t).box
            rows = torch.arange(max(0, y0 // PATCH), min(GRID, (y1 - 1) // PATCH + 1))
            cols = torch.arange(max(0, x0 // PATCH), min(GRID, (x1 - 1) // PATCH + 1))
            occupied[t, 1 + (rows[:, None] * GRID + cols[None, :]).flatten()] = True
    return occupied.flatten()


def make_batch(tokenizer: PreTrainedTokenizerFast, clips: Sequence[shapes_video.Clip], families: Sequence[str],
               rows: Sequence[int], seed: int, first_only: bool = False, background: float = 1.0,
               auxiliary: bool = False) -> dict:
    """A right-padded batch of conversations about clips ``rows``. Only the occupied tokens and a
    ``background`` fraction of the others reach the decoder (``visual_index``), each at its own
    position in the full video (so the positions are the evaluation prompt's). ``auxiliary`` adds
    the training-only questions."""
    generator = torch.Generator().manual_seed(seed)
    items, asked_families, kept_rows = [], [], []
    for row in rows:
        turns = clip_questions(clips[row], families[row], random.Random(seed * 1_000_003 + row), auxiliary)
        turns = turns[:1] if first_only else turns
        asked_families.append([t[2] for t in turns])
        kept = occupied_tokens(clips[row]) | (torch.rand(N_VISUAL, generator=generator) < background)
        kept_rows.append(kept.nonzero().flatten())
        items.append(conversation_ids(tokenizer, turns, len(kept_rows[-1]), placeholder="<video>"))
    length = max(len(ids) for ids, _, _ in items)
    input_ids = torch.full((len(items), length), tokenizer.pad_token_id)
    labels = torch.full((len(items), length), -100)
    turn = torch.full((len(items), length), -1)
    for k, (ids, lab, seg) in enumerate(items):
        input_ids[k, :len(ids)], labels[k, :len(lab)], turn[k, :len(seg)] = map(torch.tensor, (ids, lab, seg))
    mask, positions = turn_mask(turn)
    # the prefix "USER :" takes positions 0 and 1; visual token j sits at 2 + j in the full video
    for k, kept in enumerate(kept_rows):
        prefix = 2 + len(kept)
        positions[k, 2:prefix] = 2 + kept
        positions[k, prefix:] += N_VISUAL - len(kept)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": positions,
            "rows": list(rows), "families": asked_families, "visual_index": kept_rows}


def batch_logits(model: VideoLlavaForConditionalGeneration, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """Decoder logits with the cached tower features of the batch's clips projected into the slots."""
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    kept = torch.cat([features[row, index] for row, index in zip(batch["rows"], batch["visual_index"])])
    visual = model.model.multi_modal_projector(kept.float())
    slots = (input_ids == model.config.video_token_id)[..., None]
    embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"]).logits


@torch.no_grad()
def validate(model, tokenizer, features, clips, families, batch: int = 16) -> dict[str, float]:
    """Teacher-forced accuracy of each validation clip's own-family answer word, per family."""
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(clips), batch):
        data = make_batch(tokenizer, clips, families, range(start, min(start + batch, len(clips))), seed=0,
                          first_only=True)
        logits = batch_logits(model, features, data)[:, :-1]
        targets = data["labels"][:, 1:]
        answers = (targets >= 0) & (targets != tokenizer.eos_token_id)
        right = (logits[answers].argmax(-1) == targets[answers]).tolist()
        for hit, fams in zip(right, data["families"], strict=True):
            hits.setdefault(fams[0], []).append(hit)
    result = {f: sum(h) / len(h) for f, h in hits.items()}
    result["all"] = sum(result.values()) / len(result)
    return result


@torch.no_grad()
def evaluate(model: VideoLlavaForConditionalGeneration, processor: VideoProcessing, limit: int | None = None,
             batch: int = 8) -> dict[str, float]:
    """Held-out accuracy through the processor and the stock ``generate`` on the task's samples."""
    return held_out_accuracy(model, shapes_video.ShapesVideoTask(), processor.tokenizer,
                             lambda chunk: processor.inputs([s.load_video() for s in chunk], [s.prompt for s in chunk]),
                             limit, batch)


def main(argv: Sequence[str] | None = None) -> None:
    from tokenbench.zoo import EMBEDDED

    parser = argparse.ArgumentParser(prog="python -m tokenbench.zoo.train_video", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED["tiny-video-llava-shapes"])
    parser.add_argument("--image-model", type=Path, default=EMBEDDED["tiny-llava-shapes"])
    parser.add_argument("--init-model", type=Path,
                        help="go on training a saved video checkpoint instead of starting from --image-model")
    parser.add_argument("--clip-start", type=int, default=0,
                        help="first clip index of the training split (to go on with clips not trained on yet)")
    parser.add_argument("--families", default=",".join(shapes_video.FAMILIES),
                        help="the families training clips are built for, in turn (repeat one to weigh it up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=3000)
    parser.add_argument("--validation-clips", type=int, default=96)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--background", type=float, default=0.15,
                        help="share of the unoccupied visual tokens the decoder sees (the rest are dropped)")
    parser.add_argument("--full-from", type=float, default=0.8,
                        help="fraction of the steps after which the decoder sees every visual token")
    parser.add_argument("--auxiliary", action=argparse.BooleanOptionalAction, default=True,
                        help="add the training-only questions (object column, row and motion) to every clip")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=600)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stopwatch = Stopwatch()
    lap = stopwatch.lap

    processor = build_processor()
    tokenizer = processor.tokenizer
    if args.init_model and not (args.init_model / "config.json").is_file():
        parser.error(f"--init-model {args.init_model}: no saved model there (config.json is missing)")
    if args.init_model:
        model = VideoLlavaForConditionalGeneration.from_pretrained(args.init_model)
        torch.manual_seed(args.seed)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):  # words added since it was saved
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = build_from_image_model(args.image_model, tokenizer, args.seed)
    model.eval()
    cycle = args.families.split(",")
    if unknown := sorted(set(cycle) - set(shapes_video.FAMILIES)):
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(shapes_video.FAMILIES)}")
    features, clips, families = encode_clips(model, TRAIN_SPLIT, args.clips, start=args.clip_start, cycle=cycle)
    held_features, held_clips, held_families = encode_clips(model, VALIDATION_SPLIT, args.validation_clips)
    lap("render + encode")

    validations: dict[int, dict[str, float]] = {}

    def snapshot(step: int) -> None:
        model.eval()
        validations[step] = scores = validate(model, tokenizer, held_features, held_clips, held_families)
        print(f"validation at step {step}: " + json.dumps({k: round(v, 3) for k, v in scores.items()}), flush=True)
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        model.train()

    model.model.video_tower.requires_grad_(False)
    model.model.image_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed)
    snapshot(0)
    started = time.time()
    for step in range(args.steps):
        rows = torch.randint(len(clips), (args.batch,), generator=generator).tolist()
        background = args.background if step < args.full_from * args.steps else 1.0
        data = make_batch(tokenizer, clips, families, rows, seed=args.seed * 100_003 + step, background=background,
                          auxiliary=args.auxiliary)
        for group in optimiser.param_groups:
            group["lr"] = warmup_cosine_lr(step, args.steps, args.lr, warmup=50)
        logits = batch_logits(model, features, data)[:, :-1]
        targets = data["labels"][:, 1:]
        supervised = targets >= 0
        loss = F.cross_entropy(logits[supervised], targets[supervised])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step % 20 == 0:
            words = targets[supervised] != tokenizer.eos_token_id
            accuracy = (logits[supervised].argmax(-1) == targets[supervised])[words].float().mean().item()
            print(f"step {step}/{args.steps} loss {loss.item():.3f} answer acc {accuracy:.2f} "
                  f"| {(step + 1) / (time.time() - started):.2f} steps/s", flush=True)
        if (step + 1) % args.every == 0:
            snapshot(step + 1)
    lap("training")
    if args.steps not in validations:
        snapshot(args.steps)
    metrics = evaluate(model, processor, args.eval_limit)
    lap("evaluation")
    write_record(args.out, "tokenbench.zoo.train_video", sys.argv[1:] if argv is None else argv, args,
                 seconds=stopwatch.seconds, validation=validations[args.steps],
                 **{f"held_out_accuracy_{args.eval_limit}": metrics})


if __name__ == "__main__":
    main()
