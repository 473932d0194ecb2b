"""FasterVLM against a plain re-implementation of spec §14.2, its plan, signals and degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from prellm_tools import LLAVA_SERVED, QWEN_SERVED, llava_input, qwen_input, ranked, scores_of
from tokenbench.methods.fastervlm import FasterVLM
from tokenbench.methods.visionzip import VisionZip
from tokenbench.methods.vispruner import VisPruner

from tokenbench import Infeasible, Site, Stage
from tokenbench.testing import check_compressor, plan_for


def slow_fastervlm(x, keep: int) -> list[list[int]]:
    """Spec §14.2 steps 2-3: top-``keep`` patches by head-mean CLS attention, ascending raster order."""
    return [sorted(ranked(row)[:keep]) for row in scores_of(x).double().tolist()]


@pytest.mark.parametrize("shape", ["llava", "qwen"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("keep", [192, 128, 64])
def test_matches_the_slow_reference(shape, batch, keep):
    x = (llava_input if shape == "llava" else qwen_input)(batch, keep, seed=keep + batch)
    out = FasterVLM().reduce(x)
    assert out.keep.tolist() == slow_fastervlm(x, keep)
    assert out.values is None and out.extra is None and out.prefix is None


def test_equals_visionzip_without_contextual_tokens_and_vispruner_with_ratio_one():
    x = llava_input(3, 64, seed=5)
    fast = FasterVLM().reduce(x).keep
    assert torch.equal(fast, VisionZip(contextual=0).reduce(x).keep)
    assert torch.equal(fast, VisPruner(important_ratio=1.0).reduce(x).keep)


def test_plan_keeps_the_budget_before_the_llm():
    method = FasterVLM()
    assert plan_for(method, LLAVA_SERVED, 64) == [(Site(Stage.VISION_OUT), 64)]
    assert method.needs == {"cls_attention"} and method.flash_attention == "probe"
    assert plan_for(method, QWEN_SERVED, 48) == [(Site(Stage.PROJECTOR), 48)]
    assert method.needs == {"attention_received"} and method.flash_attention == "probe"
    assert plan_for(method, LLAVA_SERVED, 576) == []
    with pytest.raises(Infeasible, match="cls_attention.*qwen2_vl"):
        FasterVLM(importance="cls").schedule(432, 48, QWEN_SERVED)
    with pytest.raises(Infeasible):
        method.schedule(576, 0.2, LLAVA_SERVED)


@pytest.mark.parametrize("options", [{}, {"importance": "received"}])
def test_contract(options):
    check_compressor(FasterVLM, options)


def test_degenerate_inputs():
    method = FasterVLM()
    x = llava_input(2, 600, dims=8)
    assert torch.equal(method.reduce(x).keep, torch.arange(576).expand(2, -1))
    x.keep = 1
    assert method.reduce(x).keep.tolist() == [[int(row.argmax())] for row in x.cls_attention]
    x.keep, x.cls_attention = 5, torch.full((2, 576), 1 / 576)  # identical tokens: equal scores
    assert method.reduce(x).keep.tolist() == [[0, 1, 2, 3, 4]] * 2
    x.cls_attention[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        method.reduce(x)
