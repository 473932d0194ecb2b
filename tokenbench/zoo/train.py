"""Train the embedded ``tiny-llava-shapes`` model: ``python -m tokenbench.zoo.train [--out DIR]``.

Training a LLaVA from scratch end to end on a CPU stays at chance level (the decoder has nothing to
look at until the vision tower sees something), so this follows LLaVA's own recipe in miniature:

1. **vision**: the CLIP tower learns with dense per-patch labels (colour, shape, letter, object
   centre of whatever covers each patch), read from the layer LLaVA feeds the projector
   (``vision_feature_layer=-2``, CLS dropped). Linear heads, thrown away afterwards.
2. **probe**: fresh linear heads on the frozen tower initialise the projector's first rows, so the
   visual tokens carry plain class scores from the first language step.
3. **language**: the tower is frozen; projector + Llama decoder learn the shapes questions. Each image
   carries several questions as a multi-turn conversation (the first turn is exactly the evaluation
   prompt), so the 144 image tokens are paid once for many supervised answers; loss on answers only.
   Two curricula get the decoder past the answer-prior plateau: few large objects first, and only
   the object patches plus a growing share of background patches during the first half.

Deterministic from ``--seed`` (torch) and fixed data splits (vision: split 1, language: split 2,
validation: split 3; the evaluation split 0 is never trained on). Geometry: 336-px images with 28-px
patches give a 12×12 grid of 144 visual tokens (LLaVA-1.5's 576 is too slow to train on a CPU), so
the default budgets are the LLaVA-1.5 retention ratios 33.3/22.2/11.1%. On 2 shared CPU cores the
defaults take about 45 minutes (vision ~17, language ~25).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tokenbench.tasks import shapes
from tokenbench.tiny_models import simple_chat_template, word_level_tokenizer

PATCH = 28
GRID = shapes.IMAGE_SIZE // PATCH
N_VISUAL = GRID * GRID
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_SPLIT, LANGUAGE_SPLIT, VALIDATION_SPLIT = 1, 2, 3
# heads of the dense vision objective: classes per patch (index 0 = nothing there)
DENSE_HEADS = {"colour": len(shapes.COLOURS) + 1, "shape": len(shapes.SHAPES) + 2,
               "letter": len(shapes.LETTERS) + 1, "centre": 2}
CURRICULUM = ((0.15, 1), (0.35, 2))  # (fraction of language steps, max objects per scene)
# background patches reaching the decoder grow from 5% to all over this fraction of language steps:
# with few distractors the decoder learns quickly where to look, then learns to ignore the rest
BACKGROUND_RAMP = 0.5
MIN_PATCH_PIXELS = 24  # pixels an object needs inside a 28×28 patch to label it


def vocabulary() -> list[str]:
    """Every word the task's questions and answers use, plus the chat roles."""
    words = ["user", "assistant", ":", "?", "is", "there", "a", "how", "many", "are", "what", "color",
             "the", "shape", "object", "left", "or", "right", "of", "letter", "in", "image", "yes", "no"]
    words += [*shapes.COLOURS, *shapes.SHAPES, *shapes.PLURALS.values(), *shapes.COUNT_WORDS,
              *(c.lower() for c in shapes.LETTERS)]
    return list(dict.fromkeys(words))


