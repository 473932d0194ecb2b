"""LLaVA-NeXT (anyres): keep-all equals stock HF, pruning keeps the newline tokens where the model
puts them, per-crop geometry, every built-in method at the paper ratios, FLOPs against FlopCounterMode."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from adapter_tools import ALL, Scripted, image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tokenbench import Budget, Infeasible, Site, Stage
from tokenbench.adapters.base import AdapterError, Prompt
from tokenbench.adapters.llava_next import LlavaNextAdapter
from tokenbench.adapters.prefill import contiguous_positions
from tokenbench.measure import full_flops
from tokenbench.plugins import load_registry

STEPS = 4
WIDE, TALL = (150, 100), (90, 130)  # (w, h): 1×2 and 2×1 sub-crops, both unpadded


def picture(seed: int, size: tuple[int, int]):
    return image(seed, max(size)).resize(size)


def same_size(batch: int, size=WIDE) -> list[Prompt]:
    texts = ["what color is the circle ?", "how many ?"]
    return [Prompt(picture(i, size), texts[i % 2]) for i in range(batch)]


@functools.cache
def _adapter(path: str, attn: str) -> LlavaNextAdapter:
    return LlavaNextAdapter.load(path, attn=attn)


@pytest.fixture
def adapter(tiny_llava_next_dir):
    return lambda attn="sdpa": _adapter(str(tiny_llava_next_dir), attn)


def stock(a: LlavaNextAdapter, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock ``generate`` on the processor's batch (it pads crops when the sizes differ)."""
    texts = [a.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
        add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = a.processor(images=[p.image for p in prompts], text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = a.model.generate(**enc, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    return out.sequences[:, enc["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


def _close(run, tokens, logits):
    steps = min(tokens.shape[1], run.tokens.shape[1])
    assert torch.equal(run.tokens[:, :steps], tokens[:, :steps])
    torch.testing.assert_close(run.logits[:, :steps], logits[:, :steps], rtol=1e-4, atol=1e-4)


SIGNALS = {Stage.VISION_OUT: frozenset({"keys", "cls_attention"}), Stage.PROJECTOR: frozenset(),
           Stage.LLM: frozenset({"attention", "keys"})}
SITES = [None, Site(Stage.VISION_OUT), Site(Stage.PROJECTOR), Site(Stage.LLM, 2)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("site", SITES, ids=lambda s: "none" if s is None else f"{s.stage}{s.layer}")
def test_keep_all_matches_stock(adapter, site, attn, batch):
    a = adapter(attn)
    prompts = same_size(batch)
    compressor = None
    if site is not None:
        needs = SIGNALS[site.stage] | ({"text"} if batch == 1 else set())
        compressor = Scripted(site, stride=1, needs=needs)
    run = a.run(prompts, compressor=compressor, budget=ALL, max_new_tokens=STEPS)
    _close(run, *stock(a, prompts))
    trace = run.generations[0].trace
    enc = a._encode(prompts)
    assert trace.n_visual == enc.n_visual < enc.n_span  # newlines are not visual tokens
    assert trace.llm_visual == [enc.n_visual] * 4
    if compressor is not None:
        seen = compressor.seen[0].x
        assert seen.visual.shape[1] == enc.n_visual
        assert seen.crops == enc.crops.grids and seen.crop_origin.shape == (batch, enc.n_visual, 3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_different_crop_counts_are_grouped_and_match_stock_batch(adapter, attn):
    """Images of different aspect ratios (2 vs 3 crops here, 1×2 vs 2×1 sub-crops) in one request:
    generate() runs them as separate groups, and each equals its row of the stock batched generate."""
    a = adapter(attn)
    prompts = [Prompt(picture(0, WIDE), "what color is the circle ?"), Prompt(picture(1, (100, 100)), "how many ?"),
               Prompt(picture(2, WIDE), "how many ?")]
    groups = a._groups(prompts, None)
    assert [len(g) for g in groups] == [2, 1]
    layouts = {a._encode(g).n_span for g in groups}
    assert len(layouts) == 2
    tokens, logits = stock(a, prompts)
    rows = {0: [0, 2], 1: [1]}
    for index, group in enumerate(groups):
        run = a.run(group, max_new_tokens=STEPS)
        _close(run, tokens[rows[index]], logits[rows[index]])
    texts = [g.text for g in a.generate(prompts, max_new_tokens=STEPS)]
    assert texts == [a.processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def _stock_span(a: LlavaNextAdapter, enc) -> torch.Tensor:
    """Whether each placeholder of the stock packed features is a newline token [n_span]."""
    with torch.no_grad():
        packed = a.model.model.get_image_features(**enc.image_inputs).pooler_output[0]
    return (packed == a.model.model.image_newline).all(dim=-1)


PRUNE = [(Site(Stage.VISION_OUT), "original"), (Site(Stage.PROJECTOR), "contiguous"),
         (Site(Stage.LLM, 2), "original"), (Site(Stage.LLM, 1), "contiguous")]


@pytest.mark.parametrize("site,policy", PRUNE, ids=lambda v: f"{v.stage}{v.layer}" if isinstance(v, Site) else v)
def test_pruning_keeps_newlines_where_the_model_puts_them(adapter, site, policy):
    """Every other visual token kept, two appended: each decoder layer from the site on sees the
    kept visual tokens and every newline in their original order, the appended tokens after the
    last newline, with original or renumbered position ids."""
    a = adapter()
    prompts = same_size(2)
    compressor = Scripted(site, stride=2, positions=policy, extra=2)
    run = a.run(prompts, compressor=compressor, budget=ALL, max_new_tokens=3)
    enc = a._encode(prompts)
    is_newline = _stock_span(a, enc)
    visual_slots = torch.nonzero(~is_newline)[:, 0]
    assert visual_slots.numel() == enc.n_visual
    kept_slots = visual_slots[::2]
    span = torch.cat([torch.sort(torch.cat([kept_slots, torch.nonzero(is_newline)[:, 0]])).values,
                      torch.full((2,), enc.n_span - 1)])
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    s = enc.input_ids.shape[1]
    index = torch.stack([torch.cat([torch.arange(int(p)), int(p) + span, torch.arange(int(p) + enc.n_span, s)])
                         for p in start])
    full = contiguous_positions(enc.attention_mask.bool())
    expected = contiguous_positions(enc.attention_mask.bool().gather(1, index)) if policy == "contiguous" \
        else full.gather(1, index)
    first = site.layer if site.stage is Stage.LLM else 0
    for layer, positions in enumerate(run.layer_positions):
        torch.testing.assert_close(positions, expected if layer >= first else full, rtol=0, atol=0)
    kept = -(-enc.n_visual // 2) + 2
    assert run.generations[0].trace.llm_visual == [enc.n_visual] * first + [kept] * (4 - first)
    seen = compressor.seen[0].x
    assert seen.visual.shape[1] == enc.n_visual  # the compressor never sees a newline


def test_crop_origin_locates_each_visual_token(adapter):
    """(crop, y, x) of every visual token: the stock CLIP features of that crop patch are the ones
    the compressor sees at vision_out."""
    a = adapter()
    prompts = same_size(1, TALL)
    compressor = Scripted(Site(Stage.VISION_OUT), stride=1)
    a.run(prompts, compressor=compressor, budget=ALL, max_new_tokens=1)
    x = compressor.seen[0].x
    enc = a._encode(prompts)
    with torch.no_grad():
        crops = a.model.model.vision_tower(enc.image_inputs["pixel_values"][0], output_hidden_states=True)
    features = crops.hidden_states[-2][:, 1:]  # [C, 64, D]
    grids = x.crops
    assert len(grids) == 3 and grids[0] == (8, 8) and sum(h * w for h, w in grids) == x.visual.shape[1]
    crop, y, xx = x.crop_origin[0].unbind(-1)
    assert int(y.max()) < 8 and int(xx.max()) < 8
    # unpadding cuts whole rows of the 2×1 sub-crop column: each sub-crop keeps full-width rows
    offsets = {c: 8 - grids[c][0] if c == 1 else 0 for c in range(3)}  # the top crop loses rows at its top
    for c in range(3):
        member = crop == c
        rows = y[member] + (offsets[c] if c == 1 else 0)
        patches = features[c, rows * 8 + xx[member]]
        torch.testing.assert_close(x.visual[0, member], patches, rtol=1e-5, atol=1e-5)


BUDGETS = ["33.3%", "22.2%", "11.1%"]


@pytest.mark.parametrize("method", sorted(load_registry().compressors))
def test_every_method_runs_or_is_infeasible(adapter, method):
    registry = load_registry()
    a = adapter()
    prompts = same_size(2)
    for text in BUDGETS:
        budget = Budget.parse(text)
        try:
            out = a.generate(prompts, compressor=registry.compressor(method)(), budget=budget, max_new_tokens=2)
        except (Infeasible, AdapterError) as exc:
            assert str(exc), f"{method} must say why it cannot run"
            continue
        for g in out:
            target = budget.target(g.trace.n_visual)
            if method == "none":
                continue
            assert abs(g.trace.realised_tokens - target) <= 0.02 * target, (method, text, g.trace.realised_tokens)


def test_apet_compresses_each_crop_on_its_own(adapter):
    """ApET's default on multi-crop images (spec §2.6): each crop keeps its share of the budget."""
    from tokenbench.methods.apet import ApET, crop_keeps

    a = adapter()
    prompts = same_size(1)
    seen = []

    class Recording(ApET):
        def reduce(self, x):
            out = super().reduce(x)
            seen.append((x, out))
            return out

    a.generate(prompts, compressor=Recording(stage2=False, fps_start="first"), budget=Budget.parse("22.2%"),
               max_new_tokens=1)
    x, out = seen[0]
    crop = x.crop_origin[0, :, 0]
    counts = torch.bincount(crop).tolist()
    kept = torch.bincount(crop[out.keep[0]], minlength=len(counts)).tolist()
    assert kept == crop_keeps(counts, x.keep) and sum(kept) == x.keep
    assert crop_keeps([64, 48, 48], 35) == [14, 11, 10] and crop_keeps([5, 5], 1) == [1, 0]


ARMS = [(None, None), ("random", "22.2%"), ("fastv", "33.3%"), ("apet", "11.1%")]


@pytest.mark.parametrize("method, budget", ARMS, ids=[m or "none" for m, _ in ARMS])
def test_full_flops_match_flop_counter(adapter, method, budget):
    a = adapter()
    compressor = load_registry().compressor(method)() if method else None
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        generation = a.generate(same_size(1), compressor=compressor,
                                budget=Budget.parse(budget) if budget else None, max_new_tokens=3)[0]
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}

    def total(pattern: str) -> int:
        return sum(v for k, v in counts.items() if re.fullmatch(pattern, k))

    flops = full_flops(a.info().arch, generation.trace)
    steps = generation.trace.generated_tokens - 1
    assert total("CLIPEncoderLayer") == flops["vision"]
    assert total("LlavaNextMultiModalProjector") == flops["projector"]
    assert total("LlamaDecoderLayer") == flops["llm_prefill"] + flops["decode"] - steps * flops["lm_head"]
    assert total("Linear") == (steps + 1) * flops["lm_head"]
