"""ApET's Video-LLaVA variant (spec methods.md §2.8): per-frame basis, basis tokens appended."""

from __future__ import annotations

import pytest
import torch
from apet_slow import slow_apet
from tokenbench.methods.apet import ApET

from tokenbench import Infeasible, ModelInfo, Site, SiteInput, Stage
from tokenbench.testing import LLAVA_15, VIDEO_LLAVA

FRAMES, GRID = 8, (16, 16)
PER_FRAME = GRID[0] * GRID[1]


def video(batch: int, width: int = 48, seed: int = 0, frames: int = FRAMES, grid=GRID) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    base = torch.randn(batch, 1, n, width, generator=gen)  # frames share content, as a video does
    return (base + 0.7 * torch.randn(batch, frames, n, width, generator=gen)).view(batch, frames * n, width)


def site_input(x: torch.Tensor, keep: int, frames: int = FRAMES, grid=GRID) -> SiteInput:
    batch, n, _ = x.shape
    return SiteInput(visual=x, origin=torch.arange(n).expand(batch, n).clone(), grid=grid, keep=keep,
                     site=Site(Stage.PROJECTOR), generator=torch.Generator().manual_seed(3), frames=frames)


def slow_video_apet(x: torch.Tensor, frames: int, per_frame_keep: int, basis: int = 10):
    """§2.8 step by step: each frame on its own (FPS from the frame's first token), keep
    ``per_frame_keep - basis`` merged targets, append the frame's basis; frames in time order."""
    n = x.shape[1] // frames
    kept, values, extras = [], [], []
    for b in range(x.shape[0]):
        row_kept, row_values, row_extra = [], [], []
        for t in range(frames):
            frame = x[b:b + 1, t * n:(t + 1) * n]
            keep, vals, extra = slow_apet(frame, per_frame_keep, basis, [0], basis_mode="append")
            row_kept += [t * n + i for i in keep[0]]
            row_values.append(vals[0])
            row_extra.append(extra[0])
        kept.append(row_kept)
        values.append(torch.cat(row_values))
        extras.append(torch.cat(row_extra))
    return kept, torch.stack(values), torch.stack(extras)


@pytest.mark.parametrize("batch", [1, 3])
def test_video_llava_reference_matches_the_slow_per_frame_implementation(batch):
    x = video(batch)
    method = ApET(fps_start="first")
    out = method.reduce(site_input(x, keep=FRAMES * 32))  # 12.5%: 22 merged + 10 basis per frame
    kept, values, extra = slow_video_apet(x, FRAMES, 32)
    assert out.keep.tolist() == kept
    assert out.keep.shape[1] == FRAMES * 22 and out.extra.shape[1] == FRAMES * 10
    torch.testing.assert_close(out.values.double(), values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.extra.double(), extra, rtol=0, atol=0)


def test_llava_onevision_shape_uneven_split():
    """8 x 14x14 = 1568 tokens at 12.5% (196 kept): 24 or 25 per frame, earlier remainders first."""
    x = video(1, grid=(14, 14))
    out = ApET(fps_start="first").reduce(site_input(x, keep=196, grid=(14, 14)))
    per_frame_targets = torch.bincount(out.keep[0] // 196, minlength=FRAMES)
    assert out.keep.shape[1] + out.extra.shape[1] == 196
    assert per_frame_targets.tolist() == [15] * 4 + [14] * 4  # 25/24 kept, 10 of them basis


def test_video_plan_is_one_projector_stage_of_the_budget():
    plan = ApET().schedule(2048, 256, VIDEO_LLAVA)
    assert plan == [(Site(Stage.PROJECTOR), 256)]
    assert ApET().schedule(2048, 2048, VIDEO_LLAVA) == []


def test_video_image_option_runs_the_image_behaviour():
    plan = ApET(video="image").schedule(2048, 256, VIDEO_LLAVA)
    assert [site.stage for site, _ in plan] == [Stage.VISION_OUT, Stage.LLM]  # the two-stage split
    x = video(1)
    out = ApET(video="image", stage2=False, fps_start="first").reduce(site_input(x, keep=256))
    assert out.extra is None and out.keep.shape[1] == 256  # replace mode over all frames at once


def test_images_are_unaffected():
    assert ApET().schedule(576, 192, LLAVA_15) == ApET(video="image").schedule(576, 192, LLAVA_15)
    x = video(2, frames=1, grid=(24, 24))
    one = ApET(fps_start="first").reduce(site_input(x, keep=96, frames=1, grid=(24, 24)))
    assert one.extra is None and one.keep.shape[1] == 96


def test_degenerate_videos():
    method = ApET(fps_start="first")
    x = video(1)
    assert torch.equal(method.reduce(site_input(x, keep=2048)).keep, torch.arange(2048).unsqueeze(0))
    one = method.reduce(site_input(x, keep=1))  # one token in all: frame 0 keeps it, the rest none
    assert one.keep.shape[1] + (0 if one.extra is None else one.extra.shape[1]) == 1
    same = video(1, frames=1).repeat(1, FRAMES, 1)  # identical frames: identical per-frame picks
    out = method.reduce(site_input(same, keep=256))
    local = (out.keep[0] % PER_FRAME).view(FRAMES, -1)
    assert (local == local[:1]).all()
    torch.testing.assert_close(out.extra[0].view(FRAMES, 10, -1), out.extra[0, :10].expand(FRAMES, 10, -1))
    bad = x.clone()
    bad[0, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        method.reduce(site_input(bad, keep=256))
    with pytest.raises(Infeasible, match="less than one"):
        ApET().schedule(2048, 0.5, VIDEO_LLAVA)


def test_video_model_without_projector_stage_falls_back_to_vision_out():
    info = ModelInfo(family="v", stages=frozenset({Stage.VISION_OUT, Stage.LLM}), grid=GRID, n_visual=2048,
                     arch=VIDEO_LLAVA.arch, frames=FRAMES)
    assert ApET().schedule(2048, 256, info) == [(Site(Stage.VISION_OUT), 256)]


def test_each_frames_basis_tokens_stay_in_their_frame():
    """``extra_after``: frame t's 10 basis tokens go after frame t's last token, so once applied the
    sequence is frame t's 22 merged tokens, then its 10 basis tokens, then frame t+1's."""
    from tokenbench.adapters.sites import VisualBlock, apply_reduction

    x = video(2)
    out = ApET(fps_start="first").reduce(site_input(x, keep=FRAMES * 32))
    last = torch.arange(FRAMES).repeat_interleave(10) * PER_FRAME + PER_FRAME - 1
    assert torch.equal(out.extra_after, last.expand(2, -1))
    block = apply_reduction(VisualBlock.fresh(x), out).block
    origin = block.origin[0]
    frame_of_kept = torch.where(origin >= 0, origin.div(PER_FRAME, rounding_mode="floor"), -1)
    expected = torch.cat([torch.cat([torch.full((22,), t), torch.full((10,), -1)]) for t in range(FRAMES)])
    assert torch.equal(frame_of_kept, expected)
    basis = block.tokens[0, origin < 0].view(FRAMES, 10, -1)
    assert torch.equal(basis, out.extra[0].view(FRAMES, 10, -1))
