"""Train the embedded ``tiny-llava-shapes`` model: ``python -m tokenbench.zoo.train [--out DIR]``.

Training a LLaVA from scratch end to end on a CPU stays at chance level (the decoder has nothing to
look at until the vision tower sees something), so this follows LLaVA's own recipe in miniature:

1. **vision**: the CLIP tower learns dense per-patch labels (colour, shape, letter and object centre
   of whatever covers each patch, and the patch's column) on the layer LLaVA feeds the projector
   (``vision_feature_layer=-2``, CLS dropped). Linear heads, thrown away afterwards.
2. **probe**: fresh linear heads on the frozen tower initialise the projector's first rows, so the
   visual tokens carry plain class scores from the first language step: the dense labels, the
   colour-shape pair, the shape at object centres, and the column as one number.
3. **language**: the tower is frozen and its features are computed once per image; projector +
   Llama decoder learn the shapes questions. Each image carries several questions in one sequence,
   so the 144 image tokens are paid once for many supervised answers; an attention mask lets every
   question see only the image and itself, with the evaluation prompt's positions, so each one is
   exactly the evaluation prompt and no answer can be copied from another. Loss on answers only.
   Training-only questions with richer answers ("which column is the circle in?", "is the circle
   left or right?", "how many objects are there?") lead up to left/right and counting; scenes built
   for counting come three times in eight, as its hard answers need them. The decoder
   first sees only the object patches plus a share of background patches growing from 5% to all
   over the first 20% of steps, then the evaluation's full 144-token images.

Rendering is the slow part of a step, so each split is rendered once into a pool (in worker
processes) and passed over several times, with new questions on every pass. ``--device cuda``
trains on a GPU. On 2 CPU cores, under ``OMP_WAIT_POLICY=ACTIVE`` (on a machine of one's own it
makes a step 1.3× faster), the defaults took 60 minutes: vision 7 (rendering 1.3, 1500 steps at
144 images/s), language 53 (rendering and encoding 3.7, 4000 steps at 0.74 s), and the model
answered 69% of the held-out questions. The shipped model went on from such a run (made at an
earlier commit) for four ``--init-model`` stages at ``--lr 1e-3``, 1200 to 3000 steps each (its
``training.json`` chains them, each with its command and code commit).

Deterministic from ``--seed`` (torch) and fixed data splits (vision: split 1, language: split 2,
validation: split 3; the evaluation split 0 is never trained on). Geometry: 336-px images with 28-px
patches give a 12×12 grid of 144 visual tokens (LLaVA-1.5's 576 is too slow to train on a CPU), so
the default budgets are the LLaVA-1.5 retention ratios 33.3/22.2/11.1%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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
from tokenbench.tiny_models import llava_processor, llava_tokenizer
from tokenbench.zoo.data import (
    CLIP_MEAN,
    CLIP_STD,
    GRID,
    LABELS,
    LETTER_SHAPE,
    N_VISUAL,
    PATCH,
    TRAINING_FAMILIES,
    ScenePool,
    language_batch,
    patch_labels,
    pixel_values,
    vocabulary,
)
from tokenbench.zoo.training import Stopwatch, held_out_accuracy, warmup_cosine_lr, write_record

__all__ = ["N_VISUAL", "PATCH", "build_model", "build_processor", "evaluate", "patch_labels", "pixel_values",
           "pretrain_vision", "train_language"]

VISION_SPLIT, LANGUAGE_SPLIT, VALIDATION_SPLIT = 1, 2, 3
# heads of the dense vision objective: the label rows, plus each patch's column (for left/right)
DENSE_HEADS = {**LABELS, "column": GRID}
# the scenes the language stage trains on are built for these families in turn: counting three
# times as often as the others, because its hard answers (three or four of a shape among up to five
# objects) come up only in scenes built for it, and at one share in six "one" outnumbered "three"
# sixteen to one among the counting answers
LANGUAGE_SCENES = (*shapes.FAMILIES, "counting", "counting")
# background patches reaching the decoder grow from 5% to all over this fraction of language steps
BACKGROUND_RAMP = 0.2


def build_processor() -> LlavaProcessor:
    """LLaVA-1.5's processor at this geometry: CLIP preprocessing at 336 px, ``<image>`` → 144 tokens."""
    size = shapes.IMAGE_SIZE
    # the class llava-hf checkpoints name (transformers picks its backend when loading)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return llava_processor(llava_tokenizer(vocabulary()), size, PATCH, image_processor=image_processor)


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


