"""The embedded ``tiny-video-llava-shapes`` checkpoint and the code that trains it."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from tokenbench.tasks import shapes_video
from tokenbench.tasks.shapes_video import ShapesVideoTask
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    VideoLlavaForConditionalGeneration,
)

from tokenbench.zoo import EMBEDDED, train_video
from tokenbench.zoo.data import pixel_values

CHECKPOINT = EMBEDDED["tiny-video-llava-shapes"]


@pytest.fixture(scope="module")
def loaded():
    model = VideoLlavaForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    processing = train_video.VideoProcessing(AutoTokenizer.from_pretrained(CHECKPOINT),
                                             AutoImageProcessor.from_pretrained(CHECKPOINT))
    return model, processing


def test_checkpoint_ships_as_small_safetensors():
    weights = list(CHECKPOINT.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) <= 15 * 2**20
    assert (CHECKPOINT / "training.json").is_file() and (CHECKPOINT / "processor_config.json").is_file()


def test_video_llava_geometry(loaded):
    model, _ = loaded
    config = model.config
    assert config.model_type == "video_llava" and config.text_config.model_type == "llama"
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size) == (224, 28)
    assert config.video_seq_length == train_video.N_VISUAL == 8 * 65


def test_inputs_are_the_processors(loaded):
    """One ``<video>`` placeholder per frame token, and the frames normalised as CLIP does."""
    model, processing = loaded
    sample = next(ShapesVideoTask().samples(1))
    frames = sample.load_video()
    inputs = processing.inputs([frames], [sample.prompt])
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == train_video.N_VISUAL
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 224, 224)
    assert torch.allclose(inputs["pixel_values_videos"][0], pixel_values(frames), atol=1e-5)
    text = processing.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("user : <video>") and text.endswith(f"{sample.prompt.rstrip('?')} ? assistant :")


def test_training_sequence_is_the_evaluation_prompt(loaded):
    """With every visual token kept, the teacher-forced answer logits of a multi-question training
    sequence equal the model's own forward on each question's evaluation prompt (a wrong position or
    a leak between questions moves them by far more than the tolerance)."""
    model, processing = loaded
    features, clips, families = train_video.encode_clips(model, train_video.VALIDATION_SPLIT, 2)
    batch = train_video.make_batch(processing.tokenizer, clips, families, [0, 1], seed=3)
    logits = train_video.batch_logits(model, features, batch)
    for row, clip in enumerate(clips):
        turns = train_video.clip_questions(clip, families[row], random.Random(3 * 1_000_003 + row))
        assert len(turns) >= 2
        answer_slots = (batch["labels"][row] >= 0).nonzero().flatten()[::2] - 1  # the position before each answer
        frames = shapes_video.render(clip)
        expected = torch.cat([model(**processing.inputs([frames], [question])).logits[:, -1]
                              for question, _, _ in turns])
        # the cached tower features are fp16: that rounding is all that differs
        assert torch.allclose(logits[row, answer_slots], expected, atol=1e-2)


def test_dropped_background_keeps_the_full_video_positions(loaded):
    _, processing = loaded
    clip, _ = shapes_video.make_clip(7, 0, "counting")
    batch = train_video.make_batch(processing.tokenizer, [clip], ["counting"], [0], seed=0, background=0.0)
    kept = batch["visual_index"][0]
    occupied = train_video.occupied_tokens(clip)
    assert torch.equal(kept, occupied.nonzero().flatten()) and len(kept) < train_video.N_VISUAL // 4
    positions = batch["position_ids"][0]
    assert torch.equal(positions[2:2 + len(kept)], 2 + kept)
    assert int(positions[2 + len(kept)]) == 2 + train_video.N_VISUAL  # the question starts after the video


def test_started_from_the_image_model():
    processing = train_video.build_processor()
    video = train_video.build_from_image_model(EMBEDDED["tiny-llava-shapes"], processing.tokenizer)
    image = LlavaForConditionalGeneration.from_pretrained(EMBEDDED["tiny-llava-shapes"])
    old_vocab = AutoTokenizer.from_pretrained(EMBEDDED["tiny-llava-shapes"]).get_vocab()
    new_vocab = processing.tokenizer.get_vocab()
    for word in ("circle", "left", "three", "assistant"):
        assert torch.equal(video.get_input_embeddings().weight[new_vocab[word]],
                           image.get_input_embeddings().weight[old_vocab[word]])
        assert torch.equal(video.lm_head.weight[new_vocab[word]], image.lm_head.weight[old_vocab[word]])
    tower, source = video.model.video_tower.state_dict(), image.model.vision_tower.state_dict()
    for key, value in source.items():
        if "position" not in key:
            assert torch.equal(tower[key], value), key
    positions = next(v for k, v in tower.items() if k.endswith("position_embedding.weight"))
    assert positions.shape[0] == 65


def test_answers_held_out_clips(loaded):
    """The shipped model answers most of the first held-out questions (every family appears)."""
    model, processing = loaded
    samples = list(ShapesVideoTask().samples(18))
    inputs = processing.inputs([s.load_video() for s in samples], [s.prompt for s in samples])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    replies = processing.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    task = ShapesVideoTask()
    right = sum(task.score(s, r)["correct"] for s, r in zip(samples, replies, strict=True))
    assert right >= 12, list(zip([s.target for s in samples], replies))


def test_training_only_questions_read_the_tracks():
    """Each auxiliary answer is worked out again here from the clip's tracks: the column and row of
    the named object's centre in the first or last frame it is shown in, and whether it moves."""
    words = set(train_video.build_processor().tokenizer.get_vocab())
    seen = set()
    for index in range(12):
        family = shapes_video.FAMILIES[index % 6]
        clip, _ = shapes_video.make_clip(train_video.TRAIN_SPLIT, index, family)
        for question, answer, asked in train_video.clip_questions(clip, family, random.Random(index), True):
            assert answer in words and all(w in words for w in question.replace("?", " ?").split())
            if asked not in train_video.AUXILIARY_FAMILIES:
                continue
            seen.add(asked)
            colour, shape = question.split(" the ")[1].split()[:2]
            track = next(t for t in clip.tracks if (t.colour, t.shape) == (colour, shape))
            if asked == "moves":
                assert answer == ("yes" if len(set(filter(None, track.path))) > 1 else "no")
                continue
            frame = [t for t in range(shapes_video.FRAMES) if track.path[t] is not None]
            x, y = track.path[frame[0] if asked.startswith("start") else frame[-1]]
            cell = (x if asked.endswith("column") else y) // train_video.PATCH + 1
            assert answer == ("col" if asked.endswith("column") else "row") + str(cell)
    assert seen == set(train_video.AUXILIARY_FAMILIES)


def test_learning_rate_warms_up_then_falls_to_a_tenth():
    from tokenbench.zoo.training import warmup_cosine_lr

    rates = [warmup_cosine_lr(step, 100, 1.0, warmup=10) for step in range(101)]
    assert rates[0] == 0.1 and rates[9] == 1.0  # linear warm-up to the peak
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))  # then only down
    assert abs(rates[55] - 0.55) < 1e-12 and abs(rates[100] - 0.1) < 1e-12  # half-way, and a tenth at the end
