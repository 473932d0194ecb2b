"""The embedded ``tiny-llava-shapes`` checkpoint and the code that trains it."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenbench.tasks import shapes
from tokenbench.tasks.shapes import ShapesTask
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tokenbench.zoo import DEFAULT_MODEL, EMBEDDED, train
from tokenbench.zoo.data import TRAINING_FAMILIES, ScenePool, language_batch, turn_mask

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


def test_scene_pool_renders_the_same_scenes_in_workers_and_in_process():
    one = ScenePool.render(train.VISION_SPLIT, 6, workers=1)
    two = ScenePool.render(train.VISION_SPLIT, 6, workers=2)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.images.shape == (6, 336, 336, 3) and one.labels.shape == (6, 4, 144)
    assert one.families == list(shapes.FAMILIES)
    assert torch.equal(one.pixels(torch.arange(2)), train.pixel_values([shapes.render(s) for s in one.scenes[:2]]))


def test_language_batch_keeps_object_patches_and_supervises_only_answers():
    processor = train.build_processor()
    tokenizer = processor.tokenizer
    pool = ScenePool.render(train.LANGUAGE_SPLIT, 4)
    batch = language_batch(tokenizer, pool, [0, 1, 2, 3], turns=6, seed=5, background=0.0)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for row in range(4):
        kept = batch["visual_index"][row]
        assert torch.equal(kept, (pool.labels[row, 1] > 0).nonzero().flatten())
        assert int((batch["input_ids"][row] == image_id).sum()) == len(kept)
        answers = batch["labels"][row][batch["labels"][row] >= 0].tolist()
        assert answers[1::2] == [tokenizer.eos_token_id] * (len(answers) // 2) and len(answers) >= 4
    first = tokenizer.decode(batch["input_ids"][0][batch["input_ids"][0] != tokenizer.pad_token_id])
    assert first.startswith("user : <image>") and "assistant :" in first
    again = language_batch(tokenizer, pool, [0, 1, 2, 3], turns=6, seed=5, background=0.0)
    other = language_batch(tokenizer, pool, [0, 1, 2, 3], turns=6, seed=6, background=0.0)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    assert not torch.equal(batch["input_ids"], other["input_ids"])  # a new pass asks new questions


def test_each_question_of_a_conversation_sees_only_the_image_and_itself():
    """A later turn is computed exactly as the evaluation prompt would be: same positions, and no
    earlier question or answer in view (so none can be copied)."""
    processor = train.build_processor()
    tokenizer = processor.tokenizer
    model = train.build_model(tokenizer, seed=3).eval()
    pool = ScenePool.render(train.LANGUAGE_SPLIT, 2)
    features = torch.randn(len(pool), train.N_VISUAL, model.config.vision_config.hidden_size)
    together = language_batch(tokenizer, pool, [0, 1], turns=5, seed=2, background=0.0)
    with torch.no_grad():
        logits = train.answer_logits(model, features, together)
    prefix = int((together["input_ids"][0] == tokenizer.convert_tokens_to_ids("<image>")).sum()) + 2
    ids, labels = together["input_ids"][0], together["labels"][0]
    answers = (labels >= 0).nonzero().flatten()[::2].tolist()
    assert len(answers) == 5
    starts = [prefix] + [a + 2 for a in answers[:-1]]  # each question follows the last one's EOS
    for start, answer in zip(starts, answers):
        alone = {key: value for key, value in together.items()}
        single = torch.cat([ids[:prefix], ids[start:answer + 2]])[None]
        alone_mask, alone_positions = turn_mask(torch.tensor([[0] * prefix + [1] * (answer + 2 - start)]))
        alone.update(input_ids=single, attention_mask=alone_mask, position_ids=alone_positions,
                     rows=together["rows"][:1], visual_index=together["visual_index"][:1])
        assert torch.equal(alone_positions[0], torch.arange(single.shape[1]))
        with torch.no_grad():
            reference = train.answer_logits(model, features, alone)[0, -3]
        torch.testing.assert_close(logits[0, answer - 1], reference, atol=1e-4, rtol=1e-4)


def test_trained_model_answers_held_out_questions(loaded):
    model, processor = loaded
    metrics = train.evaluate(model, processor, limit=24, batch=12)
    # chance is about 30% overall and 10% for reading; the shipped model answers 93% of the full split
    assert metrics["accuracy"] >= 75.0 and metrics["accuracy/reading"] >= 75.0, metrics
    assert set(metrics) == {"accuracy", *(f"accuracy/{f}" for f in ("existence", "counting", "colour",
                                                                       "shape", "relation", "reading"))}


def test_patch_labels_follow_the_objects():
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
    pool = ScenePool.render(train.VISION_SPLIT, 4)
    tower_before = model.model.vision_tower.embeddings.patch_embedding.weight.clone()
    train.pretrain_vision(model, pool, steps=2, batch=2, log=lambda _: None)
    assert not torch.equal(tower_before, model.model.vision_tower.embeddings.patch_embedding.weight)
    tower_after = model.model.vision_tower.embeddings.patch_embedding.weight.clone()
    head_before = model.lm_head.weight.clone()
    losses = []
    features = train.encode(model, pool)
    train.init_projector_from_probe(model, train.fit_probe(features, pool.labels, steps=2, log=lambda _: None))
    train.train_language(model, processor.tokenizer, pool, features, steps=2, batch=2, turns=2,
                         log=lambda line: losses.append(float(line.split("loss ")[1].split()[0])))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(head_before, model.lm_head.weight)
    assert torch.equal(tower_after, model.model.vision_tower.embeddings.patch_embedding.weight)
    scores = train.validate(model, processor.tokenizer, pool, features, batch=2, turns=4)
    firsts = {f"first/{family}" for family in shapes.FAMILIES}
    assert set(scores) - {"all", "first/all"} <= set(TRAINING_FAMILIES) | firsts
    assert {"existence", "first/existence", "first/counting"} <= set(scores)
    assert all(0.0 <= value <= 1.0 for value in scores.values())


def test_training_conversations_ask_every_family_and_the_training_only_questions():
    from collections import Counter

    from tokenbench.zoo.data import ask_column, ask_objects, ask_position, questions

    asked = Counter()
    for index in range(120):
        family = shapes.FAMILIES[index % len(shapes.FAMILIES)]
        scene = shapes.make_scene(train.LANGUAGE_SPLIT, index, family)[0]
        turns = questions(scene, family, random.Random(index), turns=10)
        assert 4 <= len(turns) <= 10 and len({t.question for t in turns}) == len(turns)  # no question twice
        first = shapes.ask(family, scene, random.Random(index))
        assert first is None or (turns[0].family == family and turns[0].question.split()[:2] == first[0].split()[:2])
        asked.update({t.family for t in turns})
    assert set(asked) == set(TRAINING_FAMILIES)
    # every family in (nearly) every conversation that has one; left/right needs two single shapes apart
    assert min(n for f, n in asked.items() if f != "relation") >= 0.8 * 120 and asked["relation"] >= 50
    scene = shapes.Scene([shapes.Shape("circle", "red", 60, 100, 40), shapes.Shape("star", "blue", 280, 200, 40),
                          shapes.Shape("square", "green", 170, 300, 40)], shapes.Letter("K", 10, 10), 1)
    seen = {ask_position(scene, random.Random(seed)) for seed in range(20)}
    assert seen == {("is the circle left or right?", "left"), ("is the star left or right?", "right")}
    columns = {ask_column(scene, random.Random(seed)) for seed in range(20)}
    assert columns == {("which column is the circle in?", "col3"), ("which column is the star in?", "col11"),
                       ("which column is the square in?", "col7")}
    assert ask_objects(scene, random.Random(0)) == ("how many objects are there?", "three")
    tokenizer = train.build_processor().tokenizer
    assert all(tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id
               for _, answer in columns for word in answer.split())


def test_a_counting_scene_is_first_asked_about_the_shape_it_was_built_to_count():
    from collections import Counter

    from tokenbench.zoo.data import questions

    pool = ScenePool.render(train.LANGUAGE_SPLIT, 240)
    answers = Counter()
    for row, (scene, family, focus) in enumerate(zip(pool.scenes, pool.families, pool.focuses)):
        if family != "counting":
            assert focus is None
            continue
        first = questions(scene, family, random.Random(row), turns=10, focus=focus)[0]
        assert first == (f"how many {shapes.PLURALS[focus]} are there?",
                         shapes.COUNT_WORDS[[o.shape for o in scene.objects].count(focus)], "counting")
        answers[first.answer] += 1
    # as in the evaluation split: 1-4 of the shape, each count in about a quarter of the scenes
    assert set(answers) == {"one", "two", "three", "four"} and min(answers.values()) >= 5


def test_training_command_trains_saves_and_goes_on_from_a_saved_model(tmp_path):
    small = ["--vision-images", "4", "--vision-steps", "2", "--language-images", "4", "--language-steps", "2",
             "--validation-images", "4", "--batch", "2", "--turns", "2", "--eval-limit", "2", "--workers", "1",
             "--threads", "1", "--device", "cpu"]
    train.main(["--out", str(tmp_path / "first"), *small])
    first = json.loads((tmp_path / "first" / "training.json").read_text())
    assert first["command"].endswith("--device cpu") and "started_from" not in first
    train.main(["--out", str(tmp_path / "second"), "--init-model", str(tmp_path / "first"),
                "--language-start", "4", *small])
    second = json.loads((tmp_path / "second" / "training.json").read_text())
    assert second["started_from"] == first and second["arguments"]["language_start"] == "4"
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "second")
    assert model.get_input_embeddings().num_embeddings == len(train.build_processor().tokenizer)


def test_training_command_rejects_a_directory_without_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--init-model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "config.json is missing" in capsys.readouterr().err
