"""Video decoding (PyAV): the uniform frame rule, the frames a written file decodes to, clear errors,
and a corrupt video failing its sample only in a ``tokenbench run``."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from tokenbench.cli import cli
from tokenbench.video import VideoError, read_video, uniform_frame_indices

PLUGINS = Path(__file__).parent / "video_plugins"
STEP = 12  # grey level per frame index


def write_video(path: Path, frames: int, size: int = 32) -> Path:
    """An MPEG-4 file whose frame ``i`` is a flat grey of level ``STEP·i``."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            pixels = np.full((size, size, 3), STEP * index, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_index(image) -> int:
    return round(float(np.asarray(image).mean()) / STEP)


def test_uniform_indices_follow_video_llava():
    assert uniform_frame_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]  # floor(linspace(0, 19, 8))
    assert uniform_frame_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]
    assert uniform_frame_indices(1, 2) == [0, 0]
    with pytest.raises(ValueError, match="at least one frame"):
        uniform_frame_indices(0, 8)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # Matroska declares no frame count: counted by decoding
def test_read_video_returns_the_sampled_frames(tmp_path, suffix):
    path = write_video(tmp_path / f"clip{suffix}", 20)
    with av.open(str(path)) as container:
        assert (container.streams.video[0].frames == 0) == (suffix == ".mkv")
    frames = read_video(path, 8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    assert [frame_index(f) for f in frames] == [0, 2, 5, 8, 10, 13, 16, 19]
    assert [frame_index(f) for f in read_video(write_video(tmp_path / "short.mp4", 3), 4)] == [0, 0, 1, 2]


def test_unreadable_videos_raise_a_clear_error(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoError, match="cannot decode the video '.*corrupt.mp4'"):
        read_video(corrupt)
    with pytest.raises(VideoError, match="cannot decode the video '.*missing.mp4'"):
        read_video(tmp_path / "missing.mp4")


def test_corrupt_video_fails_its_sample_in_a_run(tiny_video_llava_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", 12)
    (videos / "b.mp4").write_bytes(b"\x00garbage" * 100)
    write_video(videos / "c.mp4", 5)
    output = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--plugins-dir", str(PLUGINS), "run", "--model", str(tiny_video_llava_dir),
                                      "--tasks", "tiny-video", "--methods", "random", "--budgets", "25%",
                                      "--no-efficiency", "--output", str(output), "--json"],
                                env={"TINY_VIDEO_DIR": str(videos)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    records = {(r["method"], r["sample_id"]): r for r in records if r["kind"] == "sample"}
    for method in ("none", "random"):
        assert records[(method, "b")]["error"].startswith("video: ")
        assert "cannot decode the video" in records[(method, "b")]["error"]
        assert records[(method, "a")]["error"] is None and records[(method, "c")]["error"] is None
    trace = records[("random", "a")]["trace"]
    assert trace["n_visual"] == 4 * 256 and trace["plan"] == [["vision_out", 0, 256]]
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    assert rows["random"]["n_errors"] == 1 and rows["random"]["n_samples"] == 3
