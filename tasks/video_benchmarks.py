"""Real video benchmarks, multiple choice (no judge model): MVBench and Video-MME.

Rows come from the hub through ``datasets`` (or a local copy with the same schema, ``--data-dir``);
the videos are files next to them, decoded by :func:`tokenbench.video.read_video` into
``frames`` uniformly sampled frames (8, Video-LLaVA's; the harness may set the model's count). A
video that is missing or does not decode fails its sample only, with the error recorded.

Prompts and scoring follow lmms-eval's task definitions:

============ ============================== ============================================================
task         rows (hub id, subset / split)  prompt; scoring
============ ============================== ============================================================
mvbench      OpenGVLab/MVBench, 20 subsets  ``Question:{q}\\nOption:\\n(A) ..\\n(B) ..\\nOnly give the best
             (one per subtask) / train      option.\\n``; lmms-eval's ``mcq_acc`` letter reading; accuracy
                                            over the answered questions (an empty answer is left out)
videomme     lmms-lab/Video-MME / test      the "select the best answer" instruction, question, options
                                            (``A. ..``), "Answer with the option's letter from the given
                                            choices directly."; Video-MME's own letter extraction,
                                            accuracy over all questions, per duration and task type
============ ============================== ============================================================

Where the videos are (``root``: ``--data-dir`` when given, else the cache directory lmms-eval
downloads them to, ``$HF_HOME/mvbench_video`` and ``$HF_HOME/videomme``):

- MVBench: ``root/<subtask folder>/<video>`` (folders as in the MVBench repository: ``clevrer/
  video_validation``, ``star/Charades_segment``, ...), also under ``root/video/`` and, for CLEVRER
  and STAR, ``root/data0613/``; the rows may also be the repository's ``json/<subtask>.json``.
- Video-MME: ``root/data/<videoID>.mp4`` (or ``.MP4``, ``.mkv``).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from tokenbench.tasks.base import Sample, TaskDataError
from tokenbench.tasks.hub import SampleError, load_first, require_datasets
from tokenbench.tasks.hub_task import HubTask

import tokenbench

Records = Sequence[Mapping[str, Any]]
DEFAULT_FRAMES = 8  # Video-LLaVA's evaluation


def _hf_home() -> Path:
    return Path(os.path.expanduser(os.getenv("HF_HOME", "~/.cache/huggingface")))


def video_loader(candidates: Sequence[Path], frames: int, where: str) -> Callable[[], list[Image.Image]]:
    """A zero-argument decoder of the first existing file of ``candidates`` into ``frames`` frames;
    raises :class:`SampleError` naming ``where`` when none exists or it does not decode."""
    def load() -> list[Image.Image]:
        from tokenbench.video import read_video

        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise SampleError(f"{where}: video not found (looked for {candidates[0]})")
        try:
            return read_video(path, frames)
        except Exception as exc:  # noqa: BLE001 -- any decoding failure fails this sample only
            raise SampleError(f"{where}: the video does not decode ({type(exc).__name__}: {exc})") from None
    return load


class VideoHubTask(HubTask):
    """A hub benchmark whose samples are videos (``Sample.video``, ``image=None``)."""

    image_column = None
    video_cache: ClassVar[str] = ""  # lmms-eval's download folder under $HF_HOME

    def __init__(self, data_dir: str | Path | None = None, frames: int = DEFAULT_FRAMES) -> None:
        super().__init__(data_dir)
        self.frames = frames

    @property
    def video_root(self) -> Path:
        return self.data_dir if self.data_dir is not None else _hf_home() / self.video_cache

    def video_paths(self, row: dict[str, Any]) -> list[Path]:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"frames": self.frames}

    def sample_from(self, index: int, row: dict[str, Any]) -> Sample:
        sample = super().sample_from(index, row)
        if "error" in sample.meta:  # an unusable row: its video, not an image, fails to load
            sample.video, sample.image = sample.image, None
        return sample

    def image_loader(self, row: dict[str, Any], label: str) -> Callable[[], list[Image.Image]]:
        return video_loader(self.video_paths(row), self.frames, label)

    def make_sample(self, sample_id: str, row: dict[str, Any], video: Callable[[], list[Image.Image]]) -> Sample:
        prompt, target, meta = self.describe(row)
        return Sample(sample_id, prompt, None, target, meta, video=video)

    def describe(self, row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """(prompt, target letter, meta) of one row."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------- MVBench

