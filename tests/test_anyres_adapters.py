"""Anyres adapters, LLaVA-NeXT and LLaVA-OneVision: keep-all equals stock HF, pruning keeps the
newline tokens where the model puts them, per-crop geometry, every built-in method at the paper
ratios, FLOPs against FlopCounterMode."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from adapter_tools import ALL, Scripted, counted_flops, image

from tokenbench import Budget, Infeasible, Site, Stage
from tokenbench.adapters.base import AdapterError, Prompt
from tokenbench.adapters.llava_next import LlavaNextAdapter
from tokenbench.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenbench.adapters.prefill import contiguous_positions
from tokenbench.measure import full_flops
from tokenbench.plugins import load_registry

STEPS = 4
LAYERS = 4


@dataclass(frozen=True)
class Family:
    cls: type
    size: tuple[int, int]  # (w, h) of the images of a same-size batch
    other: tuple[int, int]  # a size with another crop count
    sites: tuple[Site, ...]
    vision: str  # FlopCounterMode names: vision blocks, projector, decoder layers
    projector: str
    decoder: str


FAMILIES = {
    # 150×100: 1×2 sub-crops, unpadded to 8×12; 240×240: 2×2 sub-crops
    "llava_next": Family(LlavaNextAdapter, (150, 100), (240, 240),
                         (Site(Stage.VISION_OUT), Site(Stage.PROJECTOR), Site(Stage.LLM, 2)),
                         r"CLIPEncoderLayer", r"LlavaNextMultiModalProjector", "LlamaDecoderLayer"),
    # 200×190: 4×4 sub-crops pooled to 12×12 by anyres_max_9; 150×100: 2×3 sub-crops, not pooled
    "llava_onevision": Family(LlavaOnevisionAdapter, (200, 190), (150, 100),
                              (Site(Stage.PROJECTOR), Site(Stage.LLM, 2)),
                              r"SiglipVisionModel\..*layers\.\d+", r"LlavaOnevisionMultiModalProjector",
                              "Qwen2DecoderLayer"),
}
SIGNALS = {Stage.VISION_OUT: frozenset({"keys", "cls_attention"}), Stage.PROJECTOR: frozenset(),
           Stage.LLM: frozenset({"attention", "keys"})}


def picture(seed: int, size: tuple[int, int]):
    return image(seed, max(size)).resize(size)


def prompts_of(size: tuple[int, int], batch: int) -> list[Prompt]:
    texts = ["what color is the circle ?", "how many ?"]
    return [Prompt(picture(i, size), texts[i % 2]) for i in range(batch)]


@functools.cache
def _adapter(family: str, path: str, attn: str):
    return FAMILIES[family].cls.load(path, attn=attn)


def load(request, family: str, attn: str = "sdpa"):
    return _adapter(family, str(request.getfixturevalue(f"tiny_{family}_dir")), attn)


def stock(a, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock ``generate`` on one batch, crops padded by the image processor where sizes differ."""
    texts = [a.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
        add_generation_prompt=True, tokenize=False) for p in prompts]
    images = a.processor.image_processor(images=[p.image for p in prompts], return_tensors="pt")
    # the stock model itself checks that the placeholder count equals its packed features
    counts = [a._layouts(tuple(size)).n_span for size in images["image_sizes"].tolist()]
    texts = [t.replace("<image>", "<image>" * n, 1) for t, n in zip(texts, counts)]
    enc = a.processor.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = a.model.generate(**enc, pixel_values=images["pixel_values"], image_sizes=images["image_sizes"],
                               max_new_tokens=STEPS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    return out.sequences[:, enc["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


def _close(run, tokens, logits):
    steps = min(tokens.shape[1], run.tokens.shape[1])
    assert torch.equal(run.tokens[:, :steps], tokens[:, :steps])
    torch.testing.assert_close(run.logits[:, :steps], logits[:, :steps], rtol=1e-4, atol=1e-4)


KEEP_ALL = [(f, s) for f, fam in FAMILIES.items() for s in (None, *fam.sites)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,site", KEEP_ALL, ids=lambda v: "none" if v is None else
                         f"{v.stage}{v.layer}" if isinstance(v, Site) else v)
def test_keep_all_matches_stock(request, family, site, attn, batch):
    a = load(request, family, attn)
    prompts = prompts_of(FAMILIES[family].size, batch)
    compressor = None
    if site is not None:
        needs = SIGNALS[site.stage] | ({"text"} if batch == 1 else set())
        compressor = Scripted(site, stride=1, needs=needs)
    run = a.run(prompts, compressor=compressor, budget=ALL, max_new_tokens=STEPS)
    _close(run, *stock(a, prompts))
    trace = run.generations[0].trace
    enc = a._encode(prompts)
    assert trace.n_visual == enc.n_visual < enc.n_span  # newlines are not visual tokens
    assert trace.llm_visual == [enc.n_visual] * LAYERS
    assert trace.llm_total == [int(enc.attention_mask[0].sum())] * LAYERS  # newlines are in the sequence
    if compressor is not None:
        seen = compressor.seen[0].x
        assert seen.visual.shape[1] == enc.n_visual
        assert seen.crops == enc.crops.grids and seen.crop_origin.shape == (batch, enc.n_visual, 3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_different_crop_counts_are_grouped_and_match_stock_batch(request, family, attn):
    """Images with different crop counts in one request: generate() runs them as separate groups,
    and each equals its rows of the stock generate on the whole (crop-padded) batch."""
    a = load(request, family, attn)
    size, other = FAMILIES[family].size, FAMILIES[family].other
    prompts = [Prompt(picture(0, size), "what color is the circle ?"), Prompt(picture(1, other), "how many ?"),
               Prompt(picture(2, size), "how many ?")]
    assert a._group_indices(prompts, None) == [[0, 2], [1]]
    groups = [[prompts[0], prompts[2]], [prompts[1]]]
    crops = [a._encode(g).image_inputs["pixel_values"].shape[1] for g in groups]
    assert crops[0] != crops[1]
    tokens, logits = stock(a, prompts)
    for group, rows in zip(groups, ([0, 2], [1])):
        _close(a.run(group, max_new_tokens=STEPS), tokens[rows], logits[rows])
    texts = [g.text for g in a.generate(prompts, max_new_tokens=STEPS)]  # in the prompts' order
    assert texts == [a.processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def _stock_newlines(a, enc) -> torch.Tensor:
    """Which placeholders of the stock packed image features are newline tokens [n_span]."""
    with torch.no_grad():
        packed = a.model.model.get_image_features(**enc.image_inputs).pooler_output[0]
    return (packed == a.model.model.image_newline).all(dim=-1)


PRUNE = [("llava_next", Site(Stage.VISION_OUT), "original"), ("llava_next", Site(Stage.PROJECTOR), "contiguous"),
         ("llava_next", Site(Stage.LLM, 2), "original"), ("llava_next", Site(Stage.LLM, 1), "contiguous"),
         ("llava_onevision", Site(Stage.PROJECTOR), "original"), ("llava_onevision", Site(Stage.LLM, 2), "contiguous")]


@pytest.mark.parametrize("family,site,policy", PRUNE,
                         ids=lambda v: f"{v.stage}{v.layer}" if isinstance(v, Site) else v)
def test_pruning_keeps_newlines_where_the_model_puts_them(request, family, site, policy):
    """Every other visual token kept and two appended: each decoder layer from the site on sees the
    kept visual tokens and every newline in their original order, then the appended tokens (at the
    span's last position), with original or renumbered position ids."""
    a = load(request, family)
    prompts = prompts_of(FAMILIES[family].size, 2)
    compressor = Scripted(site, stride=2, positions=policy, extra=2)
    run = a.run(prompts, compressor=compressor, budget=ALL, max_new_tokens=3)
    enc = a._encode(prompts)
    is_newline = _stock_newlines(a, enc)
    assert int(is_newline.sum()) == enc.n_span - enc.n_visual > 0
    kept = torch.nonzero(~is_newline)[::2, 0]
    span = torch.cat([torch.cat([kept, torch.nonzero(is_newline)[:, 0]]).sort().values,
                      torch.full((2,), enc.n_span - 1)])
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    s = enc.input_ids.shape[1]
    index = torch.stack([torch.cat([torch.arange(p), p + span, torch.arange(p + enc.n_span, s)])
                         for p in start.tolist()])
    valid = enc.attention_mask.bool()
    full = contiguous_positions(valid)
    expected = contiguous_positions(valid.gather(1, index)) if policy == "contiguous" else full.gather(1, index)
    first = site.layer if site.stage is Stage.LLM else 0
    for layer, positions in enumerate(run.layer_positions):
        assert torch.equal(positions, expected if layer >= first else full), layer
    kept_count = -(-enc.n_visual // 2) + 2
    assert run.generations[0].trace.llm_visual == [enc.n_visual] * first + [kept_count] * (LAYERS - first)
    assert compressor.seen[0].x.visual.shape[1] == enc.n_visual  # the compressor never sees a newline


def test_next_crop_origin_locates_each_visual_token(request):
    """LLaVA-NeXT: (crop, y, x) of every visual token names the stock CLIP patch whose features the
    compressor sees at vision_out. 90×130 tiles 2×1 sub-crops; unpadding drops the top crop's two
    top rows and the bottom crop's two bottom rows."""
    a = load(request, "llava_next")
    prompts = prompts_of((90, 130), 1)
    compressor = Scripted(Site(Stage.VISION_OUT), stride=1)
    a.run(prompts, compressor=compressor, budget=ALL, max_new_tokens=1)
    x = compressor.seen[0].x
    enc = a._encode(prompts)
    with torch.no_grad():
        hidden = a.model.model.vision_tower(enc.image_inputs["pixel_values"][0], output_hidden_states=True)
    features = hidden.hidden_states[-2][:, 1:]  # [3 crops, 8·8 patches, D]
    assert x.crops == ((8, 8), (6, 8), (6, 8))
    crop, y, col = x.crop_origin[0].unbind(-1)
    top_rows_cut = torch.tensor([0, 2, 0])[crop]
    patches = features[crop, (y + top_rows_cut) * 8 + col]
    torch.testing.assert_close(x.visual[0], patches, rtol=1e-5, atol=1e-5)


def test_onevision_crops_after_pooling(request):
    """LLaVA-OneVision pools 4×4 sub-crops (16×16 tokens) to 12×12: crop 1 is that pooled grid, and
    every one of its cells is one visual token."""
    a = load(request, "llava_onevision")
    enc = a._encode(prompts_of((200, 190), 1))
    assert enc.crops.grids == ((4, 4), (12, 12)) and enc.n_visual == 16 + 144 and enc.n_span == 16 + 144 + 12
    table = enc.crops.table
    cells = table[table[:, 0] == 1][:, 1:]
    assert torch.equal(cells, torch.cartesian_prod(torch.arange(12), torch.arange(12)))


BUDGETS = ["33.3%", "22.2%", "11.1%"]


@pytest.mark.parametrize("method", sorted(load_registry().compressors))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_or_is_infeasible(request, family, method):
    registry = load_registry()
    a = load(request, family)
    prompts = prompts_of(FAMILIES[family].size, 2)
    for text in BUDGETS:
        budget = Budget.parse(text)
        try:
            out = a.generate(prompts, compressor=registry.compressor(method)(), budget=budget, max_new_tokens=2)
        except (Infeasible, AdapterError) as exc:
            assert str(exc), f"{method} must say why it cannot run"
            continue
        for g in out:
            target = budget.target(g.trace.n_visual)
            assert abs(g.trace.realised_tokens - target) <= 0.02 * target, (method, text, g.trace.realised_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_apet_compresses_each_crop_on_its_own(request, family):
    """ApET's default on multi-crop images (spec §2.6): each crop keeps its share of the site's keep
    and equals ApET run on that crop alone; ``crops=whole`` compresses the image at once."""
    from tokenbench.methods.apet import ApET, apet_compress, crop_keeps

    a = load(request, family)
    seen = []

    class Recording(ApET):
        def reduce(self, x):
            out = super().reduce(x)
            seen.append((x, out))
            return out

    for crops in ("each", "whole"):
        seen.clear()
        a.generate(prompts_of(FAMILIES[family].size, 1), compressor=Recording(fps_start="first", crops=crops),
                   budget=Budget.parse("22.2%"), max_new_tokens=1)
        assert [x.site.stage for x, _ in seen] == [min(a.stages, key=list(Stage).index), Stage.LLM]
        for x, out in seen:
            if crops == "whole":
                reference = apet_compress(x.visual, x.keep, start="first")
                assert torch.equal(out.keep, reference.keep)
                continue
            crop = x.crop_origin[0, :, 0]
            counts = torch.bincount(crop).tolist()
            keeps = crop_keeps(counts, x.keep)
            assert torch.bincount(crop[out.keep[0]], minlength=len(counts)).tolist() == keeps
            for c, keep in enumerate(keeps):
                members = torch.nonzero(crop == c)[:, 0]
                alone = apet_compress(x.visual[:, members], keep, start="first")
                assert torch.equal(members[alone.keep[0]], out.keep[0][crop[out.keep[0]] == c])
                torch.testing.assert_close(alone.values[0], out.values[0][crop[out.keep[0]] == c])


def test_crop_keeps_split_in_proportion():
    from tokenbench.methods.apet import crop_keeps

    assert crop_keeps([64, 48, 48], 35) == [14, 11, 10]
    assert crop_keeps([64, 48], 200) == [64, 48]
    assert sum(crop_keeps([5, 5, 5], 2)) == 2 and crop_keeps([16, 144], 2) == [1, 1]


ARMS = [(None, None), ("random", "22.2%"), ("fastv", "33.3%"), ("apet", "11.1%")]


@pytest.mark.parametrize("method, budget", ARMS, ids=[m or "none" for m, _ in ARMS])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_flops_match_flop_counter(request, family, method, budget):
    """Crops (vision blocks per crop), the projector (OneVision: every crop patch), newline tokens in
    every decoder layer, as the stock modules count them."""
    a = load(request, family)
    fam = FAMILIES[family]
    compressor = load_registry().compressor(method)() if method else None
    generation, total = counted_flops(
        lambda: a.generate(prompts_of(fam.size, 1), compressor=compressor,
                           budget=Budget.parse(budget) if budget else None, max_new_tokens=3)[0])

    flops = full_flops(a.info().arch, generation.trace)
    steps = generation.trace.generated_tokens - 1
    assert total(fam.vision) == flops["vision"]
    assert total(fam.projector) == flops["projector"]
    assert total(fam.decoder) == flops["llm_prefill"] + flops["decode"] - steps * flops["lm_head"]
    assert total("Linear") == (steps + 1) * flops["lm_head"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_lists_and_runs_a_saved_checkpoint(request, family, tmp_path):
    """``tokenbench models`` lists the adapter; ``tokenbench run --model DIR`` loads a saved tiny
    checkpoint through from_pretrained and the processor and writes results."""
    import json

    from click.testing import CliRunner

    from tokenbench.cli import cli

    runner = CliRunner()
    listing = runner.invoke(cli, ["models"], catch_exceptions=False)
    assert listing.exit_code == 0 and family in listing.stdout
    model = request.getfixturevalue(f"tiny_{family}_dir")
    result = runner.invoke(cli, ["run", "--model", str(model), "--tasks", "shapes", "--methods", "apet",
                                 "--budgets", "22.2%", "--limit", "2", "--no-efficiency", "--json",
                                 "--output", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    assert rows["apet"]["n_samples"] == 2 and rows["apet"]["n_errors"] == 0
