"""DivPrune against a slow re-implementation of spec ``methods-wave2.md`` §11.2, plus its properties."""

from __future__ import annotations

import pytest
import torch
from tokenbench.methods.divprune import DivPrune, divprune_select
from wave2_inputs import LLAVA_PROJECTED, QWEN_PROJECTED, clustered_tokens

from tokenbench import Site, SiteInput, Stage
from tokenbench.testing import LLAVA_15, QWEN2_VL


def slow_divprune(tokens: torch.Tensor, m: int) -> list[int]:
    """Spec §11.2 steps 3-5 for one image [N, D], chosen tokens excluded explicitly (§11.4)."""
    unit = tokens / tokens.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()  # step 3
    nearest_other = torch.sort(distance, dim=0).values[1]  # step 4: 2nd-smallest of each column
    chosen = [int(torch.argmax(nearest_other))]
    while len(chosen) < m:  # step 5
        scores = distance[chosen].min(dim=0).values
        scores[chosen] = -float("inf")
        chosen.append(int(torch.argmax(scores)))
    return chosen


def site_input(tokens: torch.Tensor, keep: int, grid: tuple[int, int]) -> SiteInput:
    b, n, _ = tokens.shape
    return SiteInput(visual=tokens, origin=torch.arange(n).expand(b, n), grid=grid, keep=keep,
                     site=Site(Stage.PROJECTOR))


@pytest.mark.parametrize("shape", [LLAVA_PROJECTED, QWEN_PROJECTED], ids=["llava", "qwen"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_the_slow_reference(shape, batch):
    n, grid, width = shape
    tokens = clustered_tokens(batch, n, width, seed=batch)
    for keep in (192, 64):
        out = DivPrune().reduce(site_input(tokens, keep, grid))
        assert out.values is None and out.extra is None
        for b in range(batch):
            expected = slow_divprune(tokens[b], keep)
            assert out.keep[b].tolist() == sorted(expected)
            assert divprune_select(tokens[b:b + 1], keep)[0].tolist() == expected  # selection order too


def test_first_pick_is_the_most_isolated_token_and_picks_are_unique():
    tokens = clustered_tokens(2, 100, 16, seed=5)
    picks = divprune_select(tokens, 30)
    unit = torch.nn.functional.normalize(tokens, dim=2)
    distance = 1 - unit @ unit.transpose(1, 2)
    distance.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    assert torch.equal(picks[:, 0], distance.min(dim=1).values.argmax(dim=1))
    assert all(len(set(row.tolist())) == 30 for row in picks)


def test_duplicate_clusters_give_at_most_one_member_each():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 32, generator=g)
    assign = torch.randint(0, 12, (200,), generator=g)
    assign[:12] = torch.arange(12)  # every cluster present
    tokens = centres[assign].unsqueeze(0)
    keep = DivPrune().reduce(site_input(tokens, 12, (10, 20))).keep[0]
    assert sorted(assign[keep].tolist()) == list(range(12))


def test_deterministic_and_batch_independent():
    tokens = clustered_tokens(3, 144, 64, seed=2)
    first = DivPrune().reduce(site_input(tokens, 20, (12, 12))).keep
    assert torch.equal(first, DivPrune().reduce(site_input(tokens, 20, (12, 12))).keep)
    alone = DivPrune().reduce(site_input(tokens[1:2], 20, (12, 12))).keep
    assert torch.equal(first[1:2], alone)


def test_degenerate_inputs():
    tokens = clustered_tokens(2, 50, 8, seed=3)
    everything = DivPrune().reduce(site_input(tokens, 50, (5, 10)))
    assert torch.equal(everything.keep, torch.arange(50).expand(2, 50))
    one = DivPrune().reduce(site_input(tokens, 1, (5, 10))).keep
    assert one.shape == (2, 1) and torch.equal(one[:, 0], divprune_select(tokens, 1)[:, 0])
    same = torch.ones(1, 50, 8)
    assert DivPrune().reduce(site_input(same, 5, (5, 10))).keep.tolist() == [[0, 1, 2, 3, 4]]
    zeros = torch.zeros(1, 50, 8)
    assert DivPrune().reduce(site_input(zeros, 5, (5, 10))).keep.shape == (1, 5)
    broken = tokens.clone()
    broken[1, 7, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        DivPrune().reduce(site_input(broken, 5, (5, 10)))


def test_input_dtype_distances_run_in_bfloat16():
    tokens = clustered_tokens(1, 144, 64, seed=4).bfloat16()
    out = DivPrune(distance_dtype="input").reduce(site_input(tokens, 16, (12, 12)))
    assert out.keep.shape == (1, 16) and len(set(out.keep[0].tolist())) == 16


def test_schedule_is_one_projector_site_at_the_budget():
    assert DivPrune().schedule(576, 64, LLAVA_15) == [(Site(Stage.PROJECTOR), 64)]
    assert DivPrune().schedule(432, 47.95, QWEN2_VL) == [(Site(Stage.PROJECTOR), 48)]
    assert DivPrune().schedule(576, 576, LLAVA_15) == []
    assert DivPrune().flash_attention == "native"