#: subtask → folder of its videos in the MVBench repository
MVBENCH_FOLDERS = {
    "action_sequence": "star/Charades_segment", "moving_count": "clevrer/video_validation",
    "action_prediction": "star/Charades_segment", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "action_antonym": "ssv2_video_mp4", "action_count": "perception/videos",
    "scene_transition": "scene_qa/video", "object_shuffle": "perception/videos",
    "object_existence": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "unexpected_action": "FunQA_test/test", "moving_direction": "clevrer/video_validation",
    "state_change": "perception/videos", "object_interaction": "star/Charades_segment",
    "character_order": "perception/videos", "action_localization": "sta/sta_video_segment",
    "counterfactual_inference": "clevrer/video_validation", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "moving_attribute": "clevrer/video_validation", "egocentric_navigation": "vlnqa",
}
MVBENCH_POST_PROMPT = "Only give the best option.\n"
# lmms-eval's answer normalisation (the VQA punctuation rule): these are removed or spaced out
_MCQ_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # lmms-eval's pattern, its typo ("?!<=") included
_LETTER_DOT = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LETTER_WORD = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def mvbench_prompt(question: str, candidates: Sequence[str]) -> str:
    options = "".join(f"({string.ascii_uppercase[i]}) {option}\n" for i, option in enumerate(candidates))
    return f"Question:{question}\nOption:\n{options}{MVBENCH_POST_PROMPT}"


