"""DART: pivots and duplication-aware picks against a plain-loop re-implementation, budgets, and the
LLaVA prefill against a straightforward loop that prunes in place."""

from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import pytest
import torch
from llm_tools import model_info
from pydantic import ValidationError
from tokenbench.methods.dart import DART

from tokenbench import (
    Budget,
    Infeasible,
    Site,
    SiteInput,
    Stage,
    layer_averaged_tokens,
)


def cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def slow_dart(key_l1: list[float], text_key_l1: list[float], visual: list[list[float]],
              text: list[list[float]], keep: int, image_pivots: int = 4, text_pivots: int = 4) -> list[int]:
    """Spec §12.2 steps 4-7 (rank-order pivots, §12.4 remainder rule) on one sample."""
    by_norm = sorted(range(len(key_l1)), key=lambda i: -key_l1[i])[:image_pivots]
    text_by_norm = sorted(range(len(text_key_l1)), key=lambda i: -text_key_l1[i])[:text_pivots]
    pivots = [visual[i] for i in by_norm] + [text[i] for i in text_by_norm]
    picks = keep - len(by_norm)
    quotas = [picks // len(pivots) + (rank < picks % len(pivots)) for rank in range(len(pivots))]
    candidates = [i for i in range(len(visual)) if i not in by_norm]
    kept = list(by_norm)
    for pivot, quota in zip(pivots, quotas):
        ranked = sorted(candidates, key=lambda c: cosine(pivot, visual[c]))[:quota]  # least similar
        kept += ranked
        candidates = [c for c in candidates if c not in ranked]
    return sorted(kept)


def site_input(gen: torch.Generator, batch: int, n: int, t: int, keep: int, d: int = 8) -> SiteInput:
    return SiteInput(visual=torch.randn(batch, n, d, generator=gen), origin=torch.arange(n).expand(batch, n),
                     grid=(1, n), keep=keep, site=Site(Stage.LLM, 2),
                     key_l1=torch.rand(batch, n, generator=gen), text_key_l1=torch.rand(batch, t, generator=gen),
                     normed_visual=torch.randn(batch, n, d, generator=gen, dtype=torch.float64),
                     normed_text=torch.randn(batch, t, d, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("n, t, keep", [(60, 9, 20), (60, 9, 12), (45, 3, 31), (576, 12, 132), (50, 6, 50 - 1)])
def test_keeps_the_same_tokens_as_a_plain_loop(n, t, keep):
    gen = torch.Generator().manual_seed(n + keep)
    x = site_input(gen, 2, n, t, keep)
    reduction = DART().reduce(x)
    reduction.check(x)
    assert reduction.keep.shape == (2, keep)
    for b in range(2):
        assert reduction.keep[b].tolist() == slow_dart(x.key_l1[b].tolist(), x.text_key_l1[b].tolist(),
                                                       x.normed_visual[b].tolist(), x.normed_text[b].tolist(), keep)


def test_text_rows_of_different_lengths_are_masked():
    """Row 0's first three text entries are padding: its pivots come from its own three tokens."""
    gen = torch.Generator().manual_seed(5)
    x = site_input(gen, 2, 40, 6, 20)
    x.text_valid = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])
    x.text_key_l1[0, :3] = 100.0  # the largest norms sit on the padding
    reduction = DART().reduce(x)
    own = slow_dart(x.key_l1[0].tolist(), x.text_key_l1[0, 3:].tolist(), x.normed_visual[0].tolist(),
                    x.normed_text[0, 3:].tolist(), 20)
    assert reduction.keep[0].tolist() == own
    assert reduction.keep[1].tolist() == slow_dart(x.key_l1[1].tolist(), x.text_key_l1[1].tolist(),
                                                   x.normed_visual[1].tolist(), x.normed_text[1].tolist(), 20)


def test_image_pivots_are_kept_and_picks_are_least_similar():
    gen = torch.Generator().manual_seed(1)
    x = site_input(gen, 1, 80, 5, 36)
    kept = set(DART(pivot_text=0).reduce(x).keep[0].tolist())
    pivots = x.key_l1[0].topk(4).indices.tolist()
    assert set(pivots) <= kept
    # one image pivot slot per 8 picks: the first pivot's 8 picks are its 8 least similar tokens
    first = torch.nn.functional.cosine_similarity(x.normed_visual[0], x.normed_visual[0, pivots[0]][None], dim=-1)
    first[pivots] = float("inf")
    assert set(first.topk(8, largest=False).indices.tolist()) <= kept


def test_after_k_keeps_4_plus_8t_after_layer_2():
    for budget, kept in [(192, 196), (128, 132), (64, 68)]:
        plan = DART(budget_mode="after_k").schedule(576, budget, model_info())
        assert plan == [(Site(Stage.LLM, 2), kept)]
        assert layer_averaged_tokens(576, plan, 32) > budget  # layers 0 and 1 see all 576


@pytest.mark.parametrize("layers", [32, 28, 12, 4])
@pytest.mark.parametrize("n_visual, budget", [(576, 192), (576, 128), (576, 64), (144, 48), (144, 32),
                                              (144, 16)])
def test_layer_average_meets_the_budget_within_half_a_token(layers, n_visual, budget):
    info = model_info(layers, n_visual)
    try:
        plan = DART().schedule(n_visual, budget, info)
    except Infeasible as exc:
        k = info.scale_layer(2)
        assert (k * n_visual + (layers - k) * 12) / layers > budget, str(exc)
        assert "cannot go below" in str(exc)
        return
    assert abs(layer_averaged_tokens(n_visual, plan, layers) - budget) <= 0.5


def test_reference_depth_keeps_the_spec_counts():
    keeps = [DART().schedule(576, b, model_info())[0][1] for b in (192, 128, 64)]
    assert keeps == [166, 98, 30]  # 166.4 / 98.1 / 29.9 rounded


def test_options_and_class():
    with pytest.raises(ValidationError):
        DART(pivot_image=0)
    method = DART()
    assert method.flash_attention == "native" and method.positions == "original"
    assert method.needs == frozenset({"key_l1", "final_norm"})


# --- through the adapters, on tiny models -------------------------------------------------------

class RecordingDART(DART):
    """Remembers each sample's kept original indices (test only)."""

    kept: ClassVar[list[list[int]]] = []

    def reduce(self, x):
        result = super().reduce(x)
        RecordingDART.kept.extend(x.origin[b, result.keep[b]].tolist() for b in range(x.visual.shape[0]))
        return result


def dart_in_place(adapter, prompt, plan: list[tuple[Site, int]]):
    """The straightforward loop: before layer K, pivots from layer K-1's post-RoPE key L1 norms
    (recomputed from its input), similarity on the final-normed states, original positions kept."""
    from inplace_loop import layer_keys, prefill_in_place

    (site, keep), = plan
    lm = adapter.model.model.language_model

    def prune(index, state, before):
        if index != site.layer:
            return None
        keys = layer_keys(lm.layers[index - 1], before.hidden, before.positions, lm.rotary_emb)
        l1 = keys.abs().sum(dim=(1, 3))[0]
        normed = lm.norm(state.hidden)[0]
        visual = range(state.start, state.start + state.n)
        kept = slow_dart([float(l1[i]) for i in visual], [float(l1[i]) for i in state.text_rows],
                         [normed[i].tolist() for i in visual], [normed[i].tolist() for i in state.text_rows], keep)
        return state.keep_visual(kept)

    return prefill_in_place(adapter, prompt, prune)


@contextlib.contextmanager
def uneven_final_norm(adapter):
    """A random positive final-norm scale (a fresh model's is all ones, which a cosine cannot see)."""
    weight = adapter.model.model.language_model.norm.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.05)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("budget", ["192", "64"])
