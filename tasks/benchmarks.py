"""The real benchmarks of the token-compression papers, as LLaVA-1.5 evaluates them.

Each class reads the lmms-lab copy of the benchmark on the Hugging Face hub, under the hub id below
or the same repository in the ``lmms-lab-encoder`` organisation that the current lmms-eval reads
(the run record's provenance names which one loaded), or a local copy with the same schema
(``--data-dir``); builds LLaVA-1.5's prompt (the adapter adds the conversation template) and
scores with the benchmark's official rule as LLaVA-1.5's evaluation applies it:

============== ========================== ===================== =====================================
task           hub id (subset / split)    primary metric        official rule reproduced
============== ========================== ===================== =====================================
pope           lmms-lab/POPE (test)       f1 (mean of 3 splits) POPE acc/precision/recall/F1/yes-ratio
mme            lmms-lab/MME (test)        total (P + C, /2800)  MME acc + acc+ per subtask, summed
gqa            lmms-lab/GQA (testdev bal) accuracy              exact match after normalisation
textvqa        lmms-lab/textvqa (val)     accuracy              VQA accuracy, OCR tokens in prompt
scienceqa-img  lmms-lab/ScienceQA (IMG)   accuracy              LLaVA's eval_science_qa letter rule
mmbench        lmms-lab/MMBench (en dev)  accuracy (circular)   CircularEval, MMBench's can_infer
seedbench      lmms-lab/SEED-Bench (test) accuracy              exact letter match, image part only
vqav2          lmms-lab/VQAv2 (val)       accuracy              VQA accuracy, vqaEval normalisation
vizwiz         lmms-lab/VizWiz-VQA (val)  accuracy              VQA accuracy, EvalAI normalisation
============== ========================== ===================== =====================================

POPE is read from the default subset's ``test`` split (a ``category`` column names the COCO split)
or, failing that, from the ``Full`` subset's three splits ``random``/``popular``/``adversarial``.
MME refuses a category outside its 14 subtasks. MMBench scores a circular group only when its
first row (index < 1e6) is present, as the official tool does.

``--scoring lenient`` (``Task.scoring``) keeps tokenbench's earlier, wider parsing for the
multiple-choice and VQA benchmarks: :func:`~tokenbench.tasks.choice.extract_choice` for the three
choice tasks and :func:`~tokenbench.tasks.vqa_scoring.normalize_lenient` for the three VQA tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from PIL import Image
from tokenbench.tasks.base import Sample, TaskDataError
from tokenbench.tasks.choice import (
    LETTERS,
    choice_prompt,
    extract_choice,
    read_exact_letter,
    read_mmbench,
    read_scienceqa,
)
from tokenbench.tasks.hub import SampleError, open_image, raw_row, require_datasets
from tokenbench.tasks.hub_task import SHORT_ANSWER, HubTask, broken_sample, column_arrow
from tokenbench.tasks.mme import COGNITION, PERCEPTION, mme_metrics
from tokenbench.tasks.mme import read_yes_no as read_mme_answer
from tokenbench.tasks.pope import SPLITS as POPE_SPLITS
from tokenbench.tasks.pope import pope_metrics
from tokenbench.tasks.pope import read_yes_no as read_pope_answer
from tokenbench.tasks.vqa_scoring import (
    gqa_match,
    most_common_answer,
    normalize_answer,
    normalize_lenient,
    normalize_vqav2,
    vqa_accuracy,
)

import tokenbench

Records = Sequence[Mapping[str, Any]]


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


class Pope(HubTask):
    name = "pope"
    primary_metric = "f1"
    metric_scale = 100.0
    max_new_tokens = 8
    hub_id = source = "lmms-lab/POPE"
    split = "test"
    required = ("question", "answer", "category")
    description = ("POPE object hallucination, COCO random/popular/adversarial splits (9000 yes/no "
                   "questions); F1 in percent averaged over the three splits")

    full_config: ClassVar[str] = "Full"

    def rows(self) -> Any:
        """The default subset's ``test`` split; else the ``Full`` subset, one split per COCO split."""
        try:
            return super().rows()
        except TaskDataError as default_layout:
            try:
                return self._full_rows()
            except TaskDataError:
                raise default_layout from None

    def _full_rows(self) -> Any:
        datasets = require_datasets(self.name)
        parts = []
        for split in POPE_SPLITS:
            rows = self.load(self.full_config, split)
            if "category" in rows.column_names:
                rows = rows.remove_columns("category")
            parts.append(rows.add_column("category", [split] * len(rows)))
        rows = datasets.concatenate_datasets(parts)
        self.check_columns(rows, self.required + (self.image_column,))
        return rows

    def sample_id(self, index: int, row: dict[str, Any]) -> str:
        return f"{row.get('category')}-{super().sample_id(index, row)}"

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        return Sample(sample_id, f"{row['question'].strip()}\n{SHORT_ANSWER}", image,
                      row["answer"].strip().lower(), {"split": row["category"]})

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        read = read_pope_answer(prediction)
        return {"prediction": read, "answer": sample.target, "correct": float(read == sample.target)}

    def aggregate(self, records: Records) -> dict[str, float]:
        return pope_metrics((r["meta"]["split"], r["scores"]["prediction"], r["scores"]["answer"])
                            for r in records)


