"""FastV: ranking against a plain-loop re-implementation, budget mapping, FlashAttention class."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from llm_tools import model_info
from pydantic import ValidationError
from tokenbench.methods.fastv import FastV

from tokenbench import Infeasible, Site, SiteInput, Stage, layer_averaged_tokens


def slow_fastv_keep(attention: torch.Tensor, keep: int) -> list[list[int]]:
    """Per sample: the ``keep`` visual tokens with the largest mean attention over the query rows."""
    result = []
    for sample in attention.tolist():
        n = len(sample[0])
        score = [sum(row[i] for row in sample) / len(sample) for i in range(n)]
        best = sorted(range(n), key=lambda i: -score[i])[:keep]
        result.append(sorted(best))
    return result


def site_input(attention: torch.Tensor, keep: int) -> SiteInput:
    b, _, n = attention.shape
    return SiteInput(visual=torch.randn(b, n, 8), origin=torch.arange(n).expand(b, n), grid=(1, n),
                     keep=keep, site=Site(Stage.LLM, 2), attention=attention,
                     sizes=torch.ones(b, n))


@pytest.mark.parametrize("queries", [1, 7])
def test_keeps_the_same_tokens_as_a_plain_loop_ranking(queries):
    gen = torch.Generator().manual_seed(queries)
    attention = torch.rand(3, queries, 50, generator=gen)
    x = site_input(attention, keep=17)
    reduction = FastV(score="all_queries" if queries > 1 else "last_token").reduce(x)
    reduction.check(x)
    assert reduction.keep.tolist() == slow_fastv_keep(attention, 17)
    assert reduction.values is None and reduction.extra is None


@pytest.mark.parametrize("layers", [32, 24, 16, 8, 4, 2])
@pytest.mark.parametrize("budget", [192, 128, 64, 11.1 / 100 * 576, 145.5])
def test_layer_average_meets_the_budget_or_is_infeasible(layers, budget):
    info = model_info(layers)
    k_layer = info.scale_layer(2)
    lowest = (k_layer * 576 + (layers - k_layer)) / layers
    try:
        plan = FastV().schedule(576, budget, info)
    except Infeasible as exc:
        assert lowest - budget > 1, f"feasible budget refused: {exc}"
        assert "cannot go below" in str(exc)
        return
    assert plan == [(Site(Stage.LLM, k_layer), plan[0][1])]
    assert abs(layer_averaged_tokens(576, plan, layers) - budget) <= 1


def test_reference_depth_prunes_before_layer_2():
    plan = FastV().schedule(576, 192, model_info(32))
    assert plan == [(Site(Stage.LLM, 2), 166)]  # (192*32 - 2*576) / 30 = 166.4


def test_after_k_keeps_the_budget_after_layer_k():
    plan = FastV(budget_mode="after_k").schedule(576, 64, model_info(32))
    assert plan == [(Site(Stage.LLM, 2), 64)]
    assert layer_averaged_tokens(576, plan, 32) > 64  # layers 0 and 1 still see 576


def test_full_budget_is_a_no_op():
    assert FastV().schedule(576, 576, model_info(32)) == []


def test_flash_attention_class_follows_the_score_option():
    default = FastV()
    assert default.flash_attention == "probe" and default.attention_queries == "last"
    paper = FastV(score="all_queries")
    assert paper.flash_attention == "eager" and paper.attention_queries == "all"
    assert FastV.attention_queries == "last"  # the option changes the instance only
    assert default.positions == "original"


def test_unknown_option_is_rejected():
    with pytest.raises(ValidationError):
        FastV(k=3)


# --- through the adapters, on tiny models -------------------------------------------------------

class RecordingFastV(FastV):
    """FastV that keeps the attention rows it was given (test only)."""

    seen: ClassVar[list[torch.Tensor]] = []

    def reduce(self, x: SiteInput):
        RecordingFastV.seen.append(x.attention.clone())
        return super().reduce(x)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_probe_scores_equal_the_eager_attention_row_of_the_same_layer(family):
    import tiny_vlm

    from tokenbench import Budget

    adapter = tiny_vlm.llava_adapter("eager") if family == "llava" else tiny_vlm.qwen_adapter("eager")
    RecordingFastV.seen = []
    adapter.generate(tiny_vlm.prompts(), compressor=RecordingFastV(), budget=Budget.parse("20%"),
                     max_new_tokens=1)
    encoded = adapter._encode(tiny_vlm.prompts())
    kwargs = dict(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                  **encoded.image_inputs)
    if family == "qwen2_vl":  # the stock forward needs them to build its M-RoPE positions
        kwargs["mm_token_type_ids"] = (encoded.input_ids == encoded.image_token_id).int()
    with torch.inference_mode():
        out = adapter.model(**kwargs, output_attentions=True)
    k_layer = adapter.info(encoded.n_visual, grid=encoded.grid).scale_layer(2)
    image = (encoded.input_ids[0] == encoded.image_token_id).nonzero().squeeze(1)
    eager_row = out.attentions[k_layer - 1].mean(dim=1)[:, -1, image]  # layer K-1, last query
    assert len(RecordingFastV.seen) == 1
    assert torch.allclose(RecordingFastV.seen[0][:, 0], eager_row, atol=1e-6)


@pytest.mark.parametrize("budget", ["192", "128", "64"])
def test_llava_end_to_end_under_the_flash_backend(budget):
    from tiny_vlm import llava_adapter, prompts
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenbench import Budget

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        generations = llava_adapter().generate(prompts(2), compressor=FastV(),
                                               budget=Budget.parse(budget), max_new_tokens=2)
    for generation in generations:
        trace = generation.trace
        assert abs(trace.realised_tokens - int(budget)) <= 1
        assert trace.llm_visual[:2] == [576, 576] and trace.eager_attention_calls == 0
        assert trace.probe_rows == 1


def test_all_queries_option_is_counted_as_eager_attention():
    from tiny_vlm import llava_adapter, prompts

    from tokenbench import Budget

    trace = llava_adapter().generate(prompts(), compressor=FastV(score="all_queries"),
                                     budget=Budget.parse("128"), max_new_tokens=1)[0].trace
    assert trace.eager_attention_calls >= 1 and abs(trace.realised_tokens - 128) <= 1


@pytest.mark.parametrize("budget", ["33.3%", "22.2%", "11.1%"])
def test_qwen2_vl_end_to_end_at_ratio_budgets(budget):
    from tiny_vlm import prompts, qwen_adapter
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenbench import Budget

    adapter = qwen_adapter()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        trace = adapter.generate(prompts(), compressor=FastV(), budget=Budget.parse(budget),
                                 max_new_tokens=2)[0].trace
    target = Budget.parse(budget).target(trace.n_visual)
    assert abs(trace.realised_tokens - target) <= 1 and trace.eager_attention_calls == 0
