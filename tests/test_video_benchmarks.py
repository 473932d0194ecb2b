"""MVBench and Video-MME: prompts, answer reading and scoring as lmms-eval defines them, and the
whole path from local rows and mp4 files (written here with PyAV) to sampled frames."""

from __future__ import annotations

import json
import sys
import types

import av
import numpy as np
import pytest
from tokenbench.tasks.hub import SampleError
from tokenbench.tasks.video_benchmarks import (
    MVBENCH_FOLDERS,
    MVBench,
    VideoMME,
    mvbench_prompt,
    read_mvbench,
    read_videomme,
    videomme_prompt,
)

from tokenbench.plugins import load_registry

FRAMES_IN_FILE = 16


@pytest.fixture(autouse=True, scope="module")
def video_reader():
    """``tokenbench.video.read_video`` (its own module, merged from the decoding branch), or, where
    this branch does not have it yet, a stand-in with the same signature and uniform sampling."""
    try:
        import tokenbench.video  # noqa: F401
        yield
        return
    except ImportError:
        pass

    def read_video(path, num_frames=8):
        with av.open(str(path)) as container:
            frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
        if not frames:
            raise ValueError("no frames")
        return [frames[i] for i in np.linspace(0, len(frames) - 1, num_frames).astype(int)]
    module = types.ModuleType("tokenbench.video")
    module.read_video = read_video
    sys.modules["tokenbench.video"] = module
    yield
    del sys.modules["tokenbench.video"]


