"""DyCoke's temporal token merging (spec methods-wave2.md §18.2, §18.5-18.7)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenbench.methods.dycoke import DyCoke, reference_frames

from tokenbench import Infeasible, ModelInfo, Site, SiteInput, Stage
from tokenbench.testing import LLAVA_15, VIDEO_LLAVA, check_compressor

LLAVA_OV = ModelInfo(family="llava_onevision", stages=frozenset({Stage.PROJECTOR, Stage.LLM, Stage.DECODE}),
                     grid=(14, 14),
                     n_visual=8 * 196, arch=VIDEO_LLAVA.arch, frames=8)


def video(batch: int, frames: int, n: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, n, width, generator=gen)
    return (base + torch.randn(batch, frames, n, width, generator=gen)).view(batch, frames * n, width)


def site_input(x: torch.Tensor, keep: int, frames: int, grid) -> SiteInput:
    batch, n, _ = x.shape
    return SiteInput(visual=x, origin=torch.arange(n).expand(batch, n).clone(), grid=grid, keep=keep,
                     site=Site(Stage.PROJECTOR), frames=frames)


def slow_ttm(x: torch.Tensor, frames: int, k: float, skip_last_group: bool = False) -> list[list[int]]:
    """§18.2 step by step on the original frames, per video: stage 1 (pairs f, f+1 for even f: frame
    f+1 keeps its int((1-k)·n) least-similar positions), stage 2 (groups f = 0, 4, ...: frame f+2
    keeps its int((1-k)·n) positions least similar to frame f), then the kept positions, sorted."""
    n = x.shape[1] // frames
    m = int((1 - k) * n)
    out = []
    for row in x.double():
        frame = [row[t * n:(t + 1) * n] for t in range(frames)]

        def least_similar(t: int, ref: int, frame=frame) -> list[int]:
            cos = [float(frame[t][i] @ frame[ref][i] / (frame[t][i].norm() * frame[ref][i].norm()))
                   for i in range(n)]
            return sorted(sorted(range(n), key=lambda i: cos[i])[:m])

        kept = {t: list(range(n)) for t in range(frames)}
        for f in range(0, frames - 1, 2):
            kept[f + 1] = least_similar(f + 1, f)
        last = frames - 4 if skip_last_group else frames - 2
        for f in range(0, last, 4):
            kept[f + 2] = least_similar(f + 2, f)
        out.append([t * n + i for t in range(frames) for i in kept[t]])
    return out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k", [0.5, 0.75])
def test_matches_the_slow_reference_on_video_llava_shapes(batch, k):
    frames, n = 8, 256
    x = video(batch, frames, n)
    keep = 2 * n + 6 * int((1 - k) * n)  # per-frame counts equal, as the reference keeps them
    out = DyCoke().reduce(site_input(x, keep, frames, (16, 16)))
    assert out.keep.tolist() == slow_ttm(x, frames, k)
    assert out.values is None and out.extra is None


def test_reference_off_by_one_on_llava_onevision_shapes():
    frames, n, k = 32, 196, 0.7
    x = video(1, frames, n, seed=1)
    whole = reference_frames(frames, "reference").count(-1)
    assert whole == 9  # quirk 1: frame 30 stays whole
    keep = whole * n + (frames - whole) * int((1 - k) * n)
    out = DyCoke(last_group="reference").reduce(site_input(x, keep, frames, (14, 14)))
    assert out.keep.tolist() == slow_ttm(x, frames, k, skip_last_group=True)


@pytest.mark.parametrize("k", [0.3, 0.5, 0.7])
def test_retained_count_is_the_papers_fraction(k):
    """(1 + 3(1-k))/4 · F · n at F a multiple of 4, on LLaVA-OV's 8 x 196 tokens (§18.7a)."""
    fraction = (1 + 3 * (1 - k)) / 4
    budget = fraction * LLAVA_OV.n_visual
    plan = DyCoke(decode=False).schedule(LLAVA_OV.n_visual, budget, LLAVA_OV)
    assert plan == [(Site(Stage.PROJECTOR), round(budget))]
    assert abs(plan[0][1] - budget) <= 0.02 * budget
    out = DyCoke().reduce(site_input(video(2, 8, 196), plan[0][1], 8, (14, 14)))
    assert out.keep.shape[1] == round(budget)
    per_frame = torch.bincount(out.keep[0] // 196, minlength=8)
    assert per_frame[0] == per_frame[4] == 196
    assert per_frame.max() - per_frame[[1, 2, 3, 5, 6, 7]].min() <= 196 - math.floor((1 - k) * 196)


def test_budgets_below_a_quarter_are_infeasible():
    with pytest.raises(Infeasible, match="cannot go below 512"):
        DyCoke().schedule(2048, 256, VIDEO_LLAVA)
    assert DyCoke(decode=False).schedule(2048, 512, VIDEO_LLAVA) == [(Site(Stage.PROJECTOR), 512)]
    out = DyCoke().reduce(site_input(video(1, 8, 256), 512, 8, (16, 16)))
    assert (out.keep[0] // 256).unique().tolist() == [0, 4]  # at 25% only the whole frames remain


def test_an_image_is_infeasible_unless_every_token_is_kept():
    with pytest.raises(Infeasible, match="one frame"):
        DyCoke().schedule(576, 192, LLAVA_15)
    assert DyCoke(decode=False).schedule(576, 576, LLAVA_15) == []


@pytest.mark.parametrize("frames", [2, 3, 4, 5, 7])
def test_few_and_odd_frame_counts_do_not_crash(frames):
    """The reference crashes at F <= 4 and drops the last frame of an odd F (§18.6 quirk 2)."""
    n = 16
    x = video(1, frames, n)
    refs = reference_frames(frames)
    whole = refs.count(-1)
    keep = whole * n + (frames - whole) * 4
    out = DyCoke().reduce(site_input(x, keep, frames, (4, 4)))
    assert out.keep.shape[1] == keep
    assert sorted(set((out.keep[0] // n).tolist())) == list(range(frames))  # every frame is represented


def test_identical_frames_keep_whole_frames_and_the_budget():
    x = video(1, 1, 256).repeat(1, 8, 1)
    out = DyCoke().reduce(site_input(x, 2 * 256 + 6 * 64, 8, (16, 16)))
    per_frame = torch.bincount(out.keep[0] // 256, minlength=8)
    assert per_frame.tolist() == [256, 64, 64, 64, 256, 64, 64, 64]


def test_degenerate_inputs():
    x = video(1, 8, 16)
    assert torch.equal(DyCoke().reduce(site_input(x, 128, 8, (4, 4))).keep, torch.arange(128).unsqueeze(0))
    with pytest.raises(ValueError, match="below"):
        DyCoke().reduce(site_input(x, 1, 8, (4, 4)))
    bad = x.clone()
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        DyCoke().reduce(site_input(bad, 64, 8, (4, 4)))
    partial = site_input(x[:, :100], 64, 8, (4, 4))
    with pytest.raises(ValueError, match="frame-major"):
        DyCoke().reduce(partial)


def test_contract_and_class():
    assert DyCoke(decode=False).flash_attention == "native"
    assert DyCoke().flash_attention == "probe"  # one attention row per decode step
    check_compressor(DyCoke, models=[VIDEO_LLAVA, LLAVA_OV, LLAVA_15])
    check_compressor(DyCoke, {"decode": False}, models=[VIDEO_LLAVA, LLAVA_OV, LLAVA_15])
