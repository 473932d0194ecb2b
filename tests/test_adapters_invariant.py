"""Keep-all invariant: the adapters' own prefill and decode reproduce the stock HF model exactly.

For each adapter, attention implementation (eager, sdpa), batch size (1, and 2 with left padding)
and stage, a method that keeps every token (and asks for every signal that stage offers, so the
probes run too) gives the same per-step logits and the same greedy tokens as ``model.generate``.
"""

from __future__ import annotations

import pytest
import torch
from adapter_tools import ALL, Scripted, adapter, model_dir, prompts, stock_generate

from tokenbench import Site, Stage
from tokenbench.plugins import load_registry

STEPS = 4
SIGNALS = {  # signals each stage offers (pre-LLM text needs batch 1; added below where allowed)
    Stage.VISION: frozenset({"keys"}),
    Stage.VISION_OUT: frozenset({"keys", "cls_attention"}),
    Stage.PROJECTOR: frozenset(),
    Stage.LLM: frozenset({"attention", "keys", "text", "key_l1", "final_norm", "input_states"}),
}
CASES = [("llava", None), ("llava", Site(Stage.VISION, 1)), ("llava", Site(Stage.VISION_OUT)),
         ("llava", Site(Stage.PROJECTOR)), ("llava", Site(Stage.LLM, 2)),
         ("qwen2_vl", None), ("qwen2_vl", Site(Stage.PROJECTOR)), ("qwen2_vl", Site(Stage.LLM, 2)),
         ("qwen2_5_vl", None), ("qwen2_5_vl", Site(Stage.PROJECTOR)), ("qwen2_5_vl", Site(Stage.LLM, 2))]


@pytest.fixture(scope="module")
def reference(request):
    """Stock generate per (family, attn, batch), computed once."""
    cache = {}

    def get(family: str, attn: str, batch: int):
        key = (family, attn, batch)
        if key not in cache:
            a = adapter(family, model_dir(request, family), attn)
            cache[key] = stock_generate(a, prompts(family, batch), STEPS)
        return cache[key]
    return get


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,site", CASES, ids=lambda v: str(v) if not isinstance(v, Site) else
                         f"{v.stage}{v.layer}")
def test_keep_all_matches_stock(request, reference, family, site, attn, batch):
    a = adapter(family, model_dir(request, family), attn)
    compressor = None
    if site is not None:
        needs = SIGNALS[site.stage] | ({"text"} if batch == 1 and site.stage is not Stage.VISION else set())
        compressor = Scripted(site, stride=1, needs=needs)
    run = a.run(prompts(family, batch), compressor=compressor, budget=ALL, max_new_tokens=STEPS)
    tokens, logits = reference(family, attn, batch)
    steps = min(tokens.shape[1], run.tokens.shape[1])
    assert torch.equal(run.tokens[:, :steps], tokens[:, :steps])
    torch.testing.assert_close(run.logits[:, :steps], logits[:, :steps], rtol=1e-4, atol=1e-4)
    if compressor is not None:
        assert compressor.seen, "the keep-all site must have run"
        assert all(g.trace.plan == [(str(site.stage), site.layer, g.trace.n_visual)] for g in run.generations)
    n_visual = run.generations[0].trace.n_visual
    for g in run.generations:
        assert g.trace.llm_visual == [n_visual] * len(a._decoder().layers)
        eager_calls = len(a._decoder().layers) + len(g.trace.vision) if attn == "eager" else 0
        assert g.trace.eager_attention_calls == eager_calls


def test_registry_lists_both_families():
    registry = load_registry()
    assert registry.adapter_for("llava").name == "llava"
    assert registry.adapter_for("qwen2_vl").name == "qwen2_vl"
    assert registry.adapter_for("qwen2_5_vl").name == "qwen2_vl"
    assert set(registry.adapter_for("llava").stages) == set(Stage)
    assert set(registry.adapter_for("qwen2_vl").stages) == {Stage.PROJECTOR, Stage.LLM, Stage.DECODE}


def test_model_info_and_load_errors(request):
    from tokenbench.adapters.base import AdapterError
    from tokenbench.adapters.llava import LlavaAdapter
    from tokenbench.adapters.qwen2_vl import Qwen2VLAdapter

    llava = adapter("llava", model_dir(request, "llava"), "sdpa")
    info = llava.info()
    assert info.grid == (24, 24) and info.n_visual == 576 and info.llm_layers == 4
    assert info.arch.vision_layers == 2 and info.arch.vision_tokens == 577  # 3 blocks, feature layer -2
    qwen = adapter("qwen2_vl", model_dir(request, "qwen2_vl"), "sdpa").info(64, grid=(8, 8))
    assert qwen.arch.vision_tokens == 256 and qwen.arch.projector_in == 128 and qwen.stages == Qwen2VLAdapter.stages
    with pytest.raises(AdapterError, match="use one of"):
        LlavaAdapter.load(model_dir(request, "llava"), attn="flex_attention")
    with pytest.raises(AdapterError, match="'qwen2_vl' model"):
        LlavaAdapter.load(model_dir(request, "qwen2_vl"))
