"""CDPruner against a slow re-implementation of spec ``methods-wave2.md`` §16.2, plus §16.6's checks."""

from __future__ import annotations

import math

import pytest
import torch
from tokenbench.methods.cdpruner import CDPruner, CDPrunerLLMText, conditional_kernel, dpp_greedy
from wave2_inputs import LLAVA_PROJECTED, QWEN_PROJECTED, clustered_tokens

from tokenbench import Site, SiteInput, Stage
from tokenbench.testing import LLAVA_15, QWEN2_VL

CLIP_WIDTH = 768


def slow_cdpruner(visual: torch.Tensor, clip_visual: torch.Tensor, clip_text: torch.Tensor, keep: int,
                  batch_minmax: bool = False) -> list[list[int]]:
    """Spec §16.2 step 5's relevance (negated cosine, mean over the text rows), then ``slow_dpp``."""
    relevance = []
    for b in range(visual.shape[0]):
        e = clip_visual[b] / clip_visual[b].norm(dim=1, keepdim=True)
        t = clip_text[b] / clip_text[b].norm(dim=1, keepdim=True)
        relevance.append((-(e @ t.t())).mean(dim=1))
    return slow_dpp(visual, torch.stack(relevance), keep, batch_minmax)


def slow_dpp(visual: torch.Tensor, relevance: torch.Tensor, keep: int, batch_minmax: bool = False) -> list[list[int]]:
    """Spec §16.2 steps 4-8, image by image and pick by pick, from the raw relevance [B, N]: min-max
    per image (§16.4) or over the batch (the reference)."""
    if batch_minmax:
        relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    else:
        low, high = relevance.min(dim=1, keepdim=True).values, relevance.max(dim=1, keepdim=True).values
        relevance = (relevance - low + 1e-6) / (high - low)
    out = []
    for b in range(visual.shape[0]):
        x = visual[b] / visual[b].norm(dim=1, keepdim=True)
        kernel = relevance[b][:, None] * (x @ x.t()) * relevance[b][None, :]  # steps 4 and 6
        d2 = kernel.diagonal().clone()  # step 7
        factors: list[torch.Tensor] = []
        chosen: list[int] = []
        for _ in range(keep):
            j = int(torch.argmax(d2))
            e = kernel[j].clone()
            for c in factors:
                e -= c[j] * c
            e /= math.sqrt(float(d2[j]))
            factors.append(e)
            d2 -= e * e
            d2[j] = -float("inf")
            chosen.append(j)
        out.append(sorted(chosen))  # step 8
    return out


def inputs(shape, batch: int, seed: int, segments: int = 1):
    n, grid, width = shape
    visual = clustered_tokens(batch, n, width, seed)
    g = torch.Generator().manual_seed(seed + 100)
    clip_visual = torch.randn(batch, n, CLIP_WIDTH, generator=g)
    clip_text = torch.randn(batch, segments, CLIP_WIDTH, generator=g)
    return visual, clip_visual, clip_text, grid


def site_input(visual, keep, grid, **signals) -> SiteInput:
    b, n, _ = visual.shape
    return SiteInput(visual=visual, origin=torch.arange(n).expand(b, n), grid=grid, keep=keep,
                     site=Site(Stage.PROJECTOR), **signals)