def vision_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The patch features LLaVA hands the projector: penultimate CLIP layer, CLS dropped."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _epoch_batches(size: int, batch: int, seed: int):
    """Endless shuffled batches of row indices, a new permutation every pass."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch + 1, batch):
            yield order[start:start + batch]


def _dense_targets(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per-head targets [B, 144] for DENSE_HEADS from a batch of patch labels [B, 4, 144]."""
    column = torch.arange(N_VISUAL, device=labels.device) % GRID
    return [*labels.unbind(1), column.expand(len(labels), -1)]


def pretrain_vision(model: LlavaForConditionalGeneration, pool: ScenePool, steps: int, batch: int = 32,
                    lr: float = 2e-3, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, float]:
    """Stage 1: dense per-patch classification on the features LLaVA uses; returns the last step's
    accuracy per head on object patches (all patches for ``column``)."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in DENSE_HEADS.items()}).to(model.device)
    params = [*tower.parameters(), *heads.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tower.train()
    started, accuracy = time.time(), {}
    batches = _epoch_batches(len(pool), min(batch, len(pool)), seed)
    for step in range(steps):
        rows = next(batches)
        labels = pool.labels[rows].to(model.device)
        features = vision_features(model, pool.pixels(rows).to(model.device))
        # objects are rare among patches: weigh object patches up, an object's centre and the letter most
        on_object = labels[:, 1] > 0
        weight = 1.0 + 4.0 * on_object + 4.0 * (labels[:, 3] > 0) + 4.0 * (labels[:, 1] == LETTER_SHAPE)
        losses, accuracy = [], {}
        for (name, head), target in zip(heads.items(), _dense_targets(labels)):
            logits = head(features)
            losses.append((F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * weight).mean())
            scored = on_object if name != "column" else torch.ones_like(on_object)
            accuracy[name] = (logits.argmax(-1) == target)[scored].float().mean().item()
        for group in optimiser.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr, warmup=min(50, steps // 10 + 1))
        optimiser.zero_grad()
        loss = torch.stack(losses).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.time() - started
            log(f"vision step {step}/{steps} loss {loss.item():.3f} object-patch acc "
                + " ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
                + f" | {(step + 1) * batch / elapsed:.1f} images/s, {elapsed:.0f}s")
    tower.eval()
    return accuracy


@torch.no_grad()
def encode(model: LlavaForConditionalGeneration, pool: ScenePool, batch: int = 64) -> torch.Tensor:
    """[N, 144, width] frozen-tower features of every pool image (computed once for the language
    stage; kept on the CPU)."""
    return torch.cat([vision_features(model, pool.pixels(torch.arange(s, min(s + batch, len(pool))))
                                      .to(model.device)).cpu()
                      for s in range(0, len(pool), batch)])


N_PAIRS = len(shapes.COLOURS) * len(shapes.SHAPES)
# what the probe that seeds the projector reads off each patch: the dense labels, plus what the
# questions combine (a colour-shape pair for existence, a shape at an object's centre for counting)
# and the column as one number, so left/right becomes a subtraction
PROBE_HEADS = {**DENSE_HEADS, "pair": N_PAIRS + 1, "centre_shape": len(shapes.SHAPES) + 1, "x": 1}


def _probe_targets(labels: torch.Tensor) -> list[torch.Tensor]:
    """Targets [B, 144] for PROBE_HEADS (float for ``x``, class ids for the others)."""
    colour, shape, _, centre = labels.unbind(1)
    is_shape = (shape > 0) & (shape < LETTER_SHAPE)
    pair = torch.where(is_shape, (colour - 1) * len(shapes.SHAPES) + shape, 0)
    centre_shape = torch.where(is_shape & (centre > 0), shape, 0)
    x = 2.0 * (torch.arange(N_VISUAL) % GRID) / (GRID - 1)  # 0..2, where the projector's GELU is monotonic
    return [*_dense_targets(labels), pair, centre_shape, x.expand(len(labels), -1)]


def fit_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 200, lr: float = 1e-2,
              log: Callable[[str], None] = print) -> torch.nn.ModuleDict:
    """Linear heads for PROBE_HEADS on frozen features [N, 144, width] (a linear probe)."""
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(features.shape[-1], n) for k, n in PROBE_HEADS.items()})
    optimiser = torch.optim.Adam(heads.parameters(), lr=lr)
    batches = _epoch_batches(len(features), min(64, len(features)), seed=1)
    for _ in range(steps):
        rows = next(batches)
        loss = sum(F.mse_loss(head(features[rows])[..., 0], target) if target.is_floating_point()
                   else F.cross_entropy(head(features[rows]).transpose(1, 2), target)
                   for head, target in zip(heads.values(), _probe_targets(labels[rows])))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    log(f"probe: {steps} steps, loss {loss.item():.3f}")
    return heads


def init_projector_from_probe(model: LlavaForConditionalGeneration, heads: torch.nn.ModuleDict) -> None:
    """The projector's first rows become the probe's class logits, so from the first language step
    every visual token says plainly which colour, shape, letter and column lies under it; the other
    rows keep their random initialisation."""
    weight = torch.cat([h.weight for h in heads.values()])
    bias = torch.cat([h.bias for h in heads.values()])
    first = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        first.weight[:len(weight)] = weight.to(first.weight.device)
        first.bias[:len(bias)] = bias.to(first.bias.device)


def answer_logits(model: LlavaForConditionalGeneration, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """Decoder logits for a :func:`language_batch` whose visual tokens are the kept rows of cached
    tower ``features`` [N, 144, width], projected by the model's own projector."""
    kept = torch.cat([features[row, index] for row, index in zip(batch["rows"].tolist(), batch["visual_index"])])
    input_ids = batch["input_ids"].to(model.device)
    embeds = model.get_input_embeddings()(input_ids)
    slots = (input_ids == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(slots, model.model.multi_modal_projector(kept.to(model.device)).to(embeds.dtype))
    mask = batch["attention_mask"].to(model.device, embeds.dtype)
    return model(inputs_embeds=embeds, attention_mask=mask, position_ids=batch["position_ids"].to(model.device)).logits


def train_language(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, pool: ScenePool,
                   features: torch.Tensor, steps: int, batch: int = 16, turns: int = 6, lr: float = 1e-3,
                   seed: int = 0, log: Callable[[str], None] = print, every: int = 0,
                   callback: Callable[[int], None] | None = None, ramp: float = BACKGROUND_RAMP) -> None:
    """Stage 2: projector + decoder on multi-turn conversations about the pool's scenes (the tower
    is frozen; ``features`` are its outputs for the pool). ``callback(step)`` runs every ``every``
    steps (snapshots, validation) in eval mode. Background patches reach the decoder from 5% to
    all over the first ``ramp`` fraction of steps (0: all from the start)."""
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    started, seen, answered = time.time(), 0, 0
    batches = _epoch_batches(len(pool), min(batch, len(pool)), seed)
    for step in range(steps):
        background = min(1.0, 0.05 + step / (ramp * steps)) if ramp else 1.0
        data = language_batch(tokenizer, pool, next(batches).tolist(), turns=turns, seed=seed * 100_003 + step,
                              background=background)
        for group in optimiser.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        logits = answer_logits(model, features, data)[:, :-1]
        targets = data["labels"][:, 1:].to(logits.device)
        supervised = targets >= 0
        loss = F.cross_entropy(logits[supervised], targets[supervised])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        seen += len(data["rows"])
        answered += int(supervised.sum()) // 2
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.time() - started
            hits = logits[supervised].argmax(-1) == targets[supervised]
            words = hits[targets[supervised] != tokenizer.eos_token_id]
            log(f"language step {step}/{steps} loss {loss.item():.3f} answer acc {words.float().mean().item():.2f} "
                f"| {seen / elapsed:.1f} images/s ({answered / elapsed:.1f} questions/s), {elapsed:.0f}s")
        if callback is not None and every and (step + 1) % every == 0:
            model.eval()
            callback(step + 1)
            model.train()
    model.eval()


@torch.no_grad()
def validate(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, pool: ScenePool,
             features: torch.Tensor, batch: int = 48, turns: int = 10) -> dict[str, float]:
    """Teacher-forced accuracy of the answer word per training family on a validation pool, over
    all ``turns`` questions per image (each one is exactly an evaluation prompt with all 144 visual
    tokens); ``all`` is the mean over the evaluated families. ``first/<family>`` scores only each
    image's first question, which is asked the way the evaluation split asks it about a scene built
    the way the evaluation's are (a counting scene holds 1-4 of the shape asked about), so
    ``first/all`` follows the held-out accuracy where the all-turn figures do not. Fast, and close
    to the generated accuracy."""
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(pool), batch):
        rows = list(range(start, min(start + batch, len(pool))))
        data = language_batch(tokenizer, pool, rows, turns=turns, seed=0)
        logits = answer_logits(model, features, data)[:, :-1]
        targets = data["labels"][:, 1:].to(logits.device)
        answers = (targets >= 0) & (targets != tokenizer.eos_token_id)
        right = iter((logits[answers].argmax(-1) == targets[answers]).tolist())
        for row, families in zip(rows, data["families"], strict=True):
            for k, family in enumerate(families):
                hit = next(right)
                hits.setdefault(family, []).append(hit)
                if k == 0 and family == pool.families[row]:
                    hits.setdefault(f"first/{family}", []).append(hit)
    order = [*TRAINING_FAMILIES, *(f"first/{f}" for f in shapes.FAMILIES)]
    result = {f: sum(h) / len(h) for f, h in sorted(hits.items(), key=lambda kv: order.index(kv[0]))}
    for prefix in ("", "first/"):
        scored = [result[prefix + f] for f in shapes.FAMILIES if prefix + f in result]
        if scored:
            result[prefix + "all"] = sum(scored) / len(scored)
    return result