class MME(HubTask):
    name = "mme"
    primary_metric = "total"
    metric_scale = 2800.0
    max_new_tokens = 8
    hub_id = source = "lmms-lab/MME"
    split = "test"
    required = ("question", "answer", "category", "question_id")
    bootstrap_unit = ("category", "image")  # acc+ scores an image's two questions together
    description = ("MME, all 14 subtasks (2374 yes/no questions, two per image); total = perception "
                   "(/2000) + cognition (/800), each subtask scored acc + acc+")

    def select(self, rows: Any) -> Any:
        """All rows; a category outside MME's 14 subtasks is an error (it would drop out of the totals)."""
        known = set(PERCEPTION + COGNITION)
        unknown = sorted({str(c) for c in column_arrow(rows, "category").to_pylist()} - known)
        if unknown:
            raise TaskDataError(f"task '{self.name}': category '{unknown[0]}' is not one of MME's 14 "
                                f"subtasks ({', '.join(PERCEPTION + COGNITION)}); use the schema of "
                                f"{self.hub_id}")
        return rows

    def sample_id(self, index: int, row: dict[str, Any]) -> str:
        return f"{super().sample_id(index, row)}#{index}"  # question_id names the image: two rows each

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        # LLaVA-1.5 swaps MME's " Please answer yes or no." for its short-answer instruction.
        question = row["question"].strip().replace(" Please answer yes or no.", "")
        return Sample(sample_id, f"{question}\n{SHORT_ANSWER}", image, row["answer"].strip().lower(),
                      {"category": row["category"], "image": row["question_id"]})

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        read = read_mme_answer(prediction)
        return {"prediction": read, "correct": float(read == sample.target)}

    def aggregate(self, records: Records) -> dict[str, float]:
        return mme_metrics((r["meta"]["category"], r["meta"]["image"], r["scores"]["correct"] == 1.0)
                           for r in records)


class GQA(HubTask):
    name = "gqa"
    max_new_tokens = 16
    hub_id = source = "lmms-lab/GQA"
    config = "testdev_balanced_instructions"
    images_config: ClassVar[str] = "testdev_balanced_images"
    split = "testdev"
    required = ("question", "answer", "imageId")
    image_column = None
    id_column = "id"
    description = "GQA test-dev balanced (12578 questions); exact match after normalisation, percent"

    def rows(self) -> Any:
        questions = super().rows()
        source = self.dataset_source
        self._images = self.load(self.images_config, self.split)
        self.dataset_source = source
        self.check_columns(self._images, ("id", "image"))
        image_ids = column_arrow(self._images, "id").to_pylist()
        self._image_position = {str(key): position for position, key in enumerate(image_ids)}
        return questions

    def image_loader(self, row: dict[str, Any], label: str) -> Callable[[], Image.Image]:
        image_id = str(row["imageId"])
        where = f"{label} field 'imageId'"

        def load() -> Image.Image:
            if image_id not in self._image_position:
                raise SampleError(f"{where}: image '{image_id}' is not in {self.hub_id}/{self.images_config}")
            return open_image(raw_row(self._images, self._image_position[image_id])["image"], where)
        return load

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        return Sample(sample_id, f"{row['question'].strip()}\n{SHORT_ANSWER}", image, row["answer"])

    per_sample_score = "correct"

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        return {"correct": float(gqa_match(prediction, sample.target))}

    def aggregate(self, records: Records) -> dict[str, float]:
        return {"accuracy": _mean_percent([r["scores"]["correct"] for r in records])}


def _answer_texts(answers: Sequence[Any]) -> list[str]:
    """Human answers as strings (VQAv2 stores ``{"answer": ..., ...}`` dicts)."""
    return [a["answer"] if isinstance(a, Mapping) else str(a) for a in answers]


