"""VisPruner against a plain re-implementation of spec §15.2, odd residual sizes, its plan and
degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from prellm_tools import LLAVA_SERVED, QWEN_SERVED, llava_input, qwen_input, ranked, scores_of
from tokenbench.methods.vispruner import VisPruner

from tokenbench import Site, Stage
from tokenbench.testing import check_compressor, plan_for


def slow_vispruner(x, keep: int, ratio: float, step: int = 8, rounds: list | None = None) -> list[list[int]]:
    """Spec §15.2 steps 1-4 per image with Python lists, float64 similarities. ``rounds`` collects
    (|ρ|, removed) per round."""
    out = []
    for b, score in enumerate(scores_of(x).double().tolist()):
        important_count = int(keep * ratio)  # step 1
        diverse_count = keep - important_count
        order = ranked(score)  # step 2
        important, rho = order[:important_count], order[important_count:]
        feats = x.visual[b].double()
        unit = feats / feats.norm(dim=1, keepdim=True)
        while diverse_count > 0:  # step 3
            size = len(rho)
            remove = min(step, size - diverse_count)
            if remove <= 0:
                break
            a, bb = rho[0::2], rho[1::2]  # alternating list positions (A takes the larger half)
            sims = unit[a] @ unit[bb].T
            best = [float(v) for v in sims.max(dim=1).values]
            remove = min(remove, len(a))
            by_best = sorted(range(len(a)), key=lambda i: (-best[i], i))
            rho = [a[i] for i in by_best[remove:]] + bb
            if rounds is not None and b == 0:
                rounds.append((size, remove))
        out.append(sorted(important + rho[:max(diverse_count, 0)]))  # step 4
    return out


@pytest.mark.parametrize("shape", ["llava", "qwen"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("keep,ratio", [(128, 0.5), (64, 0.75), (63, 0.5)])
def test_matches_the_slow_reference(shape, batch, keep, ratio):
    x = (llava_input if shape == "llava" else qwen_input)(batch, keep, seed=keep + batch)
    # float64 features: later rounds order the survivors by similarity, and fp32 rounding flips
    # near-equal neighbours (one pair in ~300) and with them the later A/B splits
    x.visual = x.visual.double()
    out = VisPruner(important_ratio=ratio).reduce(x)
    assert out.keep.tolist() == slow_vispruner(x, keep, ratio)
    assert out.keep.shape == (batch, keep) and out.values is None and out.extra is None


def test_rounds_remove_up_to_eight_from_the_a_half_and_odd_sizes_work():
    """576 − 31 = 545 residual tokens (odd: the reference crashes); each round removes
    min(8, |ρ| − T_div) tokens; the important tokens are the top ⌊T·r⌋ by CLS attention."""
    x = llava_input(1, 63, seed=4)
    x.visual = x.visual.double()
    rounds: list = []
    kept = slow_vispruner(x, 63, 0.5, rounds=rounds)[0]
    assert rounds[0] == (545, 8) and rounds[-1][0] - rounds[-1][1] == 32
    assert all(removed == min(8, size - 32) for size, removed in rounds)
    assert VisPruner().reduce(x).keep[0].tolist() == kept
    top = ranked(x.cls_attention[0].tolist())[:31]
    assert set(top) <= set(kept)


def test_small_diverse_budget_never_drops_more_than_the_a_half():
    x = llava_input(2, 6, seed=1, dims=16)
    x.visual = x.visual.double()
    out = VisPruner(important_ratio=0.5).reduce(x)
    assert out.keep.tolist() == slow_vispruner(x, 6, 0.5)
    assert out.keep.shape == (2, 6)


def test_plan_and_signals_per_adapter():
    method = VisPruner()
    assert plan_for(method, LLAVA_SERVED, 128) == [(Site(Stage.VISION_OUT), 128)]
    assert method.needs == {"cls_attention"} and method.flash_attention == "probe"
    assert plan_for(method, QWEN_SERVED, 96) == [(Site(Stage.PROJECTOR), 96)]
    assert method.needs == {"attention_received"} and method.flash_attention == "probe"


@pytest.mark.parametrize("options", [{}, {"important_ratio": 0.75, "importance": "received"}])
def test_contract(options):
    check_compressor(VisPruner, options)


def test_degenerate_inputs():
    method = VisPruner()
    x = llava_input(2, 600, dims=8)
    assert torch.equal(method.reduce(x).keep, torch.arange(576).expand(2, -1))
    x.keep = 1
    assert method.reduce(x).keep.shape == (2, 1)
    x.keep = 10
    x.visual[:] = 1.0  # identical tokens: equal scores, equal similarities
    x.cls_attention[:] = 1 / 576
    same = method.reduce(x)
    assert same.keep.shape == (2, 10) and torch.equal(same.keep[0], same.keep[1])
    assert same.keep[0, :5].tolist() == [0, 1, 2, 3, 4]  # the important half: lowest indices
    x.visual[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        method.reduce(x)


def test_per_round_similarities_equal_the_precomputed_ones(monkeypatch):
    """Residual lists too large for the up-front Gram matrix compute each round's block directly."""
    import tokenbench.methods.vispruner as module

    x = llava_input(3, 64, seed=8)
    x.visual = x.visual.double()
    upfront = VisPruner().reduce(x).keep
    monkeypatch.setattr(module, "GRAM_LIMIT", 0)
    assert torch.equal(VisPruner().reduce(x).keep, upfront)
    assert upfront.tolist() == slow_vispruner(x, 64, 0.5)