@torch.no_grad()
def evaluate(model: LlavaForConditionalGeneration, processor: LlavaProcessor, limit: int = 120,
             batch: int = 20) -> dict[str, float]:
    """Held-out accuracy through the processor and ``generate`` on the task's own samples (split 0)."""

    def inputs_of(chunk: list) -> dict:
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": s.prompt}]}], add_generation_prompt=True)
            for s in chunk]
        return processor(images=[s.load_image() for s in chunk], text=texts, return_tensors="pt",
                         padding=True).to(model.device)

    return held_out_accuracy(model, shapes.ShapesTask(), processor.tokenizer, inputs_of, limit, batch)


def _parameter_counts(model: LlavaForConditionalGeneration) -> dict[str, int]:
    counts = {"vision_tower": model.model.vision_tower, "projector": model.model.multi_modal_projector}
    result = {name: sum(p.numel() for p in module.parameters()) for name, module in counts.items()}
    result["total"] = sum(p.numel() for p in model.parameters())
    result["language_model_and_head"] = result["total"] - result["vision_tower"] - result["projector"]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from tokenbench.zoo import DEFAULT_MODEL, EMBEDDED

    parser = argparse.ArgumentParser(prog="python -m tokenbench.zoo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED[DEFAULT_MODEL])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-images", type=int, default=8000)
    parser.add_argument("--vision-steps", type=int, default=1500)
    parser.add_argument("--language-images", type=int, default=12000)
    parser.add_argument("--language-steps", type=int, default=4000)
    parser.add_argument("--validation-images", type=int, default=240)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=2, help="processes that render the scene pools")
    parser.add_argument("--eval-limit", type=int, default=120)
    parser.add_argument("--save-vision", type=Path, help="also save the tower after the vision stage here")
    parser.add_argument("--vision-checkpoint", type=Path,
                        help="start from a tower saved by --save-vision (skips the vision stage)")
    parser.add_argument("--init-model", type=Path,
                        help="go on training a saved model (skips the vision stage and the probe; no background ramp)")
    parser.add_argument("--language-start", type=int, default=0,
                        help="first scene index of the language pool (to go on with scenes not trained on yet)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device; use --device cpu")
    torch.set_num_threads(args.threads)
    stopwatch = Stopwatch()
    lap = stopwatch.lap

    processor = build_processor()
    tokenizer = processor.tokenizer
    if args.init_model and args.vision_checkpoint:
        parser.error("--init-model already has a vision tower; drop --vision-checkpoint")
    if args.init_model and not (args.init_model / "config.json").is_file():
        parser.error(f"--init-model {args.init_model}: no saved model there (config.json is missing)")
    vision_accuracy = None
    if args.init_model:
        model = LlavaForConditionalGeneration.from_pretrained(args.init_model).to(args.device)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):  # words added since
            model.resize_token_embeddings(len(tokenizer))
        torch.manual_seed(args.seed)
    else:
        model = build_model(tokenizer, seed=args.seed).to(args.device)
    if args.vision_checkpoint:
        model.model.vision_tower.load_state_dict(torch.load(args.vision_checkpoint, map_location=args.device))
        model.model.vision_tower.eval()
    elif not args.init_model:
        vision_pool = ScenePool.render(VISION_SPLIT, args.vision_images, workers=args.workers)
        lap("render vision pool")
        vision_accuracy = pretrain_vision(model, vision_pool, args.vision_steps, seed=args.seed)
        del vision_pool
        lap("vision stage")
        if args.save_vision:
            torch.save(model.model.vision_tower.state_dict(), args.save_vision)
    pool = ScenePool.render(LANGUAGE_SPLIT, args.language_images, start=args.language_start, workers=args.workers,
                            families=LANGUAGE_SCENES)
    held_out = ScenePool.render(VALIDATION_SPLIT, args.validation_images, workers=args.workers)
    lap("render language pools")
    features, held_out_features = encode(model, pool), encode(model, held_out)
    if not args.init_model:
        init_projector_from_probe(model, fit_probe(features, pool.labels))
    lap("encode + probe")

    validations: dict[int, dict[str, float]] = {}

    def report(step: int) -> None:
        validations[step] = scores = validate(model, tokenizer, held_out, held_out_features)
        print(f"validation at step {step}: " + json.dumps({k: round(v, 3) for k, v in scores.items()}), flush=True)
        model.save_pretrained(args.out)  # a snapshot, so an interrupted run still leaves a model
        processor.save_pretrained(args.out)

    train_language(model, tokenizer, pool, features, args.language_steps, batch=args.batch, turns=args.turns,
                   lr=args.lr, seed=args.seed, every=max(1, args.language_steps // 10), callback=report,
                   ramp=0.0 if args.init_model else BACKGROUND_RAMP)
    lap("language stage")
    if args.language_steps not in validations:  # the last snapshot is the trained model
        report(args.language_steps)
    metrics = evaluate(model, processor, args.eval_limit)
    write_record(args.out, "tokenbench.zoo.train", sys.argv[1:] if argv is None else argv, args,
                 parameters=_parameter_counts(model), seconds=stopwatch.seconds,
                 vision_object_patch_accuracy=vision_accuracy, validation=validations[args.language_steps],
                 **{f"held_out_accuracy_{args.eval_limit}": metrics})


if __name__ == "__main__":
    main()
