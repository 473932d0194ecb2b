"""The embedded ``tiny-llava-shapes`` checkpoint and the code that trains it."""

from __future__ import annotations

import pytest
import torch
from tokenbench.tasks.shapes import ShapesTask
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tokenbench.zoo import DEFAULT_MODEL, EMBEDDED, train

CHECKPOINT = EMBEDDED[DEFAULT_MODEL]


@pytest.fixture(scope="module")
def loaded():
    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT)
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    return model.eval(), processor


def test_checkpoint_ships_as_small_safetensors():
    weights = list(CHECKPOINT.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) <= 20 * 2**20
    assert not list(CHECKPOINT.glob("*.bin"))


def test_llava_geometry(loaded):
    model, _ = loaded
    config = model.config
    assert config.model_type == "llava" and config.text_config.model_type == "llama"
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.num_hidden_layers >= 12
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.projector_hidden_act == "gelu"
    vision = config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == train.N_VISUAL == 144


def test_processor_expands_the_image_token_like_llava_1_5(loaded):
    model, processor = loaded
    sample = next(ShapesTask().samples(1))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}],
        add_generation_prompt=True)
    assert text.startswith("USER: <image>") and text.endswith("ASSISTANT:")
    inputs = processor(images=[sample.load_image()], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert torch.equal(inputs["pixel_values"], train.pixel_values([sample.load_image()]))


def test_trained_model_answers_held_out_questions(loaded):
    model, processor = loaded
    metrics = train.evaluate(model, processor, limit=24, batch=12)
    # chance is about 30% overall and 10% for reading; the shipped model reads the letter reliably
    assert metrics["accuracy"] >= 45.0 and metrics["accuracy/reading"] >= 75.0, metrics
    assert set(metrics) == {"accuracy", *(f"accuracy/{f}" for f in ("existence", "counting", "colour",
                                                                       "shape", "relation", "reading"))}


def test_patch_labels_follow_the_objects():
    from tokenbench.tasks import shapes

    scene = shapes.Scene([shapes.Shape("square", "blue", cx=84, cy=84, size=112)],
                         shapes.Letter("K", 290, 290), background_seed=1)
    labels = train.patch_labels(scene).reshape(4, 12, 12)
    assert (labels[0, 1:4, 1:4] == list(shapes.COLOURS).index("blue") + 1).all()
    assert (labels[1, 1:4, 1:4] == shapes.SHAPES.index("square") + 1).all()
    assert labels[0, 8, 1] == 0 and labels[3].sum() == 2  # background; one centre per object + letter
    assert labels[2].max() == shapes.LETTERS.index("K") + 1


def test_a_few_training_steps_reduce_nothing_to_nan_and_move_the_weights():
    torch.set_num_threads(1)
    processor = train.build_processor()
    model = train.build_model(processor.tokenizer, seed=0)
    tower_before = model.model.vision_tower.embeddings.patch_embedding.weight.clone()
    train.pretrain_vision(model, steps=2, batch=2, log=lambda _: None)
    assert not torch.equal(tower_before, model.model.vision_tower.embeddings.patch_embedding.weight)
    tower_after = model.model.vision_tower.embeddings.patch_embedding.weight.clone()
    head_before = model.lm_head.weight.clone()
    losses = []
    train.train_language(model, processor.tokenizer, steps=2, batch=2, turns=2,
                         log=lambda line: losses.append(float(line.split("loss ")[1].split()[0])))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(head_before, model.lm_head.weight)
    assert torch.equal(tower_after, model.model.vision_tower.embeddings.patch_embedding.weight)
