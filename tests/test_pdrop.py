"""PyramidDrop: ranking against a plain-loop re-implementation, the solved schedules, the reference
schedule, and the LLaVA prefill against a straightforward loop that prunes in place."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from llm_tools import model_info
from pydantic import ValidationError
from tokenbench.methods.pdrop import PyramidDrop

from tokenbench import (
    Budget,
    Infeasible,
    Site,
    SiteInput,
    Stage,
    layer_averaged_tokens,
)


def slow_pdrop_keep(attention: torch.Tensor, keep: int) -> list[list[int]]:
    """Per sample: the ``keep`` visual tokens the last-token row attends to most, ascending."""
    out = []
    for sample in attention.tolist():
        row = sample[-1]
        out.append(sorted(sorted(range(len(row)), key=lambda i: -row[i])[:keep]))
    return out


def slow_stage_counts(n: int, layer_list: list[int], lam: float, layers: int) -> tuple[list[int], float]:
    """Stage counts int(N·λ^s) and the mean over layers of the tokens each layer processes."""
    counts = [n] + [int(n * lam ** s) for s in range(1, len(layer_list) + 1)]
    bounds = [0, *layer_list, layers]
    per_layer = [counts[s] for s in range(len(counts)) for _ in range(bounds[s], bounds[s + 1])]
    return counts, sum(per_layer) / layers


def test_keeps_the_same_tokens_as_a_plain_loop_ranking():
    gen = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 1, 70, generator=gen).softmax(-1)
    x = SiteInput(visual=torch.randn(3, 70, 8, generator=gen), origin=torch.arange(70).expand(3, 70),
                  grid=(7, 10), keep=23, site=Site(Stage.LLM, 8), attention=attention)
    reduction = PyramidDrop().reduce(x)
    reduction.check(x)
    assert reduction.keep.tolist() == slow_pdrop_keep(attention, 23)


def test_reference_schedule_is_576_288_144_72_and_averages_270():
    method = PyramidDrop(schedule="reference")
    plan = method.schedule(576, 64, model_info())
    assert plan == [(Site(Stage.LLM, 8), 288), (Site(Stage.LLM, 16), 144), (Site(Stage.LLM, 24), 72)]
    counts, average = slow_stage_counts(576, [8, 16, 24], 0.5, 32)
    assert counts == [576, 288, 144, 72] and average == 270
    assert layer_averaged_tokens(576, plan, 32) == 270  # over budget at 64: the run shows it


@pytest.mark.parametrize("budget, layer_list", [(192, [8, 16, 24]), (128, [2, 8, 16]), (64, [2, 8, 16])])
def test_solved_schedules_meet_the_budget_within_a_token(budget, layer_list):
    plan = PyramidDrop().schedule(576, budget, model_info())
    assert [site.layer for site, _ in plan] == layer_list
    keeps = [keep for _, keep in plan]
    assert abs(layer_averaged_tokens(576, plan, 32) - budget) <= 1
    # the spec's §13.3 table: 192 -> 576/145/36/9 (λ ≈ 0.253), 64 -> 576/110/21/4 (λ ≈ 0.1916)
    expected = {192: [145, 36, 9], 128: [241, 101, 42], 64: [110, 21, 4]}[budget]
    assert all(abs(a - b) <= 1 for a, b in zip(keeps, expected))


@pytest.mark.parametrize("layers", [32, 28, 12, 8, 4, 2])
@pytest.mark.parametrize("n_visual, fraction", [(576, 1 / 3), (576, 2 / 9), (576, 1 / 9), (144, 1 / 9),
                                                (432, 0.05)])
def test_scaled_depths_meet_the_budget_or_say_why(layers, n_visual, fraction):
    budget = fraction * n_visual
    info = model_info(layers, n_visual)
    try:
        plan = PyramidDrop().schedule(n_visual, budget, info)
    except Infeasible as exc:
        first = info.scale_layer(2)
        assert (first * n_visual + (layers - first)) / layers - budget > 1, str(exc)
        assert "cannot go below" in str(exc)
        return
    assert abs(layer_averaged_tokens(n_visual, plan, layers) - budget) <= 1
    assert [site.layer for site, _ in plan] == sorted({site.layer for site, _ in plan})


def test_explicit_layer_list_refuses_what_it_cannot_reach_and_names_the_remedy():
    with pytest.raises(Infeasible, match=r"\[2, 8, 16\]"):
        PyramidDrop(layer_list=[8, 16, 24]).schedule(576, 64, model_info())
    plan = PyramidDrop(layer_list=[2, 8, 16], lam=0.19).schedule(576, 64, model_info())
    assert [keep for _, keep in plan] == [109, 20, 3]  # the maintainer's example (issue #29)
    assert layer_averaged_tokens(576, plan, 32) == pytest.approx(62.9, abs=0.05)


def test_options_are_validated():
    with pytest.raises(ValidationError):
        PyramidDrop(layer_list=[16, 8])
    with pytest.raises(ValidationError):
        PyramidDrop(schedule="reference", lam=0.3)
    with pytest.raises(ValidationError):
        PyramidDrop(lam=1.5)


def test_class_attributes():
    method = PyramidDrop()
    assert method.flash_attention == "probe" and method.attention_queries == "last"
    assert method.attention_source == "next" and method.positions == "contiguous"
    assert PyramidDrop(attention_source="previous").attention_source == "previous"
    assert PyramidDrop.attention_source == "next"


# --- through the adapters, on tiny models -------------------------------------------------------

def pdrop_in_place(adapter, prompt, plan: list[tuple[Site, int]], source: str):
    """The straightforward loop: before each stage layer, rank by that layer's (``next``) or the
    previous layer's attention from the last token, keep the top tokens, renumber positions."""
    from inplace_loop import attention_rows, prefill_in_place

    sites = {site.layer: keep for site, keep in plan}
    rotary = adapter.model.model.language_model.rotary_emb
    layers = adapter.model.model.language_model.layers

    def prune(index, state, before):
        if index not in sites:
            return None
        scorer, entering = (layers[index], state) if source == "next" else (layers[index - 1], before)
        row = attention_rows(scorer, entering.hidden, entering.positions, [state.hidden.shape[1] - 1], rotary)[0]
        scores = row[state.start:state.start + state.n].tolist()
        kept = sorted(sorted(range(state.n), key=lambda i: -scores[i])[:sites[index]])
        return state.keep_visual(kept, contiguous=True)

    return prefill_in_place(adapter, prompt, prune)


