"""``Reduction.prefix`` on families with layout tokens in the visual span (LLaVA-NeXT newlines,
Video-LLaVA per-frame CLS): the prefix leads the span, before every layout token, and extras follow."""

from __future__ import annotations

import torch
from adapter_tools import image

from tokenbench import Reduction
from tokenbench.adapters.base import Prompt
from tokenbench.adapters.llava_next import LlavaNextAdapter
from tokenbench.adapters.sites import NEWLINE, VisualBlock, apply_reduction
from tokenbench.adapters.video_llava import VideoLlavaAdapter


def _with_prefix_and_extra(n: int, width: int) -> tuple[VisualBlock, torch.Tensor, torch.Tensor]:
    block = VisualBlock.fresh(torch.randn(1, n, width))
    prefix, extra = torch.full((1, 1, width), 7.0), torch.full((1, 1, width), -7.0)
    applied = apply_reduction(block, Reduction(torch.arange(0, n, 2)[None], prefix=prefix, extra=extra))
    return applied.block, prefix[0, 0], extra[0, 0]


def _check(span, prefix: torch.Tensor, extra: torch.Tensor, n_layout: int) -> None:
    tokens, origin = span.block.tokens[0], span.block.origin[0]
    assert torch.equal(tokens[0], prefix) and int(origin[0]) == -1 and int(span.source[0, 0]) == -1
    assert torch.equal(tokens[-1], extra) and int(origin[-1]) == -1
    assert int((origin == NEWLINE).sum()) == n_layout


def test_llava_next_prefix_precedes_the_newlines(request):
    a = LlavaNextAdapter.load(str(request.getfixturevalue("tiny_llava_next_dir")))
    encoded = a._encode([Prompt(image(0, 150).resize((150, 100)), "how many ?")])
    block, prefix, extra = _with_prefix_and_extra(encoded.n_visual, a.model.config.text_config.hidden_size)
    span = a._span(encoded, block)
    _check(span, prefix, extra, encoded.n_span - encoded.n_visual)


def test_video_llava_prefix_precedes_the_first_frames_cls(request):
    a = VideoLlavaAdapter.load(str(request.getfixturevalue("tiny_video_llava_dir")))
    frames = 2
    encoded = a._encode([Prompt(None, "how many ?", video=[image(t, 224) for t in range(frames)])])
    width = a.model.config.text_config.hidden_size
    encoded.frame_cls = torch.randn(1, frames, width)
    block, prefix, extra = _with_prefix_and_extra(encoded.n_visual, width)
    span = a._span(encoded, block)
    _check(span, prefix, extra, frames)
    assert torch.equal(span.block.tokens[0, 1], encoded.frame_cls[0, 0])  # then frame 0's CLS
