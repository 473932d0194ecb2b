"""The E2 (next vision block) and E7 (CLIP space) signals through the adapters, their refusals, and
DivPrune / CDPruner / PruMerge+ end to end on both tiny adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_tools import ALL, Scripted, adapter, model_dir, prompts
from click.testing import CliRunner
from torch.nn.attention import SDPBackend, sdpa_kernel

from tokenbench import Budget, Infeasible, Site, Stage
from tokenbench.adapters.base import Prompt
from tokenbench.adapters.llava import LlavaAdapter
from tokenbench.cli import cli
from tokenbench.plugins import load_registry

REGISTRY = load_registry()
LONG_TEXT = "what color is the circle on the left ?"  # 10 tokens with <s> </s>: two 8-token segments


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, tiny_llava_dir):
    """A full CLIP model whose vision tower is the tiny LLaVA's (8 text positions per segment)."""
    from tokenbench.tiny_models import tiny_clip

    return tiny_clip(tmp_path_factory.mktemp("tiny-clip"), vision_from=tiny_llava_dir)


def scripted(site: Site, needs: set[str], **attributes) -> Scripted:
    compressor = Scripted(site, needs=frozenset(needs))
    for key, value in attributes.items():
        setattr(compressor, key, value)
    return compressor


def _hooked_stock_tower(a, pixels):
    """The stock CLIP tower's forward with hooks on the q/k projections of the block after the
    selected one (how the PruMerge+ reference reads them): (outputs, q, k)."""
    block = a.model.model.vision_tower.encoder.layers[a.vision_blocks].self_attn
    seen = {}
    handles = [block.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
               block.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))]
    try:
        with torch.no_grad():
            outputs = a.model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, seen["q"], seen["k"]


@pytest.mark.parametrize("heads", ["mean", "concat"])
def test_next_block_signals_match_the_stock_tower(request, heads):
    a = adapter("llava", model_dir(request, "llava"), "eager")
    batch = prompts("llava", 2)
    compressor = scripted(Site(Stage.VISION_OUT), {"cls_attention_next", "keys_next"}, next_block_heads=heads)
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    outputs, q, k = _hooked_stock_tower(a, a._encode(batch).image_inputs["pixel_values"])
    x = compressor.seen[0].x
    attn = a.model.model.vision_tower.encoder.layers[a.vision_blocks].self_attn
    if heads == "mean":
        reference = outputs.attentions[a.vision_blocks].mean(dim=1)[:, 0, 1:]
        keys = k[:, 1:].view(2, 576, attn.num_heads, attn.head_dim).mean(dim=2)
    else:
        width = q.shape[-1]
        reference = (q[:, :1] @ k.transpose(1, 2) * width ** -0.5).softmax(dim=-1)[:, 0, 1:]
        keys = k[:, 1:]
    torch.testing.assert_close(x.cls_attention_next, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.keys_next, keys, rtol=1e-4, atol=1e-5)
    # the next block ran on the selected features, the stock hidden_states[-2] with CLS
    assert run.generations[0].trace.probe_rows == 1