class RecordingPDrop(PyramidDrop):
    """Remembers, per stage, each sample's kept original indices (test only)."""

    kept: ClassVar[list[list[list[int]]]] = []

    def reduce(self, x):
        result = super().reduce(x)
        RecordingPDrop.kept.append([x.origin[b, result.keep[b]].tolist() for b in range(x.visual.shape[0])])
        return result


@pytest.mark.parametrize("source", ["next", "previous"])
@pytest.mark.parametrize("budget", ["192", "64"])
def test_llava_prefill_equals_a_loop_that_prunes_in_place(source, budget):
    from adapter_tools import image
    from tiny_vlm import llava_adapter

    from tokenbench.adapters.base import Prompt

    adapter = llava_adapter()
    prompt = Prompt(image(7, 336), "what color is the circle ?")
    method = RecordingPDrop(attention_source=source)
    RecordingPDrop.kept = []
    run = adapter.run([prompt], compressor=method, budget=Budget.parse(budget), max_new_tokens=1)
    plan = method.schedule(576, float(budget), adapter.info())
    logits, states = pdrop_in_place(adapter, prompt, plan, source)
    assert len(RecordingPDrop.kept) == len(plan) == 3
    for (site, _), kept in zip(plan, RecordingPDrop.kept):
        assert states[site.layer].origin == kept[0]
    torch.testing.assert_close(run.logits[0, 0], logits, rtol=1e-4, atol=1e-4)
    assert [len(s.origin) for s in states] == run.generations[0].trace.llm_visual


def test_llava_batch_ranks_each_sample_by_its_own_row():
    """A left-padded batch of two prompts keeps, per sample, what each keeps alone."""
    from adapter_tools import image
    from tiny_vlm import llava_adapter

    from tokenbench.adapters.base import Prompt

    adapter = llava_adapter()
    batch = [Prompt(image(1, 336), "what color is the circle ?"), Prompt(image(2, 336), "how many ?")]
    assert adapter.batchable(PyramidDrop())
    RecordingPDrop.kept = []
    together = adapter.run(batch, compressor=RecordingPDrop(), budget=Budget.parse("128"), max_new_tokens=1)
    batched = RecordingPDrop.kept
    for row, prompt in enumerate(batch):
        RecordingPDrop.kept = []
        run = adapter.run([prompt], compressor=RecordingPDrop(), budget=Budget.parse("128"), max_new_tokens=1)
        assert [stage[row] for stage in batched] == [stage[0] for stage in RecordingPDrop.kept]
        torch.testing.assert_close(together.logits[row, 0], run.logits[0, 0], rtol=1e-4, atol=1e-4)
    assert batched[0][0] != batched[0][1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_end_to_end_under_the_flash_backend_within_two_percent(family):
    from tiny_vlm import LLAVA_BUDGETS, RATIO_BUDGETS, llava_adapter, prompts, qwen_adapter
    from torch.nn.attention import SDPBackend, sdpa_kernel

    adapter = llava_adapter() if family == "llava" else qwen_adapter()
    for text in LLAVA_BUDGETS if family == "llava" else RATIO_BUDGETS:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            generations = adapter.generate(prompts(2), compressor=PyramidDrop(), budget=Budget.parse(text),
                                           max_new_tokens=2)
        for generation in generations:
            trace = generation.trace
            target = Budget.parse(text).target(trace.n_visual)
            assert abs(trace.realised_tokens - target) <= 0.02 * target
            assert trace.eager_attention_calls == 0 and trace.probe_rows == len(trace.plan)
            # "next": each stage projects the keys of the sequence entering it (counted as probe cost)
            assert trace.probe_key_tokens == sum(trace.llm_total[layer - 1] for _, layer, _ in trace.plan)
