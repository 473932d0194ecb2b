"""The vision signals of contract extensions E1 and E3 through the adapters: ``cls_token``,
``attention_received``, ``Reduction.prefix``, and schedule-time refusal of unserved signals."""

from __future__ import annotations

import pytest
import torch
from adapter_tools import ALL, Scripted, adapter, model_dir, prompts
from tokenbench.methods.fastervlm import FasterVLM
from tokenbench.methods.visionzip import VisionZip

from tokenbench import Budget, Infeasible, Reduction, Site, Stage
from tokenbench.adapters.probe import head_mean_received
from tokenbench.compressor import check_signals


class WithPrefix(Scripted):
    """Keeps every ``stride``-th token and puts the CLS token first (planned: one slot more)."""

    def schedule(self, n_visual, budget, info):
        return [(self.site, self.kept(n_visual) + 1)]

    def reduce(self, x):
        kept = super().reduce(x)
        return Reduction(kept.keep, prefix=x.cls_token)


def test_llava_cls_token_and_received_attention_match_the_stock_vision_tower(request):
    a = adapter("llava", model_dir(request, "llava"), "eager")
    batch = prompts("llava", 2)
    compressor = Scripted(Site(Stage.VISION_OUT), needs=frozenset({"cls_token", "attention_received"}))
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    pixels = a._encode(batch).image_inputs["pixel_values"]
    with torch.no_grad():
        out = a.model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    x = compressor.seen[0].x
    selected = out.hidden_states[a.model.config.vision_feature_layer]
    torch.testing.assert_close(x.cls_token, selected[:, :1])
    full = out.attentions[a.vision_blocks - 1]  # [B, H, 577, 577], the block of the selected layer
    torch.testing.assert_close(x.attention_received, full.mean(dim=1).mean(dim=1)[:, 1:], rtol=1e-4, atol=1e-7)
    assert x.attention_received.shape == (2, 576)
    assert run.generations[0].trace.probe_rows == 577  # every query row, computed beside the kernel


def _eager_vision_maps(monkeypatch, a) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Record (attention module, softmax map) of every eager vision attention call."""
    module = __import__(type(a.model.model.visual.blocks[0].attn).__module__, fromlist=["x"])
    stock = module.eager_attention_forward
    calls = []

    def recording(attn, *args, **kwargs):
        output, weights = stock(attn, *args, **kwargs)
        calls.append((attn, weights))
        return output, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    return calls


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_received_attention_matches_the_stock_eager_maps(request, monkeypatch, family):
    """Mean over heads and queries of the last ViT block's eager maps (per image or window segment),
    pooled per merged 2×2 token and put in the merger's output order."""
    from transformers.vision_utils import get_vision_window_index

    a = adapter(family, model_dir(request, family), "eager")
    calls = _eager_vision_maps(monkeypatch, a)
    batch = prompts(family, 2)
    compressor = Scripted(Site(Stage.PROJECTOR), needs=frozenset({"attention_received"}))
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    visual = a.model.model.visual
    maps = [w for attn, w in calls if attn is visual.blocks[-1].attn]
    received = torch.cat([w[0].mean(dim=0).sum(dim=0) for w in maps])  # column sums per segment, packed
    pooled = received.view(-1, 4).sum(dim=1)
    if family == "qwen2_5_vl":
        grid_thw = a._encode(batch).image_inputs["image_grid_thw"]
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=visual.window_size,
                                           patch_size=visual.patch_size)
        pooled = pooled[index.argsort()]
    x = compressor.seen[0].x
    n = x.visual.shape[1]
    torch.testing.assert_close(x.attention_received, pooled.view(2, n) / (4 * n), rtol=1e-4, atol=1e-7)
    if family == "qwen2_vl":  # full attention: every query row sums to one, so the signal sums to one
        torch.testing.assert_close(x.attention_received.sum(dim=1), torch.ones(2), rtol=1e-5, atol=1e-5)
    assert run.generations[0].trace.probe_rows == 4 * n


def test_streamed_received_attention_equals_the_full_map():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 50, 8, generator=g)
    bias = torch.randn(2, 1, 50, generator=g)
    full = ((q @ k.transpose(-1, -2)) * 0.3 + bias[:, None]).softmax(dim=-1).mean(dim=1).mean(dim=1)
    for budget in (1, 3 * 50 * 7, 1 << 24):  # one query per chunk, 7 per chunk, all at once
        torch.testing.assert_close(head_mean_received(q, k, 0.3, bias, max_scores=budget), full)


def test_prefix_passes_through_the_projector_and_counts(request):
    a = adapter("llava", model_dir(request, "llava"), "sdpa")
    compressor = WithPrefix(Site(Stage.VISION_OUT), stride=4, needs=frozenset({"cls_token"}))
    run = a.run(prompts("llava", 2), compressor=compressor, budget=ALL, max_new_tokens=2)
    layers = len(a._decoder().layers)
    assert all(g.trace.llm_visual == [144 + 1] * layers for g in run.generations)


def test_prefix_only_at_pre_llm_sites():
    from tokenbench import SiteInput

    x = SiteInput(visual=torch.zeros(1, 4, 2), origin=torch.arange(4)[None], grid=(2, 2), keep=2,
                  site=Site(Stage.LLM, 1))
    with pytest.raises(ValueError, match="prefix"):
        Reduction(torch.tensor([[0]]), prefix=torch.zeros(1, 1, 2)).check(x)
    x.site = Site(Stage.VISION_OUT)
    with pytest.raises(ValueError, match="prefix"):  # kept + prefix count toward the plan's keep
        Reduction(torch.tensor([[0, 1]]), prefix=torch.zeros(1, 1, 2)).check(x)
    Reduction(torch.tensor([[0]]), prefix=torch.zeros(1, 1, 2)).check(x)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_refuses_cls_signals_at_schedule_time(request, family):
    """No CLS token in Qwen2-VL: asking for it is Infeasible naming the signal and the adapter, before
    any site runs; ``importance=auto`` falls back to received attention."""
    a = adapter(family, model_dir(request, family), "sdpa")
    batch = prompts(family, 1)
    budget = Budget.parse("22.2%")
    with pytest.raises(Infeasible, match="cls_token.*qwen2_vl"):
        a.generate(batch, compressor=VisionZip(cls="first"), budget=budget, max_new_tokens=1)
    with pytest.raises(Infeasible, match="cls_attention.*qwen2_vl"):
        a.generate(batch, compressor=FasterVLM(importance="cls"), budget=budget, max_new_tokens=1)
    scripted = Scripted(Site(Stage.PROJECTOR), stride=2, needs=frozenset({"cls_attention"}))
    with pytest.raises(Infeasible, match="cls_attention at projector, which the qwen2_vl adapter"):
        a.generate(batch, compressor=scripted, budget=ALL, max_new_tokens=1)
    assert not scripted.seen
    method = FasterVLM()
    out = a.generate(batch, compressor=method, budget=budget, max_new_tokens=1)
    assert method.needs == {"attention_received"} and out[0].trace.probe_rows > 0


def test_check_signals_passes_when_the_adapter_does_not_say():
    from tokenbench.testing import LLAVA_15

    check_signals("x", {"anything"}, [(Site(Stage.VISION_OUT), 3)], LLAVA_15)  # signals=None: no check