def test_llava_prefill_equals_a_loop_that_prunes_in_place(budget):
    from adapter_tools import image
    from tiny_vlm import llava_adapter

    from tokenbench.adapters.base import Prompt

    adapter = llava_adapter()
    prompt = Prompt(image(11, 336), "what color is the circle ?")
    RecordingDART.kept = []
    with uneven_final_norm(adapter):
        run = adapter.run([prompt], compressor=RecordingDART(), budget=Budget.parse(budget), max_new_tokens=1)
        plan = DART().schedule(576, float(budget), adapter.info())
        logits, states = dart_in_place(adapter, prompt, plan)
    assert states[plan[0][0].layer].origin == RecordingDART.kept[0]
    torch.testing.assert_close(run.logits[0, 0], logits, rtol=1e-4, atol=1e-4)
    assert run.layer_positions[-1][0].tolist() == states[-1].positions[0].tolist()  # gaps kept


def test_llava_batch_ranks_each_sample_by_its_own_states():
    """A left-padded batch (text of two lengths) keeps, per sample, what each keeps alone."""
    from adapter_tools import image
    from tiny_vlm import llava_adapter

    from tokenbench.adapters.base import Prompt

    adapter = llava_adapter()
    batch = [Prompt(image(1, 336), "what color is the circle ?"), Prompt(image(2, 336), "how many ?")]
    assert adapter.batchable(DART())
    RecordingDART.kept = []
    together = adapter.run(batch, compressor=RecordingDART(), budget=Budget.parse("128"), max_new_tokens=1)
    batched = list(RecordingDART.kept)
    for row, prompt in enumerate(batch):
        RecordingDART.kept = []
        run = adapter.run([prompt], compressor=RecordingDART(), budget=Budget.parse("128"), max_new_tokens=1)
        assert batched[row] == RecordingDART.kept[0]
        torch.testing.assert_close(together.logits[row, 0], run.logits[0, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_end_to_end_under_the_flash_backend_within_two_percent(family):
    from tiny_vlm import LLAVA_BUDGETS, RATIO_BUDGETS, llava_adapter, prompts, qwen_adapter
    from torch.nn.attention import SDPBackend, sdpa_kernel

    adapter = llava_adapter() if family == "llava" else qwen_adapter()
    for text in LLAVA_BUDGETS if family == "llava" else RATIO_BUDGETS:
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                generations = adapter.generate(prompts(2), compressor=DART(), budget=Budget.parse(text),
                                               max_new_tokens=2)
        except Infeasible as exc:  # 11.1% of Qwen's 144 tokens: fewer than one pick per pivot
            assert family == "qwen2_vl" and text == "11.1%" and "cannot go below" in str(exc)
            continue
        for generation in generations:
            trace = generation.trace
            target = Budget.parse(text).target(trace.n_visual)
            assert abs(trace.realised_tokens - target) <= 0.02 * target
            assert trace.eager_attention_calls == 0 and trace.probe_rows == 0
