"""SparseVLM: raters, scores, recycling against a plain-loop re-implementation; schedules; budgets."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from llm_tools import model_info
from tokenbench.methods.sparsevlm import SparseVLM, recycled_clusters

from tokenbench import Infeasible, Site, SiteInput, Stage, layer_averaged_tokens


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def slow_raters(visual: list[list[float]], text: list[list[float]]) -> list[int]:
    relevance = [0.0] * len(text)
    for v in visual:
        logits = [dot(v, t) for t in text]
        top = max(logits)
        exps = [math.exp(z - top) for z in logits]
        for i, e in enumerate(exps):
            relevance[i] += e / sum(exps) / len(visual)
    mean = sum(relevance) / len(relevance)
    return [i for i, r in enumerate(relevance) if r > mean]


def slow_density_peaks(points: list[list[float]], clusters: int) -> list[list[float]]:
    """Density-peak kNN clustering with loops; points come in descending score order."""
    n, d = len(points), len(points[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q))) / math.sqrt(d) for q in points]
            for p in points]
    density = [math.exp(-sum(x ** 2 for x in sorted(row)[:clusters]) / clusters) for row in dist]
    far = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n)
                  if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else far)
    centres = sorted(range(n), key=lambda i: -density[i] * delta[i])[:clusters]
    members: list[list[int]] = [[] for _ in centres]
    for i in range(n):
        if i in centres:
            members[centres.index(i)].append(i)
        else:
            members[min(range(clusters), key=lambda c: dist[i][centres[c]])].append(i)
    return [[sum(points[i][k] for i in group) / len(group) for k in range(d)] for group in members]


def slow_sparsevlm(visual, rater_visual, text, attention, keep):
    """One SparseVLM v1.5 site on one sample: (kept indices, recycled cluster tokens)."""
    raters = slow_raters(rater_visual, text)
    n = len(visual)
    score = [sum(attention[r][j] for r in raters) / len(raters) for j in range(n)]
    ranked = sorted(range(n), key=lambda j: -score[j])
    kept, deleted = ranked[:keep], ranked[keep:]
    recycled = deleted[:math.floor(0.3 * len(deleted)) + 1]
    clusters = math.floor(len(recycled) / 10) + 1
    return sorted(kept), slow_density_peaks([visual[j] for j in recycled], clusters)


def llm_input(visual, text, attention, keep, input_visual=None) -> SiteInput:
    """A site whose layer-0 states (``input_states``) are ``input_visual`` (default: ``visual``) and
    ``text``, and whose site-layer text is ``text`` too."""
    b, n, _ = visual.shape
    return SiteInput(visual=visual, origin=torch.arange(n).expand(b, n), grid=(1, n), keep=keep,
                     site=Site(Stage.LLM, 3), attention=attention, text=text,
                     input_visual=visual if input_visual is None else input_visual, input_text=text,
                     sizes=torch.ones(b, n))


@pytest.mark.parametrize("raters", ["input", "site"])
@pytest.mark.parametrize("n, keep", [(60, 20), (45, 30), (33, 5)])
def test_site_matches_a_plain_loop_reimplementation(n, keep, raters):
    gen = torch.Generator().manual_seed(n)
    visual = torch.randn(2, n, 6, generator=gen, dtype=torch.float64)
    layer0 = torch.randn(2, n + 7, 6, generator=gen, dtype=torch.float64)  # every token entering the LLM
    text = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    attention = torch.rand(2, 9, n, generator=gen, dtype=torch.float64)
    site = llm_input(visual, text, attention, keep, input_visual=layer0)
    reduction = SparseVLM(raters=raters).reduce(site)
    reduction.check(site)
    rater_visual = layer0 if raters == "input" else visual
    for i in range(2):
        kept, recycled = slow_sparsevlm(visual[i].tolist(), rater_visual[i].tolist(), text[i].tolist(),
                                        attention[i].tolist(), keep)
        assert reduction.keep[i].tolist() == kept
        assert torch.allclose(reduction.extra[i], torch.tensor(recycled, dtype=torch.float64))
    assert reduction.extra.shape[1] == recycled_clusters(n - keep)


def test_recycling_can_be_switched_off():
    gen = torch.Generator().manual_seed(0)
    site = llm_input(torch.randn(1, 40, 6, generator=gen), torch.randn(1, 5, 6, generator=gen),
                     torch.rand(1, 5, 40, generator=gen), 10)
    assert SparseVLM(recycle=False).reduce(site).extra is None


def test_recycled_cluster_counts_follow_the_reference():
    # 576 -> 300 deletes 276: 83 recycled candidates -> 9 clusters
    assert recycled_clusters(276) == 9
    assert recycled_clusters(1) == 1 and recycled_clusters(0) == 0


def test_sites_prune_the_output_of_layers_2_6_15():
    plan = SparseVLM().schedule(576, 192, model_info(32))
    assert [site for site, _ in plan] == [Site(Stage.LLM, 3), Site(Stage.LLM, 7), Site(Stage.LLM, 16)]


@pytest.mark.parametrize("layers", [32, 28, 16, 8, 4, 2])
@pytest.mark.parametrize("n_visual, budget", [(576, 192), (576, 128), (576, 96), (576, 64),
                                              (576, 300.5), (432, 0.333 * 432), (432, 0.111 * 432)])
def test_layer_average_with_recycled_tokens_meets_the_budget(layers, n_visual, budget):
    method = SparseVLM()
    info = model_info(layers, n_visual)
    try:
        plan = method.schedule(n_visual, budget, info)
    except Infeasible as exc:
        first = min(info.scale_layer(2) + 1, layers - 1)
        lowest = (first * n_visual + (layers - first) * 2) / layers  # one kept + one recycled
        assert budget < lowest + 1, f"feasible budget refused: {exc}"
        return
    keeps = [keep for _, keep in plan]
    assert keeps == sorted(keeps, reverse=True) or len(plan) == 1
    averaged = layer_averaged_tokens(n_visual, plan, layers, method.planned_extra(n_visual, plan))
    assert abs(averaged - budget) <= 1


def test_reference_schedule_runs_the_published_keeps():
    method = SparseVLM(schedule="reference")
    plan = method.schedule(576, 192, model_info(32))
    assert plan == [(Site(Stage.LLM, 3), 300), (Site(Stage.LLM, 7), 200), (Site(Stage.LLM, 16), 110)]
    averaged = layer_averaged_tokens(576, plan, 32, method.planned_extra(576, plan))
    assert averaged == pytest.approx(206.5)  # (3*576 + 4*309 + 9*204 + 16*113) / 32
    with pytest.raises(Infeasible, match="schedule=budget"):
        method.schedule(576, 100, model_info(32))


def test_v1_needs_its_rank_presets_and_prunes_after_four_layers():
    with pytest.raises(Infeasible, match="rank_lambda"):
        SparseVLM(version="v1").schedule(576, 192, model_info(32))
    plan = SparseVLM(version="v1", rank_lambda=13.5, rank_bias=0).schedule(576, 192, model_info(32))
    assert [site.layer for site, _ in plan] == [3, 7, 16, 20]


def test_v1_keeps_rank_times_lambda_plus_b():
    gen = torch.Generator().manual_seed(3)
    n, rank = 80, 3
    basis = torch.rand(rank, n, generator=gen)
    attention = (torch.rand(1, 12, rank, generator=gen) @ basis).double()  # rank-3 rows
    visual, text = torch.randn(1, n, 6, generator=gen).double(), torch.randn(1, 12, 6, generator=gen).double()
    site = llm_input(visual, text, attention, n - 1)
    reduction = SparseVLM(version="v1", rank_lambda=9.0, rank_bias=6.0, recycle=False).reduce(site)
    assert reduction.keep.shape[1] == math.floor(rank * 9.0 + 6.0)


def test_flash_attention_class_and_positions():
    method = SparseVLM()
    assert method.flash_attention == "probe" and method.attention_queries == "text"
    assert method.needs == frozenset({"attention", "input_states"}) and method.positions == "contiguous"
    assert SparseVLM(raters="site").needs == frozenset({"attention", "text"})


# --- through the adapters, on tiny models -------------------------------------------------------

def generate_trace(adapter, method, budget: str):
    from tiny_vlm import prompts
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenbench import Budget

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return adapter.generate(prompts(), compressor=method, budget=Budget.parse(budget),
                                max_new_tokens=2)[0].trace


@pytest.mark.parametrize("budget", ["192", "128", "64"])
def test_llava_end_to_end_under_the_flash_backend(budget):
    from tiny_vlm import llava_adapter

    method = SparseVLM()
    trace = generate_trace(llava_adapter(), method, budget)
    assert abs(trace.realised_tokens - int(budget)) <= 1  # recycled tokens included
    plan = method.schedule(576, int(budget), llava_adapter().info())
    extra = method.planned_extra(576, plan)
    for site, keep in plan:
        assert trace.llm_visual[site.layer] == keep + extra[site]
    assert trace.eager_attention_calls == 0 and trace.probe_rows > 0


@pytest.mark.parametrize("budget", ["33.3%", "22.2%", "11.1%"])
def test_qwen2_vl_end_to_end_at_ratio_budgets(budget):
    from tiny_vlm import qwen_adapter

    from tokenbench import Budget

    adapter = qwen_adapter()
    try:
        trace = generate_trace(adapter, SparseVLM(), budget)
    except Infeasible as exc:
        assert "cannot go below" in str(exc)
        return
    target = Budget.parse(budget).target(trace.n_visual)
    assert abs(trace.realised_tokens - target) <= 1 and trace.eager_attention_calls == 0


def test_v1_runs_through_the_adapter_with_a_data_dependent_count():
    from tiny_vlm import llava_adapter

    trace = generate_trace(llava_adapter(), SparseVLM(version="v1", rank_lambda=0.8, rank_bias=0), "64")
    assert trace.llm_visual[0] == 576 and trace.llm_visual[-1] < 576


def test_prompt_without_text_after_the_image_is_a_clear_error():
    site = llm_input(torch.randn(1, 20, 6), torch.randn(1, 0, 6), torch.rand(1, 0, 20), 10)
    with pytest.raises(ValueError, match="after the image"):
        SparseVLM().reduce(site)


# --- the reference's raters on the tiny LLaVA -------------------------------------------------

class RecordingSparseVLM(SparseVLM):
    """Remembers the original indices alive after each site (-1: a recycled token) (test only)."""

    kept: ClassVar[list[list[int]]] = []

    def reduce(self, x):
        result = super().reduce(x)
        appended = result.extra.shape[1] if result.extra is not None else 0
        RecordingSparseVLM.kept.append(x.origin[0, result.keep[0]].tolist() + [-1] * appended)
        return result


def sparsevlm_in_place(adapter, prompt, plan):
    """The reference rule as a straightforward loop: raters once, from the layer-0 states of all
    visual tokens and the text after the image; at each site the rater rows of the previous layer's
    attention score the visual tokens; top tokens kept, the best deleted ones recycled into cluster
    means appended after them; positions renumbered."""
    from inplace_loop import attention_rows, prefill_in_place

    sites = {site.layer: keep for site, keep in plan}
    lm = adapter.model.model.language_model
    raters: list[int] = []

    def prune(index, state, before):
        if index == 0:
            visual = state.inputs[0, state.start0:state.start0 + state.n0].tolist()
            text = state.inputs[0, state.start0 + state.n0:].tolist()
            raters.extend(slow_raters(visual, text))
        if index not in sites:
            return None
        rows = [state.text_rows[r] for r in raters]
        attention = attention_rows(lm.layers[index - 1], before.hidden, before.positions, rows, lm.rotary_emb)
        visual_columns = attention[:, state.start:state.start + state.n].tolist()
        score = [sum(row[j] for row in visual_columns) / len(rows) for j in range(state.n)]
        ranked = sorted(range(state.n), key=lambda j: -score[j])
        kept, deleted = ranked[:sites[index]], ranked[sites[index]:]
        recycled = deleted[:math.floor(0.3 * len(deleted)) + 1]
        features = state.hidden[0, state.start:state.start + state.n]
        clusters = slow_density_peaks([features[j].tolist() for j in recycled], len(recycled) // 10 + 1)
        return state.keep_visual(sorted(kept), torch.tensor(clusters), contiguous=True)

    return prefill_in_place(adapter, prompt, prune)


def test_default_raters_follow_the_reference_rule_on_the_tiny_llava():
    """Published "192" schedule (300/200/110 after layers 2/6/15): the adapter keeps the same tokens
    as the reference rule for 12 of 12 images; per-site raters are a different rule."""
    from adapter_tools import image
    from tiny_vlm import llava_adapter

    from tokenbench import Budget
    from tokenbench.adapters.base import Prompt

    adapter = llava_adapter()
    plan = SparseVLM(schedule="reference").schedule(576, 192, adapter.info())
    assert [keep for _, keep in plan] == [300, 200, 110]
    same, site_rule_differs = 0, 0
    for seed in range(12):
        prompt = Prompt(image(seed, 336), "what color is the circle left of the square ?")
        kept = {}
        for raters in ("input", "site"):
            RecordingSparseVLM.kept = []
            run = adapter.run([prompt], compressor=RecordingSparseVLM(schedule="reference", raters=raters),
                              budget=Budget.parse("192"), max_new_tokens=1)
            kept[raters] = (list(RecordingSparseVLM.kept), run.logits[0, 0])
        logits, states = sparsevlm_in_place(adapter, prompt, plan)
        reference = [states[site.layer].origin for site, _ in plan]
        same += kept["input"][0] == reference
        site_rule_differs += kept["site"][0] != reference
        torch.testing.assert_close(kept["input"][1], logits, rtol=1e-4, atol=1e-4)
    assert same == 12
    assert site_rule_differs > 0
