"""PruMerge+ against a slow re-implementation of spec ``methods-wave2.md`` §19 (reference loops kept)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenbench.methods.prumerge import PruMergePlus, PruMergePlusAdaptive
from wave2_inputs import LLAVA_CLIP, cls_row, clustered_tokens

from tokenbench import Infeasible, Site, SiteInput, Stage
from tokenbench.testing import LLAVA_15, QWEN2_VL

QWEN_SHAPED = (432, (18, 24), 1280)  # the tensor policy on a Qwen-sized grid (the adapter refuses it)


def slow_adaptive_picks(attention: torch.Tensor) -> torch.Tensor:
    """§19 steps 3-4: IQR share over the flattened batch (NumPy percentiles, as the reference), top
    ⌊N·ρ⌋, then ``range(0, N-1, ⌊⌊1/ρ⌋/3⌋)`` minus indices already kept anywhere in the batch."""
    n = attention.shape[1]
    values = attention.float().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    top = torch.topk(attention, int(n * ratio), dim=1).indices
    taken = set(top.flatten().tolist())
    samples = [s for s in range(0, n - 1, int(int(1 / ratio) / 3)) if s not in taken]
    return torch.cat([top, torch.tensor(samples, dtype=torch.long).expand(attention.shape[0], -1)], dim=1)


def slow_budget_picks(attention: torch.Tensor, keep: int, share: float) -> torch.Tensor:
    """``mode=budget`` (module docstring step 2): top round(share·keep), the rest spread evenly over
    the other tokens in raster order."""
    rows = []
    for b in range(attention.shape[0]):
        t = max(round(share * keep), 1)
        top = sorted(range(attention.shape[1]), key=lambda i: -float(attention[b, i]))[:t]
        others = [i for i in range(attention.shape[1]) if i not in top]
        spacing = len(others) / (keep - t)
        rows.append(top + [others[int(j * spacing)] for j in range(keep - t)])
    return torch.tensor(rows)


def slow_merge(x, attention, keys, picks, neighbours=32):
    """§19 steps 5-6 with the reference's loops: each kept token absorbs its 32 most key-similar
    other tokens weighted by CLS attention (unnormalised); one extra token sums the pruned ones.
    Also returns which kept tokens have a clear 32nd neighbour (no near-tie with the 33rd, where
    rounding may pick either)."""
    b_size, n, _ = x.shape
    unit = keys / keys.norm(dim=2, keepdim=True)
    merged = torch.zeros(b_size, picks.shape[1], x.shape[2])
    clear = torch.ones(b_size, picks.shape[1], dtype=torch.bool)
    extras = []
    for b in range(b_size):
        kept = picks[b].tolist()
        pruned = sorted(set(range(n)) - set(kept))
        for i, token in enumerate(kept):
            rest = kept[:i] + kept[i + 1:] + pruned
            similarity = unit[b, token] @ unit[b, rest].t()
            nearest = [rest[j] for j in torch.topk(similarity, neighbours).indices.tolist()]
            merged[b, i] = x[b, token] + (attention[b, nearest, None] * x[b, nearest]).sum(dim=0)
            if len(rest) > neighbours:
                ranked = similarity.sort(descending=True).values
                clear[b, i] = bool(ranked[neighbours - 1] - ranked[neighbours] > 1e-5)
        extras.append((attention[b, pruned, None] * x[b, pruned]).sum(dim=0))
    return merged, torch.stack(extras)[:, None], clear


def inputs(shape, batch, seed):
    n, grid, width = shape
    x = clustered_tokens(batch, n, width, seed)
    keys = clustered_tokens(batch, n, width, seed + 50)
    return x, cls_row(batch, n, seed + 7), keys, grid


def site_input(x, keep, grid, attention, keys) -> SiteInput:
    b, n, _ = x.shape
    return SiteInput(visual=x, origin=torch.arange(n).expand(b, n), grid=grid, keep=keep,
                     site=Site(Stage.VISION_OUT), cls_attention_next=attention, keys_next=keys)


def expect_reduction(out, x, attention, keys, picks):
    merged, extra, clear = slow_merge(x, attention, keys, picks)
    order = picks.argsort(dim=1)
    assert torch.equal(out.keep, picks.sort(dim=1).values)
    expected = merged.gather(1, order.unsqueeze(-1).expand(-1, -1, merged.shape[2]))
    clear = clear.gather(1, order)
    assert clear.float().mean() > 0.95
    torch.testing.assert_close(out.values[clear], expected[clear], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.extra, extra, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [LLAVA_CLIP, QWEN_SHAPED], ids=["llava", "qwen"])
@pytest.mark.parametrize("batch", [1, 3])
def test_adaptive_mode_matches_the_slow_reference(shape, batch):
    x, attention, keys, grid = inputs(shape, batch, seed=batch)
    out = PruMergePlusAdaptive().reduce(site_input(x, shape[0], grid, attention, keys))
    picks = slow_adaptive_picks(attention)
    assert 10 < picks.shape[1] < shape[0] // 2  # a real selection, not everything
    expect_reduction(out, x, attention, keys, picks)


@pytest.mark.parametrize("shape", [LLAVA_CLIP, QWEN_SHAPED], ids=["llava", "qwen"])
@pytest.mark.parametrize("batch", [1, 3])
def test_budget_mode_matches_the_slow_re_implementation(shape, batch):
    x, attention, keys, grid = inputs(shape, batch, seed=10 + batch)
    for budget in (192, 64):
        (site, keep), = PruMergePlus().schedule(shape[0], budget, LLAVA_15)
        assert site == Site(Stage.VISION_OUT) and keep == budget - 1  # plus the extra token
        out = PruMergePlus().reduce(site_input(x, keep, grid, attention, keys))
        assert out.keep.shape[1] + out.extra.shape[1] == budget
        expect_reduction(out, x, attention, keys, slow_budget_picks(attention, keep, 0.25))


def test_reference_order_option_returns_the_tokens_in_the_reference_order():
    x, attention, keys, grid = inputs(LLAVA_CLIP, 1, seed=4)
    out = PruMergePlusAdaptive(order="reference").reduce(site_input(x, 576, grid, attention, keys))
    picks = slow_adaptive_picks(attention)
    merged, extra, clear = slow_merge(x, attention, keys, picks)
    assert out.keep.shape == (1, 0) and out.values is None and clear.float().mean() > 0.95
    clear = torch.cat([clear, torch.ones(1, 1, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(out.extra[clear], torch.cat([merged, extra], dim=1)[clear], rtol=1e-5, atol=1e-5)


def test_selected_block_option_reads_the_selected_block_signals():
    x, attention, keys, grid = inputs(LLAVA_CLIP, 1, seed=12)
    method = PruMergePlus(attention_block="selected")
    assert method.needs == frozenset({"cls_attention", "keys"}) and method.flash_attention == "probe"
    selected = SiteInput(visual=x, origin=torch.arange(576)[None], grid=grid, keep=63, site=Site(Stage.VISION_OUT),
                         cls_attention=attention, keys=keys)
    out = method.reduce(selected)
    expected = PruMergePlus().reduce(site_input(x, 63, grid, attention, keys))
    assert torch.equal(out.keep, expected.keep) and torch.equal(out.values, expected.values)


def test_head_mean_option_and_flash_class():
    assert PruMergePlus().next_block_heads == "concat" and PruMergePlus(heads="mean").next_block_heads == "mean"
    assert PruMergePlus().flash_attention == "probe"
    assert PruMergePlus().needs == frozenset({"cls_attention_next", "keys_next"})
    assert not PruMergePlus().adaptive_count and PruMergePlusAdaptive().adaptive_count


def test_schedules():
    assert PruMergePlus(extra_token=False).schedule(576, 64, LLAVA_15) == [(Site(Stage.VISION_OUT), 64)]
    assert PruMergePlusAdaptive().schedule(576, 64, LLAVA_15) == [(Site(Stage.VISION_OUT), 576)]
    assert PruMergePlus().schedule(576, 576, LLAVA_15) == []
    with pytest.raises(Infeasible, match="no vision_out"):
        PruMergePlus().schedule(432, 48, QWEN2_VL)
    with pytest.raises(Infeasible, match="extra_token=false"):
        PruMergePlus().schedule(576, 1, LLAVA_15)


def test_degenerate_inputs():
    x, attention, keys, grid = inputs((40, (5, 8), 16), 2, seed=6)
    everything = PruMergePlus().reduce(site_input(x, 40, grid, attention, keys))
    assert torch.equal(everything.keep, torch.arange(40).expand(2, 40)) and everything.values is None
    one = PruMergePlus().reduce(site_input(x, 1, grid, attention, keys))
    assert torch.equal(one.keep[:, 0], attention.argmax(dim=1)) and one.extra.shape == (2, 1, 16)
    tiny = PruMergePlus().reduce(site_input(x[:, :20], 5, (4, 5), attention[:, :20], keys[:, :20]))
    merged, _, _ = slow_merge(x[:, :20], attention[:, :20], keys[:, :20], tiny.keep, neighbours=19)
    torch.testing.assert_close(tiny.values, merged, rtol=1e-5, atol=1e-5)  # neighbours capped at N - 1
    same = torch.ones(1, 40, 16)
    flat = torch.full((1, 40), 1 / 41)
    adaptive = PruMergePlusAdaptive().reduce(site_input(same, 40, grid, flat, same))
    assert adaptive.keep[0, 0] == 0 and torch.isfinite(adaptive.values).all()  # ρ = 0: one top token
    broken = x.clone()
    broken[0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PruMergePlus().reduce(site_input(broken, 8, grid, attention, keys))