def test_clip_signals_match_the_stock_clip_model(request, tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    a = adapter("llava", model_dir(request, "llava"), "sdpa")
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    for text, segments in (("what color is the circle ?", 1), (LONG_TEXT, 2)):
        batch = [Prompt(prompts("llava", 1)[0].image, text)]
        compressor = scripted(Site(Stage.PROJECTOR), {"clip_visual", "clip_text"}, clip_checkpoint=str(tiny_clip_dir))
        a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
        x = compressor.seen[0].x
        with torch.no_grad():
            pixels = a._encode(batch).image_inputs["pixel_values"]
            selected = clip.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            visual = clip.visual_projection(clip.vision_model.post_layernorm(selected))
            ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
            rows = []
            for start in range(0, len(ids), 8):  # zero-padded 8-token segments, masked padding
                piece = ids[start:start + 8]
                padded = torch.cat([piece, piece.new_zeros(8 - len(piece))])[None]
                mask = (torch.arange(8) < len(piece)).long()[None]
                rows.append(clip.get_text_features(input_ids=padded, attention_mask=mask).pooler_output[0])
        torch.testing.assert_close(x.clip_visual, visual, rtol=1e-4, atol=1e-5)
        assert x.clip_text.shape == (1, segments, clip.config.projection_dim)
        torch.testing.assert_close(x.clip_text[0], torch.stack(rows), rtol=1e-4, atol=1e-5)


def test_signals_an_adapter_cannot_serve_are_infeasible_with_the_reason(request, tiny_clip_dir, tmp_path):
    llava = adapter("llava", model_dir(request, "llava"), "sdpa")
    qwen = adapter("qwen2_vl", model_dir(request, "qwen2_vl"), "sdpa")
    clip_needs = {"clip_visual", "clip_text"}
    cases = [
        (llava, scripted(Site(Stage.PROJECTOR), clip_needs), r"clip_text, clip_visual.*llava adapter.*clip_checkpoint"),
        (llava, scripted(Site(Stage.LLM, 2), clip_needs, clip_checkpoint=str(tiny_clip_dir)), "at llm sites"),
        (llava, scripted(Site(Stage.PROJECTOR), {"keys_next"}), "keys_next.*vision_out only"),
        (qwen, scripted(Site(Stage.PROJECTOR), clip_needs, clip_checkpoint=str(tiny_clip_dir)),
         "clip_text, clip_visual.*qwen2_vl adapter.*no CLS token and no CLIP text tower"),
        (qwen, scripted(Site(Stage.PROJECTOR), {"cls_attention_next"}), "cls_attention_next.*qwen2_vl"),
    ]
    vision_only = tmp_path / "clip-vision-only"
    llava.model.model.vision_tower.save_pretrained(vision_only)
    cases.append((llava, scripted(Site(Stage.PROJECTOR), clip_needs, clip_checkpoint=str(vision_only)),
                  "clip_vision_model checkpoint without a CLIP text tower"))
    for a, compressor, message in cases:
        family = "llava" if a is llava else "qwen2_vl"
        with pytest.raises(Infeasible, match=message):
            a.generate(prompts(family, 1), compressor=compressor, budget=ALL)
        assert a.unserved_signal_reason(compressor, [(compressor.site, 10)])
        assert not compressor.seen  # refused before anything ran


def test_next_block_signals_are_refused_when_the_selected_layer_is_the_last_block(request):
    base = adapter("llava", model_dir(request, "llava"), "sdpa")
    model = base.model
    layer = model.config.vision_feature_layer
    model.config.vision_feature_layer = -1
    try:
        last = LlavaAdapter(model, base.processor)
    finally:
        model.config.vision_feature_layer = layer
    method = REGISTRY.compressor("prumerge-plus")()
    with pytest.raises(Infeasible, match="cls_attention_next, keys_next.*last CLIP block"):
        last.generate(prompts("llava", 1), compressor=method, budget=Budget.parse("11.1%"))


BUDGETS = ("33.3%", "22.2%", "11.1%")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", ["divprune", "cdpruner", "cdpruner-llm", "prumerge-plus", "prumerge-plus-adaptive"])
def test_end_to_end_at_the_default_budgets(request, tiny_clip_dir, family, name):
    a = adapter(family, model_dir(request, family), "sdpa")
    options = {"clip_checkpoint": str(tiny_clip_dir)} if name == "cdpruner" else {}
    compressor = REGISTRY.compressor(name)(**options)
    for text in BUDGETS:
        budget = Budget.parse(text)
        try:
            out = a.generate(prompts(family, 2), compressor=compressor, budget=budget, max_new_tokens=2)
        except Infeasible as exc:
            assert family == "qwen2_vl" and name in ("cdpruner", "prumerge-plus", "prumerge-plus-adaptive")
            assert "qwen2_vl" in str(exc) or "vision_out" in str(exc)
            continue
        for g in out:
            target = budget.target(g.trace.n_visual)
            if compressor.adaptive_count:  # labelled: its count follows the image, not the budget
                assert g.trace.plan == [("vision_out", 0, g.trace.n_visual)]
                assert 1 <= g.trace.realised_tokens < g.trace.n_visual
            else:
                assert abs(g.trace.realised_tokens - target) <= 0.02 * target
            assert 1 <= g.trace.generated_tokens <= 2


@pytest.mark.parametrize("name,declared", [("divprune", "native"), ("cdpruner-llm", "native"),
                                           ("prumerge-plus", "probe")])
def test_flash_sdpa_backend(request, name, declared):
    a = adapter("llava", model_dir(request, "llava"), "sdpa")
    compressor = REGISTRY.compressor(name)()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = a.generate(prompts("llava", 1), compressor=compressor, budget=Budget.parse("64"), max_new_tokens=2)
    trace = out[0].trace
    assert compressor.flash_attention == declared
    assert trace.eager_attention_calls == 0 and trace.probe_rows == (declared == "probe")


def test_the_harness_records_an_unserved_signal_as_infeasible(tiny_llava_dir, tmp_path):
    plugins = Path(__file__).parent / "test_runner_plugins"
    result = CliRunner().invoke(cli, ["--plugins-dir", str(plugins), "run", "--model", str(tiny_llava_dir),
                                      "--tasks", "tiny", "--methods", "cdpruner", "--budgets", "64",
                                      "--limit", "2", "--no-efficiency", "--output", str(tmp_path / "out"),
                                      "--json"], env={"TINY_SAMPLES": "2"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = next(r for r in json.loads(result.stdout) if r["method"] == "cdpruner")
    assert "clip_text, clip_visual" in record["infeasible"] and "llava adapter" in record["infeasible"]
    assert "-o cdpruner.clip_checkpoint=DIR" in record["infeasible"] and record["n_samples"] == 0
