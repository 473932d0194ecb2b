"""VisionZip against a plain re-implementation of spec §10.2, its budget split, CLS handling and
degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from prellm_tools import LLAVA_SERVED, QWEN_SERVED, llava_input, qwen_input, ranked, scores_of
from tokenbench.methods.visionzip import VisionZip, contextual_count

from tokenbench import Infeasible, Site, Stage
from tokenbench.testing import check_compressor, plan_for


def slow_visionzip(x, dominant: int, contextual: int):
    """Spec §10.2 steps 1-7 per image, in float64 with plain loops: kept dominant patch indices and the
    contextual tokens [c, D] (target + mean of its members)."""
    metric_all = x.keys if x.keys is not None else x.visual
    kept, tokens = [], []
    for b, score in enumerate(scores_of(x).double().tolist()):
        n = len(score)
        dom = sorted(ranked(score)[:dominant])  # step 2
        rest = [i for i in range(n) if i not in set(dom)]  # step 3: ascending
        step = max(1, len(rest) // contextual)  # step 4: positions within R
        target_pos = [j * step for j in range(contextual)]
        targets = [rest[p] for p in target_pos]
        metric = metric_all[b].double()
        unit = {i: metric[i] / metric[i].norm() for i in rest}
        members = {t: [] for t in targets}
        for p, u in enumerate(rest):  # step 5: every non-target to its most similar target
            if p in target_pos:
                continue
            sims = [float(unit[u] @ unit[t]) for t in targets]
            members[targets[sims.index(max(sims))]].append(u)
        feats = x.visual[b].double()
        ctx = []
        for t in targets:  # step 6: target + mean(members), the mean 0 without members
            mean = torch.stack([feats[u] for u in members[t]]).mean(dim=0) if members[t] else 0
            ctx.append(feats[t] + mean)
        kept.append(dom)
        tokens.append(torch.stack(ctx))
    return kept, torch.stack(tokens)


@pytest.mark.parametrize("budget,split", [(192, (162, 30)), (128, (108, 20)), (64, (54, 10))])
def test_published_splits(budget, split):
    assert (budget - contextual_count(budget), contextual_count(budget)) == split


@pytest.mark.parametrize("shape", ["llava", "qwen"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("budget", [192, 64])
def test_matches_the_slow_reference(shape, batch, budget):
    x = (llava_input if shape == "llava" else qwen_input)(batch, budget, seed=budget + batch)
    out = VisionZip().reduce(x)
    c = contextual_count(budget)
    kept, contextual = slow_visionzip(x, budget - c, c)
    assert out.keep.tolist() == kept
    assert out.prefix is None and out.values is None
    torch.testing.assert_close(out.extra.double(), contextual, rtol=1e-5, atol=1e-4)
    assert out.keep.shape[1] + out.extra.shape[1] == budget


@pytest.mark.parametrize("batch", [1, 3])
def test_cls_first_reproduces_the_reference_layout(batch):
    """cls=first: [CLS, d−1 dominant patches ascending, c contextual], 54 + 10 at 64 (README split)."""
    x = llava_input(batch, 64, seed=9)
    out = VisionZip(cls="first").reduce(x)
    kept, contextual = slow_visionzip(x, 53, 10)
    assert out.keep.tolist() == kept
    assert torch.equal(out.prefix, x.cls_token)
    torch.testing.assert_close(out.extra.double(), contextual, rtol=1e-5, atol=1e-4)
    assert out.prefix.shape[1] + out.keep.shape[1] + out.extra.shape[1] == 64
    out.check(x)


def test_metric_visual_merges_by_features():
    x = llava_input(1, 64, seed=2)
    out = VisionZip(metric="visual").reduce(x)
    x.keys = None
    kept, contextual = slow_visionzip(x, 54, 10)
    assert out.keep.tolist() == kept
    torch.testing.assert_close(out.extra.double(), contextual, rtol=1e-5, atol=1e-4)


def test_plan_and_signals_per_adapter():
    method = VisionZip()
    assert plan_for(method, LLAVA_SERVED, 64) == [(Site(Stage.VISION_OUT), 64)]
    assert method.needs == {"cls_attention", "keys"} and method.flash_attention == "probe"
    assert plan_for(method, QWEN_SERVED, 48) == [(Site(Stage.PROJECTOR), 48)]
    assert method.needs == {"attention_received"} and method.flash_attention == "probe"
    first = VisionZip(cls="first")
    assert plan_for(first, LLAVA_SERVED, 64) == [(Site(Stage.VISION_OUT), 64)]
    assert first.needs == {"cls_attention", "keys", "cls_token"}
    with pytest.raises(Infeasible, match="cls_token.*qwen2_vl"):
        first.schedule(432, 48, QWEN_SERVED)
    with pytest.raises(Infeasible, match="keys"):
        VisionZip(metric="keys").schedule(432, 48, QWEN_SERVED)


@pytest.mark.parametrize("options", [{}, {"cls": "first"}, {"importance": "received", "metric": "visual"}])
def test_contract(options):
    check_compressor(VisionZip, options)


def test_degenerate_inputs():
    x = llava_input(2, 600, dims=8)
    assert torch.equal(VisionZip(cls="first").reduce(x).keep, torch.arange(576).expand(2, -1))
    x.keep = 1
    one = VisionZip().reduce(x)
    assert one.keep.tolist() == [[int(row.argmax())] for row in x.cls_attention] and one.extra is None
    cls_only = VisionZip(cls="first").reduce(x)
    assert cls_only.keep.shape == (2, 0) and torch.equal(cls_only.prefix, x.cls_token)
    x.keep = 64
    x.visual[:] = 1.0  # identical tokens, equal scores, equal keys
    x.keys[:] = 1.0
    x.cls_attention[:] = 1 / 576
    same = VisionZip().reduce(x)
    assert same.keep.tolist() == [list(range(54))] * 2
    expected = torch.ones(2, 10, 8)
    expected[:, 0] = 2.0  # all 512 others merge into the first target (1 + mean 1); the rest stay alone
    assert torch.equal(same.extra, expected)
    x.visual[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        VisionZip().reduce(x)