class _VQATask(HubTask):
    """Open-ended questions with ten human answers, scored by VQA accuracy."""

    max_new_tokens = 16
    required = ("question", "answers")
    per_sample_score = "accuracy"

    def prompt(self, row: dict[str, Any]) -> str:
        return f"{row['question'].strip()}\n{SHORT_ANSWER}"

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        return Sample(sample_id, self.prompt(row), image, _answer_texts(row["answers"]))

    def normalize(self, answer: str) -> str:
        """The benchmark's answer normalisation: EvalAI's (TextVQA, VizWiz), or the lenient one."""
        return normalize_lenient(answer) if self.scoring == "lenient" else normalize_answer(answer)

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        return {"accuracy": vqa_accuracy(prediction, sample.target, self.normalize)}

    def aggregate(self, records: Records) -> dict[str, float]:
        return {"accuracy": _mean_percent([r["scores"]["accuracy"] for r in records])}

    def reference_prediction(self, sample: Sample) -> str:
        return most_common_answer(sample.target, self.normalize)


class TextVQA(_VQATask):
    name = "textvqa"
    hub_id = source = "lmms-lab/textvqa"
    split = "validation"
    description = ("TextVQA validation (5000 questions) with LLaVA-1.5's 'Reference OCR token' prompt; "
                   "VQA accuracy, percent")

    def prompt(self, row: dict[str, Any]) -> str:
        tokens = row.get("ocr_tokens") or []
        ocr = f"\nReference OCR token: {', '.join(tokens)}" if tokens else ""
        return f"{row['question'].strip()}{ocr}\n{SHORT_ANSWER}"


class VQAv2(_VQATask):
    name = "vqav2"
    hub_id = source = "lmms-lab/VQAv2"
    split = "validation"
    description = ("VQAv2 validation (214k questions; papers report test-dev, scored by the EvalAI "
                   "server, so expect ~1 point apart; use --limit for a subset); VQA accuracy with "
                   "vqaEval's normalisation, percent")

    def normalize(self, answer: str) -> str:
        return normalize_lenient(answer) if self.scoring == "lenient" else normalize_vqav2(answer)


class VizWiz(_VQATask):
    name = "vizwiz"
    hub_id = source = "lmms-lab/VizWiz-VQA"
    split = "val"
    description = ("VizWiz-VQA validation (4319 questions, many unanswerable); VQA accuracy, percent, "
                   "with the unanswerable / answerable parts")

    def prompt(self, row: dict[str, Any]) -> str:
        return (f"{row['question'].strip()}\nWhen the provided information is insufficient, respond with "
                f"'Unanswerable'.\n{SHORT_ANSWER}")

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        sample = super().make_sample(sample_id, row, image)
        sample.meta["unanswerable"] = normalize_answer(most_common_answer(sample.target)) == "unanswerable"
        return sample

    def aggregate(self, records: Records) -> dict[str, float]:
        result = super().aggregate(records)
        for label, wanted in (("unanswerable", True), ("answerable", False)):
            part = [r["scores"]["accuracy"] for r in records if r["meta"].get("unanswerable") == wanted]
            if part:
                result[f"{label}_accuracy"] = _mean_percent(part)
        return result


class _ChoiceTask(HubTask):
    """Multiple-choice questions answered with an option letter; ``meta["options"]`` holds them."""

    max_new_tokens = 16
    per_sample_score = "correct"

    #: The benchmark's official reading of an answer: (prediction, options) -> letter or None.
    official_reader: ClassVar[Callable[[str, Mapping[str, str]], str | None]]

    def read(self, prediction: str, options: Mapping[str, str]) -> str | None:
        reader = extract_choice if self.scoring == "lenient" else type(self).official_reader
        return reader(prediction, options)

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        choice = self.read(prediction, sample.meta["options"])
        return {"choice": choice, "answer": sample.target, "correct": float(choice == sample.target)}

    def aggregate(self, records: Records) -> dict[str, float]:
        return {"accuracy": _mean_percent([r["scores"]["correct"] for r in records])}