@pytest.mark.parametrize("shape", [LLAVA_PROJECTED, QWEN_PROJECTED], ids=["llava", "qwen"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_the_slow_reference(shape, batch):
    visual, clip_visual, clip_text, grid = inputs(shape, batch, seed=batch, segments=batch)
    for keep in (128, 64):
        out = CDPruner().reduce(site_input(visual, keep, grid, clip_visual=clip_visual, clip_text=clip_text))
        assert out.keep.tolist() == slow_cdpruner(visual, clip_visual, clip_text, keep)
        assert out.values is None and out.extra is None


def test_batch_minmax_option_reproduces_the_reference():
    visual, clip_visual, clip_text, grid = inputs(LLAVA_PROJECTED, 3, seed=7)
    out = CDPruner(normalize="batch").reduce(site_input(visual, 64, grid, clip_visual=clip_visual,
                                                        clip_text=clip_text))
    assert out.keep.tolist() == slow_cdpruner(visual, clip_visual, clip_text, 64, batch_minmax=True)


def test_per_image_normalisation_does_not_depend_on_the_batch():
    visual, clip_visual, clip_text, grid = inputs((144, (12, 12), 64), 3, seed=8)
    together = CDPruner().reduce(site_input(visual, 16, grid, clip_visual=clip_visual, clip_text=clip_text))
    alone = CDPruner().reduce(site_input(visual[2:], 16, grid, clip_visual=clip_visual[2:], clip_text=clip_text[2:]))
    assert torch.equal(together.keep[2:], alone.keep)


def test_each_pick_maximises_the_determinant_gain():
    """§16.6 (a)/(b): every pick maximises log det(L_{S∪j}) − log det(L_S), and the product of the
    chosen pivots is det(L_S)."""
    g = torch.Generator().manual_seed(1)
    visual = torch.randn(1, 40, 64, generator=g)
    relevance = torch.rand(1, 40, generator=g) + 0.1
    kernel = conditional_kernel(visual, relevance)
    picks = dpp_greedy(kernel, 10, relevance)[0].tolist()
    assert picks[0] == int((relevance[0] ** 2).argmax())
    exact = kernel[0].double()
    for i in range(1, 10):
        chosen = picks[:i]
        gains = torch.full((40,), -float("inf"), dtype=torch.float64)
        for j in set(range(40)) - set(chosen):
            rows = chosen + [j]
            gains[j] = torch.linalg.slogdet(exact[rows][:, rows]).logabsdet
        assert gains[picks[i]] >= gains.max() - 1e-6
    pivots = []
    for i in range(10):  # pivots from the Schur complements of the chosen order
        s, j = picks[:i], picks[i]
        inner = exact[s][:, s] if s else torch.zeros(0, 0, dtype=torch.float64)
        pivot = exact[j, j] - (exact[j, s] @ torch.linalg.solve(inner, exact[s, j]) if s else 0)
        pivots.append(float(pivot))
    sub = exact[picks][:, picks]
    assert math.prod(pivots) == pytest.approx(float(torch.linalg.det(sub)), rel=1e-4)


def test_duplicates_and_degenerate_inputs():
    _, clip_visual, clip_text, _ = inputs((60, (6, 10), 8), 1, seed=2)
    same = torch.ones(1, 60, 16)
    out = CDPruner().reduce(site_input(same, 10, (6, 10), clip_visual=clip_visual, clip_text=clip_text))
    assert out.keep.shape == (1, 10) and len(set(out.keep[0].tolist())) == 10
    flat = CDPruner().reduce(site_input(same, 10, (6, 10), clip_visual=torch.ones(1, 60, 8),
                                        clip_text=torch.ones(1, 1, 8)))
    assert flat.keep.tolist() == [list(range(10))]  # equal relevance: r = 1, picks in index order
    visual = clustered_tokens(1, 60, 16, seed=3)
    one = CDPruner().reduce(site_input(visual, 1, (6, 10), clip_visual=clip_visual, clip_text=clip_text))
    relevance = -torch.nn.functional.cosine_similarity(clip_visual[0], clip_text[0], dim=1)
    assert one.keep.tolist() == [[int(relevance.argmax())]]
    everything = CDPruner().reduce(site_input(visual, 60, (6, 10), clip_visual=clip_visual, clip_text=clip_text))
    assert torch.equal(everything.keep, torch.arange(60)[None])
    visual[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CDPruner().reduce(site_input(visual, 5, (6, 10), clip_visual=clip_visual, clip_text=clip_text))


def test_llm_text_fallback_relevance():
    visual = clustered_tokens(1, 144, 64, seed=4)
    text = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(9))
    method = CDPrunerLLMText()
    assert method.needs == frozenset({"text"}) and method.options.relevance == "llm_text"
    out = method.reduce(site_input(visual, 16, (12, 12), text=text))
    relevance = -torch.nn.functional.cosine_similarity(visual[0], text[0].mean(dim=0, keepdim=True), dim=1)
    assert out.keep.tolist() == slow_dpp(visual, relevance[None], 16)
    flipped = CDPrunerLLMText(negate=False).reduce(site_input(visual, 16, (12, 12), text=text))
    assert flipped.keep.tolist() == slow_dpp(visual, -relevance[None], 16) != out.keep.tolist()


def test_options_needs_and_schedule(tmp_path):
    method = CDPruner(clip_checkpoint=str(tmp_path))
    assert method.clip_checkpoint == str(tmp_path)
    assert method.needs == frozenset({"clip_visual", "clip_text"})
    assert method.flash_attention == "native" and CDPrunerLLMText().flash_attention == "native"
    assert method.clip_instruction("What is it?\nAnswer the question using a single word or phrase.") == \
        "What is it?"
    assert CDPruner(instruction_suffix="").clip_instruction("a\nb") == "a\nb"
    with pytest.raises(ValueError, match="clip_checkpoint"):
        CDPruner(clip_checkpoint=str(tmp_path / "missing"))
    assert method.schedule(576, 64, LLAVA_15) == [(Site(Stage.PROJECTOR), 64)]
    assert method.schedule(432, 48, QWEN2_VL) == [(Site(Stage.PROJECTOR), 48)]
