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


def _extra_after(n: int, width: int, after: int) -> tuple[VisualBlock, torch.Tensor]:
    block = VisualBlock.fresh(torch.randn(1, n, width))
    extra = torch.full((1, 2, width), -7.0)
    reduction = Reduction(torch.arange(n)[None], extra=extra, extra_after=torch.tensor([[after, after]]))
    return apply_reduction(block, reduction).block, extra[0, 0]


def test_video_llava_extra_after_stays_in_its_frame(request):
    """Two tokens placed after frame 0's last patch come before frame 1's CLS token."""
    a = VideoLlavaAdapter.load(str(request.getfixturevalue("tiny_video_llava_dir")))
    frames = 2
    encoded = a._encode([Prompt(None, "how many ?", video=[image(t, 224) for t in range(frames)])])
    width = a.model.config.text_config.hidden_size
    encoded.frame_cls = torch.randn(1, frames, width)
    per_frame = encoded.n_visual // frames
    block, extra = _extra_after(encoded.n_visual, width, per_frame - 1)
    span = a._span(encoded, block)
    tokens, origin = span.block.tokens[0], span.block.origin[0]
    at = 1 + per_frame  # frame 0's CLS, its patches, then the two extras, then frame 1's CLS
    assert (origin[at:at + 2] == -1).all() and torch.equal(tokens[at], extra)
    assert torch.equal(tokens[at + 2], encoded.frame_cls[0, 1])
    assert torch.equal(span.source[0, at:at + 2], torch.tensor([-1, -1]))


def test_llava_next_extra_after_precedes_its_rows_newline(request):
    a = LlavaNextAdapter.load(str(request.getfixturevalue("tiny_llava_next_dir")))
    encoded = a._encode([Prompt(image(0, 150).resize((150, 100)), "how many ?")])
    width = a.model.config.text_config.hidden_size
    block, extra = _extra_after(encoded.n_visual, width, 0)
    span = a._span(encoded, block)
    origin = span.block.origin[0]
    first_newline = int((origin == NEWLINE).nonzero()[0])
    extras = (origin == -1).nonzero().flatten()
    assert extras.tolist() == [1, 2] and first_newline > 2  # right after token 0, in its row
    assert torch.equal(span.block.tokens[0, 1], extra)


def test_anchored_source_gives_interior_extras_the_position_before_them():
    from tokenbench.adapters.sites import anchored_source

    source = torch.tensor([[-1, 0, 3, -1, -1, 5, -1, 6, -1]])
    origin = torch.tensor([[-1, 0, 3, -1, -1, 5, -1, NEWLINE, -1]])  # a layout token after the last visual one
    assert anchored_source(source, origin).tolist() == [[-1, 0, 3, 3, 3, 5, -1, 6, -1]]


def test_extra_after_is_checked():
    import pytest

    from tokenbench import Site, SiteInput, Stage

    x = SiteInput(visual=torch.randn(1, 6, 4), origin=torch.arange(6)[None], grid=(2, 3), keep=4,
                  site=Site(Stage.PROJECTOR))
    extra = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="one place per extra token"):
        Reduction(torch.tensor([[0, 1]]), extra=extra, extra_after=torch.tensor([[1]])).check(x)
    with pytest.raises(ValueError, match=r"lie in \[0, 6\)"):
        Reduction(torch.tensor([[0, 1]]), extra=extra, extra_after=torch.tensor([[1, 6]])).check(x)
    Reduction(torch.tensor([[0, 1]]), extra=extra, extra_after=torch.tensor([[1, 5]])).check(x)