class ScienceQAImg(_ChoiceTask):
    name = "scienceqa-img"
    hub_id = source = "lmms-lab/ScienceQA"
    config = "ScienceQA-IMG"
    split = "test"
    required = ("question", "choices", "answer")
    id_column = None
    description = "ScienceQA test, questions with an image (2017); option-letter accuracy, percent"
    official_reader = staticmethod(read_scienceqa)

    def select(self, rows: Any) -> Any:
        with_image = column_arrow(rows, "image").is_valid().to_pylist()
        return rows.select([i for i, present in enumerate(with_image) if present])

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        options = dict(zip(LETTERS, row["choices"]))
        context = f"Context: {row['hint'].strip()}" if (row.get("hint") or "").strip() else None
        answer = int(row["answer"])
        if not 0 <= answer < len(options):
            return broken_sample(sample_id, f"task '{self.name}' row id {sample_id}: field 'answer' = "
                                            f"{answer} is not an option index (0..{len(options) - 1})")
        return Sample(sample_id, choice_prompt(row["question"].strip(), options, context), image,
                      LETTERS[answer], {"options": options})


def _is_option(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan")


class MMBench(_ChoiceTask):
    name = "mmbench"
    hub_id = source = "lmms-lab/MMBench"
    config = "en"
    split = "dev"
    required = ("question", "answer", "A", "B")
    id_column = "index"
    circular_stride: ClassVar[int] = 1_000_000
    official_reader = staticmethod(read_mmbench)
    bootstrap_unit = ("circular_group",)  # CircularEval scores a group's rotations together
    per_sample_score = None  # a group counts only if all its rotations are right
    description = ("MMBench English dev; accuracy by CircularEval: a question counts only if all its "
                   "option-rotated copies (rows sharing index mod 1e6) are right; "
                   "single_pass_accuracy counts rows")

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        options = {letter: str(row[letter]).strip() for letter in "ABCDE" if _is_option(row.get(letter))}
        hint = row.get("hint")
        context = str(hint).strip() if _is_option(hint) else None
        index = int(row["index"]) if row.get("index") is not None else None
        group = index % self.circular_stride if index is not None else sample_id
        return Sample(sample_id, choice_prompt(row["question"].strip(), options, context), image,
                      str(row["answer"]).strip(), {"options": options, "circular_group": group,
                                                   "circular_first": index is None or index < self.circular_stride,
                                                   "category": row.get("category")})

    def aggregate(self, records: Records) -> dict[str, float]:
        """CircularEval over the groups whose first row (index < 1e6) is among the records."""
        groups: dict[Any, bool] = {}
        for r in records:
            key = r["meta"].get("circular_group", r["sample_id"])
            groups[key] = groups.get(key, True) and r["scores"]["correct"] == 1.0
        scored = {r["meta"].get("circular_group", r["sample_id"]) for r in records
                  if r["meta"].get("circular_first", True)}
        return {"accuracy": _mean_percent([float(groups[key]) for key in scored]),
                "single_pass_accuracy": super().aggregate(records)["accuracy"]}


class SEEDBench(_ChoiceTask):
    name = "seedbench"
    hub_id = source = "lmms-lab/SEED-Bench"
    split = "test"
    required = ("question", "answer", "choice_a", "choice_b", "choice_c", "choice_d")
    description = "SEED-Bench image part (14k questions, 9 dimensions); option-letter accuracy, percent"
    official_reader = staticmethod(read_exact_letter)

    def select(self, rows: Any) -> Any:
        """The image part: ``data_type == "image"`` (dimensions 1-9; 10-12 are video)."""
        if "data_type" in rows.column_names:
            keep = [kind == "image" for kind in column_arrow(rows, "data_type").to_pylist()]
        elif "question_type_id" in rows.column_names:
            dimensions = column_arrow(rows, "question_type_id").to_pylist()
            keep = [dimension is not None and int(dimension) <= 9 for dimension in dimensions]
        else:
            return rows
        return rows.select([i for i, image in enumerate(keep) if image])

    def image_loader(self, row: dict[str, Any], label: str) -> Callable[[], Image.Image]:
        cell = row.get("image")  # a list of frames; the image part has exactly one
        first = (cell[0] if cell else None) if isinstance(cell, list) else cell
        return lambda: open_image(first, f"{label} field 'image'")

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        options = {letter: str(row[f"choice_{letter.lower()}"]).strip() for letter in "ABCD"}
        return Sample(sample_id, choice_prompt(row["question"].strip(), options), image,
                      str(row["answer"]).strip(), {"options": options,
                                                   "dimension": row.get("question_type_id")})


BENCHMARKS = (Pope, MME, GQA, TextVQA, ScienceQAImg, MMBench, SEEDBench, VQAv2, VizWiz)


@tokenbench.hookimpl
def register_tasks(register: Callable[[type], None]) -> None:
    for task in BENCHMARKS:
        register(task)