def read_mvbench(text: str) -> str:
    """lmms-eval's MVBench reading of an answer: "B. a cat" → "B"; else, after its punctuation
    clean-up, the first standalone letter A-E in any case (so the article "a" reads as "A"); else
    the cleaned, lower-cased text itself (which never equals a letter)."""
    led = _LETTER_DOT.match(text.strip())
    if led:
        return led.group(1).upper()
    original = text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = bool(_COMMA_IN_NUMBER.search(original))
    for mark in _MCQ_PUNCT:  # whether a mark is removed or spaced out depends on the text as it came
        removed = spaced or mark + " " in original or " " + mark in original
        text = text.replace(mark, "" if removed else " ")
    text = _LONE_PERIOD.sub("", text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = _LETTER_WORD.search(text)
    return letter.group(1).upper() if letter else text


class MVBench(VideoHubTask):
    name = "mvbench"
    primary_metric = "accuracy"
    metric_scale = 100.0
    max_new_tokens = 16
    hub_id = source = "OpenGVLab/MVBench"
    split = "train"
    required = ("video", "question", "candidates", "answer")
    id_column = None
    video_cache = "mvbench_video"
    description = ("MVBench, 20 temporal subtasks (4000 multiple-choice questions on short videos); "
                   "accuracy over answered questions, lmms-eval's letter reading")

    @property
    def hub_ids(self) -> tuple[str, ...]:
        return (self.hub_id,)

    def rows(self) -> Any:
        datasets = require_datasets(self.name)
        parts = []
        for subtask in MVBENCH_FOLDERS:
            rows = self._subtask_rows(datasets, subtask)
            self.check_columns(rows, self.required)
            keep = [c for c in rows.column_names if c in self.required]
            parts.append(rows.select_columns(keep).add_column("subtask", [subtask] * len(rows)))
        return datasets.concatenate_datasets(parts)

    def _subtask_rows(self, datasets: Any, subtask: str) -> Any:
        """A subtask's rows: the repository's ``json/<subtask>.json`` in a local copy, else the
        hub subset (or a local parquet / ``save_to_disk`` copy of it)."""
        if self.data_dir is not None:
            for base in (self.data_dir, self.data_dir / "MVBench"):
                file = base / "json" / f"{subtask}.json"
                if file.is_file():
                    self.dataset_source = f"{self.hub_id} (local copy {self.data_dir})"
                    return datasets.load_dataset("json", data_files=str(file), split="train")
        rows, self.dataset_source = load_first(self.name, self.hub_ids, subtask, self.split, self.data_dir)
        return rows

    def sample_id(self, index: int, row: dict[str, Any]) -> str:
        return f"{row['subtask']}-{index}"

    def video_paths(self, row: dict[str, Any]) -> list[Path]:
        folder = MVBENCH_FOLDERS[row["subtask"]]
        name = str(row.get("video") or "")
        root = self.video_root
        return [root / folder / name, root / "video" / folder / name, root / "data0613" / folder / name,
                root / "video" / "data0613" / folder / name]

    def describe(self, row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        candidates = [str(c) for c in row["candidates"]]
        if row["answer"] not in candidates:
            raise TaskDataError(f"task 'mvbench': the answer {row['answer']!r} is not one of the candidates "
                                f"{candidates} (subtask {row['subtask']}, video {row['video']})")
        letter = string.ascii_uppercase[candidates.index(row["answer"])]
        return mvbench_prompt(row["question"], candidates), letter, {"subtask": row["subtask"]}

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        read = read_mvbench(prediction)
        return {"prediction": read, "answered": float(prediction != ""),
                "correct": float(read == read_mvbench(str(sample.target)))}

    def aggregate(self, records: Records) -> dict[str, float]:
        def accuracy(chosen: Records) -> float:
            answered = [r for r in chosen if r["scores"]["answered"]]
            return 100.0 * sum(r["scores"]["correct"] for r in answered) / len(answered) if answered else 0.0
        result = {"accuracy": accuracy(records)}
        for subtask in MVBENCH_FOLDERS:
            chosen = [r for r in records if r["meta"].get("subtask") == subtask]
            if chosen:
                result[f"accuracy/{subtask}"] = accuracy(chosen)
        return result


# ----------------------------------------------------------------------------------- Video-MME

VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video "
                        "and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
VIDEOMME_DURATIONS = ("short", "medium", "long")
# Video-MME's answer prefixes, dropped before the letter is looked for; two pairs run together as
# in the reference list (a missing comma), so "The best option is" alone is not dropped
_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option isThe correct option is", "Best answer:Best option:")


def videomme_prompt(question: str, options: Sequence[str]) -> str:
    """lmms-eval's default Video-MME prompt (its instruction mentions subtitles even without them)."""
    return f"{VIDEOMME_INSTRUCTION}\n{question}\n" + "\n".join(options) + f"\n{VIDEOMME_POST_PROMPT}"


def read_videomme(text: str) -> str:
    """Video-MME's letter extraction: drop the answer prefixes, then the first capital A-D anywhere
    in the reply; "" (unanswered, scored wrong) when there is none."""
    text = text.strip()
    for prefix in _VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(r"[ABCD]", text)
    if found is None:
        return ""
    return found.group(0)


class VideoMME(VideoHubTask):
    name = "videomme"
    primary_metric = "accuracy"
    metric_scale = 100.0
    max_new_tokens = 16
    hub_id = source = "lmms-lab/Video-MME"
    split = "test"
    required = ("videoID", "question", "options", "answer", "duration", "task_type")
    id_column = "question_id"
    video_cache = "videomme"
    bootstrap_unit = ("video",)
    description = ("Video-MME without subtitles (2700 four-way questions on short, medium and long videos); "
                   "accuracy, Video-MME's letter extraction")

    def video_paths(self, row: dict[str, Any]) -> list[Path]:
        folder = self.video_root / "data"
        video = str(row.get("videoID") or "")
        return [folder / f"{video}{suffix}" for suffix in (".mp4", ".MP4", ".mkv")]

    def describe(self, row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        return (videomme_prompt(row["question"], [str(o) for o in row["options"]]), str(row["answer"]).strip(),
                {"duration": row["duration"], "task_type": row["task_type"], "video": row["videoID"]})

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        read = read_videomme(prediction)
        return {"prediction": read, "correct": float(read.lower() == str(sample.target).lower())}

    def aggregate(self, records: Records) -> dict[str, float]:
        def accuracy(chosen: Records) -> float:
            return 100.0 * sum(r["scores"]["correct"] for r in chosen) / len(chosen) if chosen else 0.0
        result = {"accuracy": accuracy(records)}
        for key in ("duration", "task_type"):
            for value in sorted({str(r["meta"].get(key)) for r in records}):
                result[f"accuracy/{value}"] = accuracy([r for r in records if str(r["meta"].get(key)) == value])
        return result


@tokenbench.hookimpl
def register_tasks(register):
    register(MVBench)
    register(VideoMME)
