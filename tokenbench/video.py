"""Video files to sampled frames, through PyAV (``av``, in the ``data`` extra; FFmpeg inside its wheels).

Frames are sampled uniformly as Video-LLaVA's evaluation does (its LanguageBind video processor,
decord backend): of a video of ``T`` decoded frames it takes frame indices
``floor(linspace(0, T − 1, F))``, F = 8, the first and last frame included; a video shorter than F
frames repeats frames. Tasks wrap :func:`read_video` in a zero-argument callable for
``Sample.video``, so a video that cannot be read fails its sample only, with the error recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: Frames per video in Video-LLaVA's evaluation.
VIDEO_LLAVA_FRAMES = 8


class VideoError(ValueError):
    """A video file that cannot be decoded (missing, corrupt, no video stream, no frames)."""


def uniform_frame_indices(total: int, count: int) -> list[int]:
    """``floor(linspace(0, total − 1, count))``: ``count`` indices spread evenly over ``total``
    frames, first and last included (Video-LLaVA's rule; repeats when ``total < count``)."""
    if total < 1 or count < 1:
        raise ValueError(f"need at least one frame to sample and to return, got total={total}, count={count}")
    return np.linspace(0, total - 1, count).astype(np.int64).tolist()


def read_video(path: str | Path, num_frames: int = VIDEO_LLAVA_FRAMES) -> list[Image.Image]:
    """``num_frames`` RGB frames of the video at ``path``, sampled by :func:`uniform_frame_indices`
    over the frames the file decodes to (counted by decoding where the container does not say)."""
    try:
        import av
    except ImportError as exc:
        raise VideoError("reading videos needs PyAV: pip install 'tokenbench[data]' (or pip install av)") from exc
    path = Path(path)
    try:
        total = _declared_frames(av, path)
        frames = _decode_at(av, path, uniform_frame_indices(total, num_frames)) if total else {}
        if not total or len(frames) < len(set(uniform_frame_indices(total, num_frames))):
            total = _decode_at(av, path, None)  # the container omitted or overstated the count
            if not total:
                raise VideoError(f"the video '{path}' has no decodable frames")
            frames = _decode_at(av, path, uniform_frame_indices(total, num_frames))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"cannot decode the video '{path}': {exc}") from exc
    return [frames[i] for i in uniform_frame_indices(total, num_frames)]


def _declared_frames(av: Any, path: Path) -> int:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError(f"the file '{path}' has no video stream")
        return int(container.streams.video[0].frames or 0)


def _decode_at(av: Any, path: Path, wanted: list[int] | None) -> Any:
    """The frames at indices ``wanted`` as ``{index: image}``; with ``wanted=None``, the number of
    frames the video decodes to."""
    targets = None if wanted is None else set(wanted)
    found: dict[int, Image.Image] = {}
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            count = index + 1
            if targets is not None and index in targets:
                found[index] = frame.to_image().convert("RGB")
                if len(found) == len(targets):
                    break
    return count if wanted is None else found