def build_processor() -> LlavaProcessor:
    """LLaVA-1.5's processor at this geometry: CLIP preprocessing at 336 px, ``<image>`` → 144 tokens."""
    template = simple_chat_template()
    tokenizer = word_level_tokenizer(vocabulary(), special_tokens=("<unk>", "<pad>", "<s>", "</s>", "<image>"),
                                     chat_template=template, extra_attributes={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": shapes.IMAGE_SIZE}, crop_size={"height": shapes.IMAGE_SIZE,
                                                              "width": shapes.IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """Stock LLaVA: tiny CLIP tower (4 blocks), 2-layer GELU projector, 12-layer Llama decoder."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=4,
                              num_attention_heads=4, image_size=shapes.IMAGE_SIZE, patch_size=PATCH,
                              projection_dim=96)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                       num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=N_VISUAL,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def pixel_values(images: Sequence) -> torch.Tensor:
    """CLIP normalisation of 336-px RGB images: what the processor computes, without its overhead."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    array = (array - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


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
    table[1, -1] = len(shapes.SHAPES) + 1
    table[2, -1] = shapes.LETTERS.index(scene.letter.char) + 1
    labels = table[:, owner]
    labels[3] = 0
    for index, centre in enumerate(centres):
        if owner[min(max(centre, 0), N_VISUAL - 1)] == index + 1:
            labels[3, centre] = 1
    return torch.from_numpy(labels)


def vision_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The patch features LLaVA hands the projector: penultimate CLIP layer, CLS dropped."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _scheduled_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _scenes(split: int, start: int, count: int) -> list[shapes.Scene]:
    return [shapes.make_scene(split, i, shapes.FAMILIES[i % len(shapes.FAMILIES)])[0]
            for i in range(start, start + count)]


def pretrain_vision(model: LlavaForConditionalGeneration, steps: int, batch: int = 32, lr: float = 2e-3,
                    log: Callable[[str], None] = print) -> dict[str, float]:
    """Stage 1: dense per-patch classification on the features LLaVA uses; returns head accuracies."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in DENSE_HEADS.items()})
    params = [*tower.parameters(), *heads.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tower.train()
    started, accuracy = time.time(), {}
    for step in range(steps):
        scenes = _scenes(VISION_SPLIT, step * batch, batch)
        pixels = pixel_values([shapes.render(s) for s in scenes])
        labels = torch.stack([patch_labels(s) for s in scenes])  # [B, 4, N]
        features = vision_features(model, pixels)
        losses, accuracy = [], {}
        for k, (name, head) in enumerate(heads.items()):
            logits = head(features)
            target = labels[:, k]
            # objects are rare among patches: weigh object patches up so they are not ignored
            weight = torch.where(target > 0, 4.0, 1.0) + 4.0 * (labels[:, 1] == len(shapes.SHAPES) + 1)
            losses.append((F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * weight).mean())
            hit = logits.argmax(-1) == target
            accuracy[name] = hit[target > 0].float().mean().item()
        for group in optimiser.param_groups:
            group["lr"] = _scheduled_lr(step, steps, lr, warmup=min(50, steps // 10 + 1))
        optimiser.zero_grad()
        loss = torch.stack(losses).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.time() - started
            log(f"vision step {step}/{steps} loss {loss.item():.3f} object-patch acc "
                + " ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
                + f" | {(step + 1) * batch / elapsed:.1f} images/s, {elapsed:.0f}s")
    tower.eval()
    return accuracy


def fit_probe(model: LlavaForConditionalGeneration, steps: int = 40, batch: int = 32, lr: float = 1e-2,
              log: Callable[[str], None] = print) -> torch.nn.ModuleDict:
    """Linear heads for the dense labels on the frozen tower's features (a linear probe)."""
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in DENSE_HEADS.items()})
    optimiser = torch.optim.Adam(heads.parameters(), lr=lr)
    for step in range(steps):
        scenes = _scenes(VISION_SPLIT, 10_000_000 + step * batch, batch)
        with torch.no_grad():
            features = vision_features(model, pixel_values([shapes.render(s) for s in scenes]))
        labels = torch.stack([patch_labels(s) for s in scenes])
        loss = sum(F.cross_entropy(head(features).transpose(1, 2), labels[:, k])
                   for k, head in enumerate(heads.values()))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    log(f"probe: {steps} steps, loss {loss.item():.3f}")
    return heads


def init_projector_from_probe(model: LlavaForConditionalGeneration, heads: torch.nn.ModuleDict) -> None:
    """The projector's first rows become the probe's class logits, so from the first language step
    every visual token says plainly which colour, shape and letter lies under it; the other rows
    keep their random initialisation (position and anything else the tower encodes)."""
    weight = torch.cat([h.weight for h in heads.values()])
    bias = torch.cat([h.bias for h in heads.values()])
    first = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        first.weight[:len(weight)] = weight
        first.bias[:len(bias)] = bias


def conversation(tokenizer: PreTrainedTokenizerFast, split: int, index: int, turns: int,
                 family: str | None = None, max_objects: int | None = None
                 ) -> tuple[shapes.Scene, list[int], list[int]]:
    """One training image with up to ``turns`` questions as a multi-turn chat: (scene, ids, labels).

    The first turn is the evaluation prompt format; labels are -100 except answers and their EOS.
    """
    family = family or shapes.FAMILIES[index % len(shapes.FAMILIES)]
    scene, rng, focus = shapes.make_scene(split, index, family, max_objects)
    order = [family] + rng.sample([f for f in shapes.FAMILIES if f != family], len(shapes.FAMILIES) - 1)
    ids: list[int] = []
    labels: list[int] = []
    for k, asked_family in enumerate(order):
        asked = shapes.ask(asked_family, scene, rng, focus if k == 0 else None)
        if asked is None:
            continue
        question, answer, _ = asked
        image = "<image>" * N_VISUAL if not ids else ""
        prompt = tokenizer.encode(f"USER: {image} {question} ASSISTANT:", add_special_tokens=False)
        reply = [tokenizer.convert_tokens_to_ids(answer), tokenizer.eos_token_id]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
        if len([x for x in labels if x >= 0]) >= 2 * turns:
            break
    return scene, ids, labels


