"""ToMe and tome-pre: merging against a plain-loop re-implementation, r schedules, budget mapping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tokenbench.methods.tome import ToMe, ToMePre, merge_schedule

from tokenbench import Architecture, Infeasible, ModelInfo, Site, SiteInput, Stage, layer_averaged_tokens


def model_info(n_visual: int = 576, vision_tokens: int = 577, vision_layers: int = 23,
               stages: frozenset[Stage] = frozenset(Stage)) -> ModelInfo:
    arch = Architecture(llm_layers=32, llm_hidden=64, llm_intermediate=128, llm_heads=4,
                        llm_kv_heads=4, vocab_size=100, vision_layers=vision_layers,
                        vision_hidden=32, vision_intermediate=64, vision_tokens=vision_tokens,
                        projector_in=32, projector_hidden=64)
    return ModelInfo("llava", stages, (24, 24), n_visual, arch)


def cosine(u, v):
    return sum(a * b for a, b in zip(u, v)) / (math.sqrt(sum(a * a for a in u)) *
                                               math.sqrt(sum(b * b for b in v)))


def slow_bipartite(x: list[list[float]], metric: list[list[float]], sizes: list[float], r: int,
                   offset: int = 0):
    """One ToMe step on one sample with plain loops: returns (kept indices, merged rows, sizes).

    ``offset`` tokens (a class token) precede ``x`` in the alternation: i is in A when i + offset is even."""
    n = len(x)
    a_side = [i for i in range(n) if (i + offset) % 2 == 0]
    b_side = [i for i in range(n) if (i + offset) % 2 == 1]
    best = {}
    for a in a_side:
        sims = [(cosine(metric[a], metric[b]), b) for b in b_side]
        top = max(s for s, _ in sims)
        best[a] = (top, next(b for s, b in sims if s == top))
    ranked = sorted(a_side, key=lambda a: -best[a][0])
    merged_away = ranked[:r]
    totals = {b: ([v * sizes[b] for v in x[b]], sizes[b]) for b in b_side}
    for a in merged_away:
        b = best[a][1]
        row, size = totals[b]
        totals[b] = ([p + v * sizes[a] for p, v in zip(row, x[a])], size + sizes[a])
    kept = sorted(set(range(n)) - set(merged_away))
    rows, new_sizes = [], []
    for i in kept:
        if i in totals:
            row, size = totals[i]
            rows.append([v / size for v in row])
            new_sizes.append(size)
        else:
            rows.append(list(x[i]))
            new_sizes.append(sizes[i])
    return kept, rows, new_sizes


def vision_input(x: torch.Tensor, keep: int, keys: torch.Tensor | None = None,
                 sizes: torch.Tensor | None = None) -> SiteInput:
    b, n, _ = x.shape
    return SiteInput(visual=x, origin=torch.arange(n).expand(b, n), grid=(1, n), keep=keep,
                     site=Site(Stage.VISION, 3), keys=keys,
                     sizes=sizes if sizes is not None else torch.ones(b, n))


@pytest.mark.parametrize("partition, class_token, offset",
                         [("reference", True, 1), ("reference", False, 0), ("patches", True, 0)])
@pytest.mark.parametrize("n, keep", [(31, 20), (40, 20), (12, 11)])
def test_tome_step_matches_a_plain_loop_merge(n, keep, partition, class_token, offset):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 6, generator=gen, dtype=torch.float64)
    keys = torch.randn(2, n, 5, generator=gen, dtype=torch.float64)
    sizes = torch.randint(1, 4, (2, n), generator=gen).double()
    site = vision_input(x, keep, keys, sizes)
    method = ToMe(partition=partition)
    method.class_token = class_token
    reduction = method.reduce(site)
    reduction.check(site)
    for i in range(2):
        kept, rows, new_sizes = slow_bipartite(x[i].tolist(), keys[i].tolist(), sizes[i].tolist(),
                                               n - keep, offset)
        assert reduction.keep[i].tolist() == kept
        assert torch.allclose(reduction.values[i], torch.tensor(rows, dtype=torch.float64))
        assert reduction.sizes[i].tolist() == new_sizes


def reference_groups_with_cls(metric: list[list[float]], r: int) -> set[frozenset[int]]:
    """ToMe's bipartite matching (tome/merge.py, class_token=True) on [CLS, patches], in plain loops.

    The alternation runs over the whole sequence: A = even positions (CLS first, its scores -inf,
    so never merged), B = odd positions; r is capped at (T - 1) // 2; the r A tokens with the best
    match merge into it. Returns every merge group of two or more tokens as patch indices
    (sequence position - 1)."""
    t = len(metric)
    r = min(r, (t - 1) // 2)
    a_side, b_side = list(range(0, t, 2)), list(range(1, t, 2))
    best = {}
    for a in a_side:
        if a == 0:
            best[a] = (-math.inf, b_side[0])
            continue
        sims = [(cosine(metric[a], metric[b]), b) for b in b_side]
        top = max(s for s, _ in sims)
        best[a] = (top, next(b for s, b in sims if s == top))
    merged = sorted(a_side, key=lambda a: -best[a][0])[:r]
    groups: dict[int, set[int]] = {}
    for a in merged:
        groups.setdefault(best[a][1], {best[a][1]}).add(a)
    return {frozenset(p - 1 for p in group) for group in groups.values()}


def merge_groups(reduction) -> set[frozenset[int]]:
    """Merge groups of a one-sample reduction of one-hot features: the rows that mix several tokens."""
    values = reduction.values[0]
    return {frozenset(torch.nonzero(row).flatten().tolist()) for row in values if (row != 0).sum() > 1}


def jaccard(groups: set[frozenset[int]], other: set[frozenset[int]]) -> float:
    return len(groups & other) / len(groups | other)


@pytest.mark.parametrize("r", [1, 50, 144, 288])
def test_partition_counts_the_class_token_as_tome_does(r):
    """577 CLIP tokens (CLS + 24x24 patches): the groups equal ToMe's own matching with a class token,
    where patch p is in A when p is odd; the patches-only split (A = even patches) differs."""
    gen = torch.Generator().manual_seed(r)
    metric = torch.randn(577, 8, generator=gen, dtype=torch.float64)
    expected = reference_groups_with_cls(metric.tolist(), r)
    assert len(expected) >= 1 and sum(len(g) - 1 for g in expected) == r
    patches = torch.eye(576, dtype=torch.float64)[None]  # one-hot rows reveal who merged with whom
    site = vision_input(patches, 576 - r, metric[None, 1:])
    method = ToMe()
    method.schedule(576, 576 - r, model_info())  # CLIP: 577 encoder tokens for 576 patches
    assert method.class_token
    groups = merge_groups(method.reduce(site))
    assert groups == expected
    patches_only = merge_groups(ToMe(partition="patches").reduce(site))
    if r > 1:
        assert jaccard(patches_only, expected) < 0.99


def test_no_class_token_alternates_from_the_first_patch():
    method = ToMe()
    method.schedule(576, 300, model_info(vision_tokens=576))
    assert not method.class_token


def test_merging_conserves_size_weighted_mass():
    gen = torch.Generator().manual_seed(0)
    x, keys = torch.randn(3, 64, 8, generator=gen), torch.randn(3, 64, 4, generator=gen)
    reduction = ToMe().reduce(vision_input(x, 40, keys))
    assert torch.allclose((reduction.values * reduction.sizes[..., None]).sum(1), x.sum(1), atol=1e-4)
    assert reduction.sizes.sum(1).tolist() == [64.0] * 3


def test_tome_refuses_to_merge_more_than_half_at_one_block():
    x = torch.randn(1, 20, 4)
    with pytest.raises(ValueError, match="at most half"):
        ToMe().reduce(vision_input(x, 9, torch.randn(1, 20, 4)))


def test_tome_pre_matches_repeated_plain_loop_merges():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 45, 6, generator=gen, dtype=torch.float64)
    site = vision_input(x, 9)
    reduction = ToMePre().reduce(site)
    reduction.check(site)
    for i in range(2):
        index, rows, sizes = list(range(45)), x[i].tolist(), [1.0] * 45
        while len(rows) > 9:
            r = min(len(rows) // 2, len(rows) - 9)
            kept, rows, sizes = slow_bipartite(rows, rows, sizes, r)
            index = [index[k] for k in kept]
        assert reduction.keep[i].tolist() == index
        assert torch.allclose(reduction.values[i], torch.tensor(rows, dtype=torch.float64))
        assert reduction.sizes[i].tolist() == sizes


@pytest.mark.parametrize("n, target, blocks", [(576, 64, 22), (576, 192, 22), (576, 150, 2),
                                               (576, 37, 4), (100, 99, 3), (577, 289, 1)])
def test_merge_schedule_removes_exactly_the_excess_at_most_half_per_block(n, target, blocks):
    plan = merge_schedule(n, target, blocks)
    assert len(plan) == blocks and sum(plan) == n - target
    alive = n
    for r in plan:
        assert 0 <= r <= alive // 2
        alive -= r


def test_merge_schedule_infeasible_below_repeated_halving():
    with pytest.raises(Infeasible, match="at best"):
        merge_schedule(576, 35, 4)  # 576 -> 288 -> 144 -> 72 -> 36


@pytest.mark.parametrize("budget", [192, 128, 64, 0.111 * 576])
@pytest.mark.parametrize("vision_layers", [23, 4, 2])
def test_budget_reaches_the_llm_exactly_or_is_infeasible(budget, vision_layers):
    info = model_info(vision_layers=vision_layers)
    try:
        plan = ToMe().schedule(576, budget, info)
    except Infeasible as exc:
        assert round(budget) < math.ceil(576 / 2 ** (vision_layers - 1)), str(exc)
        return
    assert all(site.stage is Stage.VISION and 1 <= site.layer < vision_layers for site, _ in plan)
    counts = [576] + [keep for _, keep in plan]
    assert all(later >= earlier - earlier // 2 for earlier, later in itertools.pairwise(counts))
    assert abs(layer_averaged_tokens(576, plan, 32) - budget) <= 1


def test_tome_needs_a_vision_stage_and_one_token_per_patch():
    no_vision = model_info(stages=frozenset({Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM}))
    with pytest.raises(Infeasible, match="tome-pre"):
        ToMe().schedule(576, 64, no_vision)
    qwen_like = model_info(n_visual=256, vision_tokens=1024)  # 2x2 patch merger after the encoder
    with pytest.raises(Infeasible, match="tome-pre"):
        ToMe().schedule(256, 64, qwen_like)


def test_tome_pre_acts_once_before_the_llm():
    plan = ToMePre().schedule(576, 64, model_info())
    assert plan == [(Site(Stage.VISION_OUT), 64)]
    projector_only = model_info(stages=frozenset({Stage.PROJECTOR, Stage.LLM}))
    assert ToMePre().schedule(576, 64, projector_only) == [(Site(Stage.PROJECTOR), 64)]


def test_flash_attention_classes_and_proportional_attention():
    assert ToMe().flash_attention == "native" and ToMe.needs == frozenset({"keys"})
    assert ToMe.proportional_attention
    assert ToMePre().flash_attention == "native" and not ToMePre.needs


# --- through the adapters, on tiny models -------------------------------------------------------

def generate_trace(adapter, method, budget: str):
    from tiny_vlm import prompts
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenbench import Budget

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return adapter.generate(prompts(), compressor=method, budget=Budget.parse(budget),
                                max_new_tokens=2)[0].trace


@pytest.mark.parametrize("budget", ["192", "128", "64"])
@pytest.mark.parametrize("method", [ToMe, ToMePre])
def test_llava_end_to_end_under_the_flash_backend(method, budget):
    from tiny_vlm import llava_adapter

    trace = generate_trace(llava_adapter(), method(), budget)
    assert trace.llm_visual == [int(budget)] * 32 and trace.realised_tokens == int(budget)
    assert trace.eager_attention_calls == 0 and trace.probe_rows == 0
    if method is ToMe:  # merged inside the encoder: each block sees fewer tokens (CLS included)
        assert trace.vision[0] == 577 and trace.vision[-1] < trace.vision[1] < 577
        assert all(later >= earlier - (earlier - 1) // 2
                   for earlier, later in itertools.pairwise(trace.vision))


@pytest.mark.parametrize("budget", ["33.3%", "22.2%", "11.1%"])
def test_qwen2_vl_end_to_end_at_ratio_budgets(budget):
    from tiny_vlm import qwen_adapter

    from tokenbench import Budget

    adapter = qwen_adapter()
    with pytest.raises(Infeasible, match="tome-pre"):
        generate_trace(adapter, ToMe(), budget)
    trace = generate_trace(adapter, ToMePre(), budget)
    target = Budget.parse(budget).target(trace.n_visual)
    assert abs(trace.realised_tokens - target) <= 1 and trace.eager_attention_calls == 0