def write_video(path, frames: int = FRAMES_IN_FILE) -> None:
    """An mp4 whose frame ``i`` is uniformly grey at level 12·i (so the sampled indices show)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), 12 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def grey_levels(frames) -> list[int]:
    return [round(float(np.asarray(f).mean()) / 12) for f in frames]


# ----------------------------------------------------------------------------------- MVBench


def test_mvbench_prompt_is_lmms_evals():
    assert mvbench_prompt("What moves?", ["the cube", "the sphere"]) == (
        "Question:What moves?\nOption:\n(A) the cube\n(B) the sphere\nOnly give the best option.\n")


@pytest.mark.parametrize(("reply", "read"), [
    ("B. the sphere", "B"), ("(C)", "C"), ("The answer is D", "D"), ("c", "C"),
    ("a sphere", "A"),  # lmms-eval's reading takes the article for option A
    ("the sphere", "the sphere"), ("", ""),
    ('(A)C)"', "A"),  # a mark is removed or spaced out by whether it stood by a space in the reply as given
])
def test_mvbench_reading(reply, read):
    assert read_mvbench(reply) == read


def test_mvbench_accuracy_leaves_out_empty_answers():
    task = MVBench()
    sample = types.SimpleNamespace(target="B")
    scores = [task.score(sample, reply) for reply in ("B", "(B) cube", "A", "")]
    records = [{"scores": s, "meta": {"subtask": "moving_direction"}} for s in scores]
    metrics = task.aggregate(records)
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert metrics["accuracy/moving_direction"] == pytest.approx(200 / 3)


@pytest.fixture(scope="module")
def mvbench_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvbench")
    for k, (subtask, folder) in enumerate(MVBENCH_FOLDERS.items()):
        rows = [{"video": f"{subtask}.mp4", "question": f"Question {k}?", "candidates": ["yes", "no", "maybe"],
                 "answer": ["yes", "no", "maybe"][k % 3]}]
        (root / "json").mkdir(exist_ok=True)
        (root / "json" / f"{subtask}.json").write_text(json.dumps(rows))
        if subtask == "moving_direction":
            write_video(root / "video" / folder / f"{subtask}.mp4")
        elif subtask == "action_antonym":
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{subtask}.mp4").write_bytes(b"not a video")
    return root


def test_mvbench_from_local_rows_and_videos(mvbench_dir):
    assert load_registry().task("mvbench") is MVBench
    samples = {s.meta["subtask"]: s for s in MVBench(mvbench_dir).samples()}
    assert set(samples) == set(MVBENCH_FOLDERS)
    sample = samples["moving_direction"]
    k = list(MVBENCH_FOLDERS).index("moving_direction")
    assert sample.image is None and sample.target == "ABC"[k % 3]
    assert sample.prompt == mvbench_prompt(f"Question {k}?", ["yes", "no", "maybe"])
    frames = sample.load_video()
    assert len(frames) == 8 and frames[0].size == (64, 48)
    assert grey_levels(frames) == np.linspace(0, FRAMES_IN_FILE - 1, 8).astype(int).tolist()
    with pytest.raises(SampleError, match="does not decode"):
        samples["action_antonym"].load_video()
    with pytest.raises(SampleError, match="video not found"):
        samples["state_change"].load_video()
    assert len(list(MVBench(mvbench_dir).samples(limit=3))) == 3
    broken = MVBench(mvbench_dir).sample_from(0, {"subtask": "moving_direction", "video": "moving_direction.mp4",
                                                  "question": "", "candidates": ["a", "b"], "answer": "a"})
    assert broken.image is None
    with pytest.raises(SampleError, match="field 'question' is empty"):
        broken.load_video()


# ----------------------------------------------------------------------------------- Video-MME


def test_videomme_prompt_is_lmms_evals():
    assert videomme_prompt("Who sings?", ["A. a cat", "B. a dog", "C. nobody", "D. a bird"]) == (
        "Select the best answer to the following multiple-choice question based on the video and the "
        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\nWho sings?\n"
        "A. a cat\nB. a dog\nC. nobody\nD. a bird\n\nAnswer with the option's letter from the given choices directly.")


@pytest.mark.parametrize(("reply", "read"), [
    ("B", "B"), ("The best answer is C.", "C"), ("(D) a bird", "D"), ("a dog", ""),
    ("The answer is that nobody sings in this video at any moment of it", ""),
    ("The best option is B", "B"),  # "The best option is" is not a dropped prefix (its "T" is not A-D)
])
def test_videomme_reading(reply, read):
    assert read_videomme(reply) == read


@pytest.fixture(scope="module")
def videomme_dir(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("videomme")
    rows = [{"video_id": "001", "duration": duration, "domain": "Knowledge", "sub_category": "Astronomy",
             "url": "", "videoID": video, "question_id": f"001-{k}", "task_type": "Counting Problem",
             "question": f"How many {k}?", "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "ABCD"[k]}
            for k, (video, duration) in enumerate([("vidA", "short"), ("vidA", "short"), ("vidB", "long")])]
    (root / "videomme").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(root / "videomme" / "test-00000-of-00001.parquet"))
    write_video(root / "data" / "vidA.mp4", frames=5)  # shorter than 8 frames: frames repeat
    return root


def test_videomme_from_local_rows_and_videos(videomme_dir):
    assert load_registry().task("videomme") is VideoMME
    task = VideoMME(videomme_dir)
    samples = list(task.samples())
    assert [s.id for s in samples] == ["001-0", "001-1", "001-2"]
    assert samples[1].target == "B" and samples[1].meta == {"duration": "short", "task_type": "Counting Problem",
                                                             "video": "vidA"}
    assert grey_levels(samples[0].load_video()) == np.linspace(0, 4, 8).astype(int).tolist()
    with pytest.raises(SampleError, match="video not found"):
        samples[2].load_video()
    records = [{"scores": task.score(s, reply), "meta": s.meta} for s, reply in zip(samples, ["A", "C", "D"])]
    metrics = task.aggregate(records)
    assert metrics["accuracy"] == pytest.approx(100 / 3)
    assert metrics["accuracy/short"] == 50.0 and metrics["accuracy/long"] == 0.0
    assert "local copy" in task.provenance()["dataset"]


# ----------------------------------------------------------------------------------- frames per video


def test_frames_default_to_the_model_familys_evaluation_and_reach_the_task(request, mvbench_dir):
    """Video-LLaVA samples 8 frames, LLaVA-OneVision 32 (lmms-eval's default), ``--frames`` overrides
    both; the video benchmark decodes that many and says so in its provenance."""
    from tokenbench.config import RunConfig
    from tokenbench.models import resolve_model
    from tokenbench.runner import load_task, video_frames

    registry = load_registry()

    def config(fixture: str, frames: int | None = None) -> RunConfig:
        model = resolve_model(str(request.getfixturevalue(fixture)), registry)
        return RunConfig(model=model, methods=[], budgets=[], tasks=["mvbench"], data_dir=mvbench_dir,
                         frames=frames)

    assert video_frames(config("tiny_video_llava_dir"), registry) == 8
    onevision = config("tiny_llava_onevision_dir")
    assert video_frames(onevision, registry) == 32
    assert video_frames(config("tiny_llava_onevision_dir", frames=12), registry) == 12
    task, samples = load_task("mvbench", onevision, registry, video_frames(onevision, registry))
    moving = next(s for s in samples if s.meta["subtask"] == "moving_direction")
    frames = moving.load_video()
    assert len(frames) == 32 and task.provenance()["frames"] == 32
    assert grey_levels(frames) == np.linspace(0, FRAMES_IN_FILE - 1, 32).astype(int).tolist()
    shapes, _ = load_task("shapes-video", onevision, registry, 32)  # its clips have 8 frames, whatever --frames
    assert not hasattr(shapes, "frames")


def test_frames_must_be_positive(tmp_path):
    from click.testing import CliRunner

    from tokenbench.cli import cli

    result = CliRunner().invoke(cli, ["run", "--tasks", "shapes-video", "--frames", "0", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "--frames" in result.output and "Traceback" not in result.output


def test_a_run_with_other_frames_does_not_reuse_finished_samples(request, mvbench_dir, tmp_path):
    from click.testing import CliRunner

    from tokenbench.cli import cli

    model = str(request.getfixturevalue("tiny_video_llava_dir"))
    for frames in (4, 6):
        result = CliRunner().invoke(cli, ["run", "--model", model, "--tasks", "mvbench", "--data-dir", str(mvbench_dir),
                                          "--methods", "random", "--budgets", "50%", "--no-efficiency",
                                          "--frames", str(frames), "--output", str(tmp_path)])
        assert result.exit_code == 0 and "already done" not in result.output, result.output
    runs = sorted((tmp_path / "runs").glob("*mvbench__none*"))  # one record per frame count, kept apart
    assert sorted(json.loads(r.read_text())["provenance"]["frames"] for r in runs) == [4, 6]