def _drop_background(tokenizer: PreTrainedTokenizerFast, scene: shapes.Scene, ids: list[int], labels: list[int],
                     background: float, generator: torch.Generator) -> tuple[list[int], list[int], torch.Tensor]:
    """Keeps every patch an object or the letter covers and a ``background`` fraction of the rest;
    returns the shortened ids and labels and the kept patch indices."""
    occupied = patch_labels(scene)[1] > 0
    kept = (occupied | (torch.rand(N_VISUAL, generator=generator) < background)).nonzero().flatten()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    first = ids.index(image_id)
    ids = ids[:first] + [image_id] * len(kept) + ids[first + N_VISUAL:]
    labels = labels[:first] + [-100] * len(kept) + labels[first + N_VISUAL:]
    return ids, labels, kept


def language_batch(tokenizer: PreTrainedTokenizerFast, split: int, start: int, batch: int, turns: int,
                   max_objects: int | None = None, background: float | None = None
                   ) -> dict[str, torch.Tensor]:
    """A padded batch of conversations. With ``background`` < 1 only the object patches and that
    fraction of background patches reach the decoder (``visual_index`` lists them per row)."""
    items = [conversation(tokenizer, split, i, turns, max_objects=max_objects)
             for i in range(start, start + batch)]
    kept_rows = None
    if background is not None and background < 1:
        generator = torch.Generator().manual_seed(start)
        dropped = [_drop_background(tokenizer, scene, ids, lab, background, generator) for scene, ids, lab in items]
        items = [(scene, ids, lab) for (scene, _, _), (ids, lab, _) in zip(items, dropped)]
        kept_rows = [kept for _, _, kept in dropped]
    length = max(len(ids) for _, ids, _ in items)
    input_ids = torch.full((batch, length), tokenizer.pad_token_id)
    labels = torch.full((batch, length), -100)
    attention = torch.zeros((batch, length), dtype=torch.long)
    for row, (_, ids, lab) in enumerate(items):  # right padding: answers sit at fixed offsets
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention[row, :len(ids)] = 1
    data = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "pixel_values": pixel_values([shapes.render(scene) for scene, _, _ in items])}
    if kept_rows is not None:
        data["visual_index"] = kept_rows
    return data


