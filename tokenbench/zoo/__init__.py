"""The embedded default model(s): training code and small checkpoints shipped as package data.

``EMBEDDED`` maps a model name to its checkpoint directory inside the package; the directory loads
with ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` like
any hub checkpoint. ``python -m tokenbench.zoo.train`` rebuilds it.

``tiny-video-llava-shapes`` (``VideoLlavaForConditionalGeneration``; ``python -m
tokenbench.zoo.train_video`` rebuilds it) ships its tokenizer and image processor rather than a
``VideoLlavaProcessor``, whose video processor needs torchvision: load them with ``AutoTokenizer``
and ``AutoImageProcessor``; ``processor_config.json`` holds the placeholder geometry.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_MODEL = "tiny-llava-shapes"
EMBEDDED: dict[str, Path] = {DEFAULT_MODEL: CHECKPOINTS / DEFAULT_MODEL}
# the video default: Video-LLaVA, 8 frames of 65 tokens (64 patches and the CLS token)
EMBEDDED["tiny-video-llava-shapes"] = CHECKPOINTS / "tiny-video-llava-shapes"
