"""The nine benchmarks end to end on tiny fixture copies in each hub dataset's schema.

Fixtures are parquet files written with ``datasets`` (images generated here with PIL) in the
layout of a hub download (``DIR/data/<split>-*.parquet`` or ``DIR/<subset>/<split>-*.parquet``)
and read back through the tasks' own loader, the path hub data take after loading.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from tokenbench.tasks.base import TaskDataError
from tokenbench.tasks.benchmarks import (
    BENCHMARKS,
    GQA,
    MME,
    MMBench,
    Pope,
    ScienceQAImg,
    SEEDBench,
    TextVQA,
    VizWiz,
    VQAv2,
)
from tokenbench.tasks.hub import SampleError
from tokenbench.tasks.validate import validate_task

Features, Value, List, ImageFeature = datasets.Features, datasets.Value, datasets.List, datasets.Image


def png(color: str, size: tuple[int, int] = (12, 8)) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


BROKEN = {"bytes": b"definitely not an image", "path": None}


def write(root: Path, folder: str, split: str, columns: dict[str, list], features: dict[str, Any]) -> Path:
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict(columns, features=Features(features))
    table.to_parquet(str(target / f"{split}-00000-of-00001.parquet"))
    return root


def pope_data(root: Path) -> Path:
    rows = [("random", "Is there a dog in the image?", "yes"),
            ("random", "Is there a cat in the image?", "no"),
            ("popular", "Is there a person in the image?", "no"),
            ("adversarial", "Is there a chair in the image?", "yes")]
    return write(root, "data", "test", {
        "id": [str(i) for i in range(len(rows))], "question_id": [str(i + 1) for i in range(len(rows))],
        "question": [q for _, q, _ in rows], "answer": [a for _, _, a in rows],
        "image_source": ["COCO_val2014_000000000001"] * len(rows),
        "image": [png("red"), png("blue"), png("green"), png("white")], "category": [c for c, _, _ in rows],
    }, {"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
        "answer": Value("string"), "image_source": Value("string"), "image": ImageFeature(),
        "category": Value("string")})


def mme_data(root: Path) -> Path:
    ask = "Please answer yes or no."
    rows = [("existence", "existence/0001.png", f"Is there a dog in this image? {ask}", "Yes"),
            ("existence", "existence/0001.png", f"Is there a cat in this image? {ask}", "No"),
            ("code_reasoning", "code_reasoning/0020.png", "Is the output 3? Please answer yes or no.", "Yes"),
            ("code_reasoning", "code_reasoning/0020.png", "Is the output 4? Please answer yes or no.", "No")]
    return write(root, "data", "test", {
        "question_id": [r[1] for r in rows], "image": [png("red")] * 2 + [png("black")] * 2,
        "question": [r[2] for r in rows], "answer": [r[3] for r in rows], "category": [r[0] for r in rows],
    }, {"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
        "answer": Value("string"), "category": Value("string")})


def gqa_data(root: Path, orphan: bool = False) -> Path:
    """Two questions on two images; with ``orphan`` a third whose image is not in the image subset."""
    rows = 3 if orphan else 2
    write(root, "testdev_balanced_instructions", "testdev", {
        "id": ["201307251", "201640614", "20000000"][:rows],
        "imageId": ["n161313", "n235859", "n000000"][:rows],
        "question": ["Is it overcast?", "Who is wearing the dress?", "What is missing?"][:rows],
        "answer": ["no", "woman", "nothing"][:rows],
        "fullAnswer": ["No, it is clear.", "The woman is.", "-"][:rows],
        "isBalanced": [True, True, True][:rows],
    }, {"id": Value("string"), "imageId": Value("string"), "question": Value("string"),
        "answer": Value("string"), "fullAnswer": Value("string"), "isBalanced": Value("bool")})
    return write(root, "testdev_balanced_images", "testdev", {
        "id": ["n235859", "n161313"], "image": [png("yellow"), png("gray")],
    }, {"id": Value("string"), "image": ImageFeature()})


def textvqa_data(root: Path) -> Path:
    return write(root, "data", "validation", {
        "image_id": ["003a8ae2ef43b901", "0054c91397f2fe05"], "question_id": [34602, 34603],
        "question": ["what is the brand of this camera?", "what does the small white text spell?"],
        "question_tokens": [["what", "is"], ["what", "does"]], "image": [png("red"), png("blue")],
        "image_width": [12, 12], "image_height": [8, 8],
        "flickr_original_url": ["", ""], "flickr_300k_url": ["", ""],
        "answers": [["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota",
                     "dakota digital", "dakota digital", "dakota", "dakota"],
                    ["copenhagen"] * 7 + ["thursday"] * 3],
        "image_classes": [["Camera"], ["Poster"]], "set_name": ["val", "val"],
        "ocr_tokens": [["dakota", "digital"], []],
    }, {"image_id": Value("string"), "question_id": Value("int64"), "question": Value("string"),
        "question_tokens": List(Value("string")), "image": ImageFeature(), "image_width": Value("int64"),
        "image_height": Value("int64"), "flickr_original_url": Value("string"),
        "flickr_300k_url": Value("string"), "answers": List(Value("string")),
        "image_classes": List(Value("string")), "set_name": Value("string"),
        "ocr_tokens": List(Value("string"))})


def scienceqa_data(root: Path) -> Path:
    return write(root, "ScienceQA-IMG", "test", {
        "image": [png("red"), None, png("blue")],
        "question": ["Which of these states is farthest north?", "Text only?", "Which animal is shown?"],
        "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["yes", "no"], ["cat", "dog"]],
        "answer": [0, 1, 1], "hint": ["", "", "The picture shows a pet."],
        "task": ["closed choice"] * 3, "grade": ["grade2"] * 3, "subject": ["social science"] * 3,
        "topic": ["geography"] * 3, "category": ["Geography"] * 3, "skill": ["Read a map"] * 3,
        "lecture": [""] * 3, "solution": [""] * 3,
    }, {"image": ImageFeature(), "question": Value("string"), "choices": List(Value("string")),
        "answer": Value("int8"), "hint": Value("string"), "task": Value("string"), "grade": Value("string"),
        "subject": Value("string"), "topic": Value("string"), "category": Value("string"),
        "skill": Value("string"), "lecture": Value("string"), "solution": Value("string")})


def mmbench_data(root: Path) -> Path:
    # Question 241 in two circular copies (options rotated), question 242 once.
    return write(root, "en", "dev", {
        "index": [241, 1000241, 242], "question": ["What is shown?", "What is shown?", "Which is red?"],
        "hint": [None, None, "Look closely."],
        "A": ["cat", "dog", "apple"], "B": ["dog", "cat", "banana"], "C": [None, None, "grape"],
        "D": [None] * 3, "E": [None] * 3,
        "answer": ["A", "B", "A"], "category": ["image_topic"] * 3, "image": [png("red")] * 3,
        "source": ["MMBench"] * 3, "L2-category": ["coarse_perception"] * 3, "comment": [None] * 3,
        "split": ["dev"] * 3,
    }, {"index": Value("int64"), "question": Value("string"), "hint": Value("string"), "A": Value("string"),
        "B": Value("string"), "C": Value("string"), "D": Value("string"), "E": Value("string"),
        "answer": Value("string"), "category": Value("string"), "image": ImageFeature(),
        "source": Value("string"), "L2-category": Value("string"), "comment": Value("string"),
        "split": Value("string")})


def seed_data(root: Path) -> Path:
    return write(root, "data", "test", {
        "answer": ["A", "C", "B"], "choice_a": ["One", "x", "red"], "choice_b": ["Two", "y", "blue"],
        "choice_c": ["Three", "z", "green"], "choice_d": ["Four", "w", "black"],
        "data_id": ["1454426_2591111986", "v1", "img2"], "data_type": ["image", "video", "image"],
        "question": ["How many towels are in the image?", "What happens next?", "What colour is it?"],
        "question_id": ["101669", "v-1", "101670"], "question_type_id": [5, 10, 2],
        "image": [[png("red")], [png("blue"), png("green")], [png("blue")]],
    }, {"answer": Value("string"), "choice_a": Value("string"), "choice_b": Value("string"),
        "choice_c": Value("string"), "choice_d": Value("string"), "data_id": Value("string"),
        "data_type": Value("string"), "question": Value("string"), "question_id": Value("string"),
        "question_type_id": Value("int64"), "image": List(ImageFeature())})


def vqav2_data(root: Path) -> Path:
    def answers(*texts: str) -> list[dict[str, Any]]:
        return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]
    return write(root, "data", "validation", {
        "question_type": ["how many", "what color"], "multiple_choice_answer": ["2", "red"],
        "answers": [answers(*(["2"] * 8 + ["two", "3"])), answers(*(["red"] * 6 + ["dark red"] * 4))],
        "image_id": [262148, 393225], "answer_type": ["number", "other"],
        "question_id": [262148000, 393225001], "image": [png("red"), png("blue")],
        "question": ["How many dogs are there?", "What color is the bus?"],
    }, {"question_type": Value("string"), "multiple_choice_answer": Value("string"),
        "answers": List({"answer": Value("string"), "answer_confidence": Value("string"),
                         "answer_id": Value("int64")}),
        "image_id": Value("int64"), "answer_type": Value("string"), "question_id": Value("int64"),
        "question": Value("string"), "image": ImageFeature()})


def vizwiz_data(root: Path) -> Path:
    return write(root, "data", "val", {
        "question_id": ["VizWiz_val_00000000", "VizWiz_val_00000001"], "image": [png("gray"), png("white")],
        "question": ["What is this?", "What flavor is this?"],
        "answers": [["unanswerable"] * 7 + ["tissue"] * 3, ["mint"] * 9 + ["unanswerable"]],
        "category": ["unanswerable", "other"],
    }, {"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
        "answers": List(Value("string")), "category": Value("string")})


FIXTURES = {Pope: pope_data, MME: mme_data, GQA: gqa_data, TextVQA: textvqa_data,
            ScienceQAImg: scienceqa_data, MMBench: mmbench_data, SEEDBench: seed_data, VQAv2: vqav2_data,
            VizWiz: vizwiz_data}


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the parquet builder's cache out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def run(task: Any, predictions: dict[str, str] | None = None) -> tuple[list[Any], dict[str, float]]:
    """Draw all samples, answer each (reference answer unless given) and aggregate."""
    samples = list(task.samples())
    records = []
    for sample in samples:
        prediction = (predictions or {}).get(sample.id, task.reference_prediction(sample))
        records.append({"sample_id": sample.id, "prediction": prediction,
                        "scores": task.score(sample, prediction), "meta": sample.meta})
    return samples, task.aggregate(records)


def test_nine_benchmarks_with_fixtures() -> None:
    assert set(FIXTURES) == set(BENCHMARKS)
    assert len({t.name for t in BENCHMARKS}) == 9


@pytest.mark.parametrize("task_cls", list(FIXTURES), ids=lambda t: t.name)
def test_fixture_loads_decodes_and_scores_perfectly(task_cls: Any, tmp_path: Path) -> None:
    task = task_cls(data_dir=FIXTURES[task_cls](tmp_path / "data"))
    samples, metrics = run(task)
    assert samples
    for sample in samples:
        assert sample.load_image().mode == "RGB"
        assert sample.prompt and "<image>" not in sample.prompt
    assert task.primary_metric in metrics
    assert task.source == task.hub_id and task.source.startswith("lmms-lab/")
    assert task.description and 0 < task.max_new_tokens <= 16
    if task_cls is not Pope:  # POPE's F1 depends on the mix of yes and no, checked below
        assert metrics[task.primary_metric] == pytest.approx(
            task.metric_scale if task_cls is not MME else 400.0)  # MME fixture: two subtasks, 200 each


def test_pope_prompt_splits_and_metrics(tmp_path: Path) -> None:
    task = Pope(data_dir=pope_data(tmp_path))
    samples, metrics = run(task, {"random-2": "No", "popular-3": "Yes, there is.",
                                  "adversarial-4": "There is no chair."})
    by_id = {s.id: s for s in samples}
    assert by_id["random-1"].prompt == ("Is there a dog in the image?\n"
                                        "Answer the question using a single word or phrase.")
    assert {s.meta["split"] for s in samples} == {"random", "popular", "adversarial"}
    # random: dog yes->yes, cat no->no: F1 100. popular: person no->"Yes": F1 0 (no true yes).
    # adversarial: chair yes->"There is no chair.": F1 0.
    assert metrics["random_f1"] == pytest.approx(100.0)
    assert metrics["f1"] == pytest.approx(100.0 / 3)


def test_mme_prompt_and_pairs(tmp_path: Path) -> None:
    task = MME(data_dir=mme_data(tmp_path))
    samples, _ = run(task)
    assert samples[0].prompt == ("Is there a dog in this image?\n"
                                 "Answer the question using a single word or phrase.")
    assert samples[0].target == "yes" and samples[0].meta == {"category": "existence",
                                                              "image": "existence/0001.png"}
    # One wrong answer on the existence image: acc 50, acc+ 0 -> existence 50; cognition stays 200.
    ids = [s.id for s in samples]
    _, metrics = run(task, {ids[1]: "Yes"})
    assert metrics["existence"] == pytest.approx(50.0)
    assert metrics["perception"] == pytest.approx(50.0)
    assert metrics["cognition"] == pytest.approx(200.0)
    assert metrics["total"] == pytest.approx(250.0)


def test_gqa_joins_images_by_id(tmp_path: Path) -> None:
    samples = list(GQA(data_dir=gqa_data(tmp_path, orphan=True)).samples())
    assert [s.id for s in samples] == ["201307251", "201640614", "20000000"]
    assert samples[0].load_image().getpixel((0, 0)) == (128, 128, 128)   # gray: image n161313
    assert samples[1].load_image().getpixel((0, 0)) == (255, 255, 0)     # yellow: image n235859
    with pytest.raises(SampleError, match=r"task 'gqa' row 2 \(id 20000000\) field 'imageId'.*n000000"):
        samples[2].load_image()
    assert samples[0].prompt == "Is it overcast?\nAnswer the question using a single word or phrase."


def test_textvqa_prompt_has_ocr_tokens_and_vqa_accuracy(tmp_path: Path) -> None:
    task = TextVQA(data_dir=textvqa_data(tmp_path))
    samples, _ = run(task)
    assert samples[0].prompt == ("what is the brand of this camera?\nReference OCR token: dakota, digital\n"
                                 "Answer the question using a single word or phrase.")
    assert "Reference OCR token" not in samples[1].prompt    # no OCR tokens: no line
    # 3 of 10 annotators: (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert task.score(samples[0], "Dakota Digital.")["accuracy"] == pytest.approx(0.9)
    _, metrics = run(task, {samples[0].id: "dakota", samples[1].id: "Thursday"})
    assert metrics["accuracy"] == pytest.approx(100 * (1.0 + 0.9) / 2)    # 5 and 3 annotators agree


def test_scienceqa_keeps_image_questions_with_context(tmp_path: Path) -> None:
    samples = list(ScienceQAImg(data_dir=scienceqa_data(tmp_path)).samples())
    assert len(samples) == 2                                   # the text-only question is not evaluated
    assert samples[0].prompt == ("Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\n"
                                 "C. Arizona\nD. Oklahoma\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert samples[1].prompt.startswith("Context: The picture shows a pet.\nWhich animal is shown?\nA. cat\n")
    assert [s.target for s in samples] == ["A", "B"]


def test_mmbench_circular_evaluation(tmp_path: Path) -> None:
    task = MMBench(data_dir=mmbench_data(tmp_path))
    samples, _ = run(task)
    assert samples[2].prompt == ("Look closely.\nWhich is red?\nA. apple\nB. banana\nC. grape\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert samples[0].meta["options"] == {"A": "cat", "B": "dog"}
    # Right on the first copy of question 241, wrong on its rotated copy, right on 242:
    # single pass 2/3; circular 1/2 (241 fails as a whole).
    _, metrics = run(task, {samples[1].id: "A"})
    assert metrics["single_pass_accuracy"] == pytest.approx(200 / 3)
    assert metrics["accuracy"] == pytest.approx(50.0)


def test_seedbench_keeps_the_image_part(tmp_path: Path) -> None:
    samples = list(SEEDBench(data_dir=seed_data(tmp_path)).samples())
    assert [s.id for s in samples] == ["101669", "101670"]
    assert samples[0].prompt == ("How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert samples[1].load_image().getpixel((0, 0)) == (0, 0, 255)


def test_seedbench_without_data_type_uses_the_dimension(tmp_path: Path) -> None:
    seed_data(tmp_path / "full")
    full = str(tmp_path / "full/data/test-00000-of-00001.parquet")
    table = datasets.load_dataset("parquet", data_files=full, split="train").remove_columns("data_type")
    table.to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))   # dimension 10 is video
    assert [s.id for s in SEEDBench(data_dir=tmp_path).samples()] == ["101669", "101670"]


def test_vqav2_reads_answer_dicts(tmp_path: Path) -> None:
    task = VQAv2(data_dir=vqav2_data(tmp_path))
    samples, _ = run(task)
    assert samples[0].target[:2] == ["2", "2"] and len(samples[0].target) == 10
    assert task.score(samples[0], "Two")["accuracy"] == pytest.approx(1.0)
    # "dark red": 4 of 10 annotators -> every leave-one-out subset has >= 3 -> 1.0
    assert task.score(samples[1], "dark red")["accuracy"] == pytest.approx(1.0)
    assert task.score(samples[1], "blue")["accuracy"] == 0.0


def test_vizwiz_unanswerable(tmp_path: Path) -> None:
    task = VizWiz(data_dir=vizwiz_data(tmp_path))
    samples, _ = run(task)
    assert samples[0].prompt == ("What is this?\nWhen the provided information is insufficient, respond with "
                                 "'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert samples[0].meta["unanswerable"] and not samples[1].meta["unanswerable"]
    _, metrics = run(task, {samples[0].id: "Unanswerable", samples[1].id: "unanswerable"})
    # sample 2: one annotator said unanswerable -> (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert metrics["unanswerable_accuracy"] == pytest.approx(100.0)
    assert metrics["answerable_accuracy"] == pytest.approx(30.0)
    assert metrics["accuracy"] == pytest.approx(65.0)


def test_limit_takes_the_first_samples(tmp_path: Path) -> None:
    samples = list(Pope(data_dir=pope_data(tmp_path)).samples(limit=2))
    assert [s.id for s in samples] == ["random-1", "random-2"]


def test_one_data_dir_serves_several_benchmarks(tmp_path: Path) -> None:
    pope_data(tmp_path / "POPE")          # named like the hub repository
    mme_data(tmp_path / "mme")            # or like the task
    assert len(list(Pope(data_dir=tmp_path).samples())) == 4
    assert len(list(MME(data_dir=tmp_path).samples())) == 4
    with pytest.raises(TaskDataError, match=r"expected .*/data/val-\*.parquet or .*/VizWiz-VQA/data/val-\*"):
        next(VizWiz(data_dir=tmp_path).samples())


def test_save_to_disk_copy_is_read_too(tmp_path: Path) -> None:
    parquet = next((pope_data(tmp_path / "parquet") / "data").glob("*.parquet"))
    table = datasets.load_dataset("parquet", data_files=str(parquet), split="train")
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "saved"))
    assert len(list(Pope(data_dir=tmp_path / "saved").samples())) == 4
    datasets.DatasetDict({"val": table}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(TaskDataError, match=r"'pope': '.*other' has no split 'test' \(it has val\)"):
        next(Pope(data_dir=tmp_path / "other").samples())


def test_broken_rows_fail_their_sample_only(tmp_path: Path) -> None:
    write(tmp_path, "data", "test", {
        "question_id": ["a/1.png", "b/2.png", "c/3.png"], "image": [png("red"), BROKEN, png("blue")],
        "question": ["Is it red? Please answer yes or no.", "Is it? Please answer yes or no.", None],
        "answer": ["Yes", "No", "Yes"], "category": ["color"] * 3,
    }, {"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
        "answer": Value("string"), "category": Value("string")})
    samples = list(MME(data_dir=tmp_path).samples())
    assert len(samples) == 3
    assert samples[0].load_image().size == (12, 8)
    with pytest.raises(SampleError, match=r"'mme' row 1 \(id b/2.png#1\) field 'image'.*does not decode"):
        samples[1].load_image()
    with pytest.raises(SampleError, match=r"task 'mme' row 2 \(id c/3.png#2\): field 'question' is empty"):
        samples[2].load_image()


def test_missing_image_names_the_field(tmp_path: Path) -> None:
    write(tmp_path, "data", "val", {
        "question_id": ["q1"], "image": [None], "question": ["What?"], "answers": [["x"] * 10],
    }, {"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
        "answers": List(Value("string"))})
    sample = next(VizWiz(data_dir=tmp_path).samples())
    with pytest.raises(SampleError, match=r"task 'vizwiz' row 0 \(id q1\) field 'image': no image"):
        sample.load_image()


def test_missing_data_dir_files_and_columns(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"'pope': data dir .* does not exist.*lmms-lab/POPE.*--data-dir"):
        next(Pope(data_dir=tmp_path / "nowhere").samples())
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskDataError, match=r"task 'mmbench': no parquet files for split 'dev'.*en/dev-\*"):
        next(MMBench(data_dir=tmp_path / "empty").samples())
    write(tmp_path / "wrong", "data", "test", {"question": ["q"]}, {"question": Value("string")})
    with pytest.raises(TaskDataError, match=r"task 'pope': the data have no column 'answer', 'category'"):
        next(Pope(data_dir=tmp_path / "wrong").samples())


def test_offline_without_cache_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    start = time.monotonic()
    with pytest.raises(TaskDataError, match=r"task 'textvqa': cannot load lmms-lab/textvqa \(offline mode"):
        next(TextVQA().samples())
    assert time.monotonic() - start < 10


def test_unreachable_hub_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(TaskDataError, match=r"'gqa': cannot reach http://127.0.0.1:9 .*HF_DATASETS_OFFLINE"):
        next(GQA().samples())
    assert time.monotonic() - start < 10


def test_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskDataError, match=r"pip install 'tokenbench\[data\]'"):
        next(Pope().samples())


def test_validate_reports_ok_and_missing(tmp_path: Path) -> None:
    ok, message = validate_task(VizWiz, vizwiz_data(tmp_path / "v"))
    assert ok and message.startswith("2 samples from") and "accuracy=100.0" in message
    ok, message = validate_task(SEEDBench, tmp_path / "absent")
    assert not ok and message.startswith("data dir") and "lmms-lab/SEED-Bench" in message
    write(tmp_path / "bad", "data", "test", {
        "question_id": ["a"], "image": [BROKEN], "question": ["Is it? Please answer yes or no."],
        "answer": ["Yes"], "category": ["color"]},
        {"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
         "answer": Value("string"), "category": Value("string")})
    ok, message = validate_task(MME, tmp_path / "bad")
    assert not ok and "field 'image'" in message


def test_registered_through_the_entry_point() -> None:
    from tokenbench.plugins import load_registry

    registry = load_registry()
    for task in BENCHMARKS:
        assert registry.tasks.get(task.name) is task
    assert not [p for p in registry.problems if "benchmarks" in p]


# --- official scoring, layouts and hub ids --------------------------------------------------------

def test_choice_tasks_score_by_the_official_rule_unless_lenient(tmp_path: Path) -> None:
    science = ScienceQAImg(data_dir=scienceqa_data(tmp_path / "s"))
    seed = SEEDBench(data_dir=seed_data(tmp_path / "e"))
    mmbench = MMBench(data_dir=mmbench_data(tmp_path / "m"))
    for task, answer in ((science, "A or B"), (seed, "A."), (mmbench, "A or B")):
        sample = next(iter(task.samples()))
        assert sample.target == "A"
        assert task.score(sample, answer)["correct"] == 0.0, task.name
        task.scoring = "lenient"
        assert task.score(sample, answer)["correct"] == 1.0, task.name
        assert task.provenance()["scoring"] == "lenient"


def test_vqav2_uses_vqaeval_and_textvqa_evalai(tmp_path: Path) -> None:
    vqav2 = VQAv2(data_dir=vqav2_data(tmp_path / "v"))
    sample = list(vqav2.samples())[1]          # 6x "red", 4x "dark red"
    assert vqav2.score(sample, "dark,red")["accuracy"] == 1.0        # "," becomes a space
    vqav2.scoring = "lenient"
    assert vqav2.score(sample, "dark,red")["accuracy"] == 0.0        # EvalAI's pre-pass drops it
    textvqa = TextVQA(data_dir=textvqa_data(tmp_path / "t"))
    sample = list(textvqa.samples())[1]        # 7x "copenhagen"
    assert textvqa.score(sample, "copenhagen" + "." * 33)["accuracy"] == 0.0   # a 33rd period survives
    textvqa.scoring = "lenient"
    assert textvqa.score(sample, "copenhagen" + "." * 33)["accuracy"] == 1.0


def test_mmbench_skips_a_circular_group_without_its_first_row(tmp_path: Path) -> None:
    task = MMBench(data_dir=mmbench_data(tmp_path))
    samples = list(task.samples())
    records = [{"sample_id": s.id, "scores": task.score(s, s.target), "meta": s.meta} for s in samples]
    without_first = [r for r in records if r["sample_id"] != "241"]          # 1000241 stays, alone
    assert task.aggregate(without_first)["accuracy"] == pytest.approx(100.0)  # only group 242 counts
    wrong = [r | {"scores": {"correct": 0.0}} if r["sample_id"] == "1000241" else r for r in without_first]
    assert task.aggregate(wrong)["accuracy"] == pytest.approx(100.0)
    assert task.aggregate(wrong)["single_pass_accuracy"] == pytest.approx(50.0)


def test_mme_refuses_an_unknown_category(tmp_path: Path) -> None:
    write(tmp_path, "data", "test", {
        "question_id": ["a", "b"], "image": [png("red")] * 2, "question": ["Is it? Please answer yes or no."] * 2,
        "answer": ["Yes", "No"], "category": ["color", "colour"]},
        {"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
         "answer": Value("string"), "category": Value("string")})
    with pytest.raises(TaskDataError, match=r"task 'mme': category 'colour' is not one of MME's 14 subtasks"):
        next(MME(data_dir=tmp_path).samples())


def test_pope_reads_the_full_layout_with_three_splits(tmp_path: Path) -> None:
    for split, color in (("random", "red"), ("popular", "blue"), ("adversarial", "green")):
        write(tmp_path, "Full", split, {
            "id": ["0"], "question_id": ["1"], "question": [f"Is there a {split} dog in the image?"],
            "answer": ["yes"], "image_source": ["COCO_val2014_000000000001"], "image": [png(color)],
            "category": [split]},
            {"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
             "answer": Value("string"), "image_source": Value("string"), "image": ImageFeature(),
             "category": Value("string")})
    samples, metrics = run(Pope(data_dir=tmp_path))
    assert [s.meta["split"] for s in samples] == ["random", "popular", "adversarial"]
    assert [s.id for s in samples] == ["random-1", "popular-1", "adversarial-1"]
    assert metrics["f1"] == pytest.approx(100.0)


def test_old_and_new_hub_ids_are_both_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenbench.tasks import hub

    table = datasets.Dataset.from_dict({"question": ["q"], "answers": [["a"]], "image": [png("red")]},
                                       features=Features({"question": Value("string"),
                                                          "answers": List(Value("string")),
                                                          "image": ImageFeature()}))
    tried = []

    def only_new(task, hub_id, config, split, data_dir=None):
        tried.append(hub_id)
        if hub_id.startswith("lmms-lab/"):
            raise TaskDataError(f"task '{task}': cannot load {hub_id}: gone")
        return table

    monkeypatch.setattr(hub, "load_split", only_new)
    task = VizWiz()
    assert task.hub_ids == ("lmms-lab/VizWiz-VQA", "lmms-lab-encoder/VizWiz-VQA")
    assert len(list(task.samples())) == 1
    assert tried == ["lmms-lab/VizWiz-VQA", "lmms-lab-encoder/VizWiz-VQA"]
    assert task.provenance() == {"scoring": "official", "dataset": "lmms-lab-encoder/VizWiz-VQA"}
    monkeypatch.setattr(hub, "load_split", lambda task, hub_id, *a, **k: (_ for _ in ()).throw(
        TaskDataError(f"task '{task}': cannot load {hub_id}: gone")))
    with pytest.raises(TaskDataError, match=r"cannot load lmms-lab/VizWiz-VQA: gone \(also tried "
                                            r"lmms-lab-encoder/VizWiz-VQA\)"):
        next(VizWiz().samples())