def answer_loss(model: LlavaForConditionalGeneration, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on answer tokens only, and which answer tokens the model predicts right."""
    if "visual_index" in batch:  # only some visual tokens: place their features by hand
        features = model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                            vision_feature_select_strategy="default").pooler_output
        kept = torch.cat([rows[index] for rows, index in zip(features, batch["visual_index"])])
        embeds = model.get_input_embeddings()(batch["input_ids"])
        slots = (batch["input_ids"] == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(slots, kept.to(embeds.dtype))
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, :-1]
    else:
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    supervised = targets >= 0
    loss = F.cross_entropy(logits[supervised], targets[supervised])
    return loss, logits[supervised].argmax(-1) == targets[supervised]


def train_language(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, steps: int,
                   batch: int = 16, turns: int = 6, lr: float = 1e-3,
                   curriculum: Sequence[tuple[float, int]] = CURRICULUM,
                   log: Callable[[str], None] = print,
                   every: int = 0, callback: Callable[[int], None] | None = None) -> None:
    """Stage 2: projector + decoder on multi-turn shapes conversations; the vision tower is frozen.

    ``curriculum``: (fraction of steps, max objects) phases of large-object scenes before the task's
    own scenes, so the decoder first learns where to look. ``callback(step)`` runs every ``every``
    steps (snapshots, validation) in eval mode."""
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    started, seen = time.time(), 0
    for step in range(steps):
        max_objects = next((n for until, n in curriculum if step < until * steps), None)
        background = min(1.0, 0.05 + step / (BACKGROUND_RAMP * steps)) if BACKGROUND_RAMP else None
        data = language_batch(tokenizer, LANGUAGE_SPLIT, step * batch, batch, turns, max_objects, background)
        for group in optimiser.param_groups:
            group["lr"] = _scheduled_lr(step, steps, lr, warmup=min(50, steps // 10 + 1))
        loss, hits = answer_loss(model, data)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        seen += batch
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.time() - started
            log(f"language step {step}/{steps} loss {loss.item():.3f} answer-token acc "
                f"{hits.float().mean().item():.2f} | {seen / elapsed:.1f} images/s "
                f"({hits.numel() / 2 * seen / batch / elapsed:.1f} questions/s), {elapsed:.0f}s")
        if callback is not None and every and (step + 1) % every == 0:
            model.eval()
            callback(step + 1)
            model.train()
    model.eval()


@torch.no_grad()
def validate(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, count: int = 96,
             batch: int = 24) -> dict[str, float]:
    """Teacher-forced single-question answer accuracy per family on the validation split (fast)."""
    hits_by_family: dict[str, list[bool]] = {f: [] for f in shapes.FAMILIES}
    for start in range(0, count, batch):
        data = language_batch(tokenizer, VALIDATION_SPLIT, start, batch, turns=1)
        logits = model(input_ids=data["input_ids"], pixel_values=data["pixel_values"],
                       attention_mask=data["attention_mask"]).logits[:, :-1]
        targets = data["labels"][:, 1:]
        first_answer = (targets >= 0).int().argmax(1)
        rows = torch.arange(len(targets))
        hits = logits[rows, first_answer].argmax(-1) == targets[rows, first_answer]
        for offset, hit in enumerate(hits.tolist()):
            hits_by_family[shapes.FAMILIES[(start + offset) % len(shapes.FAMILIES)]].append(hit)
    result = {f: sum(h) / len(h) for f, h in hits_by_family.items() if h}
    result["all"] = sum(sum(h) for h in hits_by_family.values()) / count
    return result


@torch.no_grad()
def evaluate(model: LlavaForConditionalGeneration, processor: LlavaProcessor, limit: int = 120,
             batch: int = 20, keep: int | None = None, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy through ``generate`` on the task's own samples (split 0).

    ``keep`` drops all but ``keep`` random visual tokens before the decoder (a quick stand-in for
    the ``random`` baseline, with contiguous positions), to check the task discriminates.
    """
    task = shapes.ShapesTask()
    samples = list(task.samples(limit))
    generator = torch.Generator().manual_seed(seed)
    records = []
    model.eval()
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": s.prompt}]}], add_generation_prompt=True)
            for s in chunk]
        images = [s.load_image() for s in chunk]
        if keep is None:
            inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
        else:
            new = _generate_random_keep(model, processor, images, texts, keep, generator,
                                        task.max_new_tokens)
        for sample, tokens in zip(chunk, processor.tokenizer.batch_decode(new, skip_special_tokens=True)):
            records.append({"sample_id": sample.id, "prediction": tokens,
                            "scores": task.score(sample, tokens), "meta": sample.meta})
    return task.aggregate(records)


def _generate_random_keep(model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: list,
                          texts: list[str], keep: int, generator: torch.Generator,
                          max_new_tokens: int) -> torch.Tensor:
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    features = model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                        vision_feature_select_strategy="default").pooler_output
    features = torch.stack(list(features))
    chosen = torch.rand(len(images), N_VISUAL, generator=generator).topk(keep, dim=1).indices.sort(1).values
    kept = features.gather(1, chosen[..., None].expand(-1, -1, features.shape[-1]))
    short = [t.replace("<image>", "<image>" * keep) for t in texts]
    tokens = processor.tokenizer(short, return_tensors="pt", padding=True)
    embeds = model.get_input_embeddings()(tokens["input_ids"])
    slots = tokens["input_ids"] == model.config.image_token_id
    embeds[slots] = kept.reshape(-1, kept.shape[-1]).to(embeds.dtype)
    return model.generate(inputs_embeds=embeds, attention_mask=tokens["attention_mask"],
                          max_new_tokens=max_new_tokens, do_sample=False)


def main(argv: Sequence[str] | None = None) -> None:
    from tokenbench.zoo import DEFAULT_MODEL, EMBEDDED

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED[DEFAULT_MODEL])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--probe-steps", type=int, default=40)
    parser.add_argument("--language-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=120)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    processor = build_processor()
    model = build_model(processor.tokenizer, seed=args.seed)
    pretrain_vision(model, args.vision_steps)
    init_projector_from_probe(model, fit_probe(model, args.probe_steps))
    vision_s = time.time() - started
    train_language(model, processor.tokenizer, args.language_steps, batch=args.batch, lr=args.lr)
    total_s = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    metrics = evaluate(model, processor, args.eval_limit)
    report = {"seed": args.seed, "vision_steps": args.vision_steps, "probe_steps": args.probe_steps,
              "language_steps": args.language_steps, "lr": args.lr,
              "batch": args.batch, "threads": args.threads, "vision_seconds": round(vision_s),
              "total_seconds": round(total_s), "eval_limit": args.eval_limit, "accuracy": metrics}
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
