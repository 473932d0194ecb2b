"""LLaVA-OneVision video: keep-all equals the stock HF ``generate`` on the same ``pixel_values_videos``,
the one newline after the video stays last (layout, never shown to a method), pruned tokens keep
their original positions, the frame axis reaches methods, received attention is each frame's own
pooled like the features, and video methods run end to end."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from adapter_tools import ALL, Scripted, counted_flops, image, stock_generate
from PIL import Image

from tokenbench import Budget, Infeasible, Site, Stage
from tokenbench.adapters.base import AdapterError, Prompt
from tokenbench.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenbench.adapters.prefill import contiguous_positions
from tokenbench.adapters.sites import NEWLINE, VisualBlock
from tokenbench.measure import full_flops
from tokenbench.plugins import load_registry

FRAMES = 4
SIDE = 7  # 98 px frames, patch 14
POOLED = 4  # ceil(7 / 2): the model's 2×2 bilinear pooling
PER_FRAME = POOLED * POOLED
N_VISUAL = FRAMES * PER_FRAME
TEXTS = ["what color is the circle ?", "how many ?"]


def video_prompts(batch: int, frames: int = FRAMES, size: int = 98) -> list[Prompt]:
    return [Prompt(None, TEXTS[i % 2], video=[image(100 * i + t, size) for t in range(frames)])
            for i in range(batch)]


@functools.cache
def _adapter(path: str, attn: str) -> LlavaOnevisionAdapter:
    return LlavaOnevisionAdapter.load(path, attn=attn)


def load(request, attn: str = "sdpa") -> LlavaOnevisionAdapter:
    return _adapter(str(request.getfixturevalue("tiny_llava_onevision_video_dir")), attn)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("site", [None, Site(Stage.PROJECTOR), Site(Stage.LLM, 2)],
                         ids=lambda s: "none" if s is None else f"{s.stage}{s.layer}")
def test_keep_all_video_matches_stock(request, site, attn):
    a = load(request, attn)
    batch = video_prompts(2)
    compressor = Scripted(site) if site is not None else None
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=3)
    tokens, logits = stock_generate(a, batch, 3)
    assert torch.equal(run.tokens, tokens)
    torch.testing.assert_close(run.logits, logits, rtol=1e-5, atol=1e-5)
    enc = a._encode(batch)
    assert enc.n_span == N_VISUAL + 1 and int((enc.input_ids[0] == a.model.config.video_token_id).sum()) == 65
    for g in run.generations:
        assert g.trace.n_visual == N_VISUAL and g.trace.llm_visual == [N_VISUAL] * 4
        assert g.trace.vision_frames == FRAMES and g.trace.vision == [SIDE * SIDE] * 2
    if compressor is not None:
        x = compressor.seen[0].x
        assert x.frames == FRAMES and x.grid == (POOLED, POOLED) and x.visual.shape[1] == N_VISUAL
        assert torch.equal(x.origin[0], torch.arange(N_VISUAL))  # the newline is not shown
    info = a.info_for(batch[0])
    assert (info.frames, info.grid, info.n_visual) == (FRAMES, (POOLED, POOLED), N_VISUAL)


def test_features_are_the_stock_pooled_frames(request):
    """The tokens a method sees are ``get_video_features`` without its last token, the newline."""
    a = load(request)
    batch = video_prompts(1)
    compressor = Scripted(Site(Stage.PROJECTOR))
    a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    pixels = a._encode(batch).image_inputs["pixel_values_videos"]
    with torch.no_grad():
        stock = a.model.model.get_video_features(pixels).pooler_output
    torch.testing.assert_close(compressor.seen[0].x.visual, stock[:, :-1])
    torch.testing.assert_close(stock[0, -1], a.model.model.image_newline)


def _expected_positions(enc, kept: torch.Tensor, n_extra: int) -> torch.Tensor:
    """Original positions: the prefix, the kept tokens, the extras and the newline at the span's last
    slot (the newline's own), the suffix."""
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    s, span = enc.input_ids.shape[1], enc.n_span
    rows = [torch.cat([torch.arange(int(p)), int(p) + kept, torch.full((n_extra + 1,), int(p) + span - 1),
                       torch.arange(int(p) + span, s)]) for p in start]
    return contiguous_positions(enc.attention_mask.bool()).gather(1, torch.stack(rows))


@pytest.mark.parametrize("site", [Site(Stage.PROJECTOR), Site(Stage.LLM, 2)], ids=lambda s: f"{s.stage}{s.layer}")
def test_pruning_keeps_the_newline_last_and_original_positions(request, site):
    a = load(request)
    batch = video_prompts(2)
    compressor = Scripted(site, stride=3, extra=2)
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=3)
    enc = a._encode(batch)
    kept = compressor.kept(N_VISUAL)
    start = site.layer if site.stage is Stage.LLM else 0
    for g, length in zip(run.generations, enc.attention_mask.sum(dim=1).tolist()):
        assert g.trace.plan == [(str(site.stage), site.layer, kept)]
        assert g.trace.llm_visual == [N_VISUAL] * start + [kept + 2] * (4 - start)
        assert g.trace.llm_total[-1] == length - N_VISUAL + kept + 2  # the newline stays
    expected = _expected_positions(enc, torch.arange(0, N_VISUAL, 3), 2)
    for layer in range(start, 4):
        assert torch.equal(run.layer_positions[layer], expected)


def test_span_puts_the_newline_after_everything_but_a_prefix(request):
    a = load(request)
    enc = a._encode(video_prompts(1))
    tokens = torch.randn(1, 4, a.model.config.text_config.hidden_size)
    block = VisualBlock(tokens, torch.tensor([[-1, 5, 9, -1]]), torch.ones(1, 4))  # a prefix, two kept, an extra
    applied = a._span(enc, block)
    assert applied.block.origin.tolist() == [[-1, 5, 9, -1, NEWLINE]]
    assert applied.source.tolist() == [[-1, 5, 9, -1, N_VISUAL]]
    torch.testing.assert_close(applied.block.tokens[0, -1], a.model.model.image_newline)
    torch.testing.assert_close(applied.block.tokens[0, :4], tokens[0])


def test_attention_received_is_each_frames_own_pooled(request):
    """``attention_received`` per frame: the stock tower's attention map in the selected block,
    averaged over heads and all the frame's queries, then bilinearly pooled 7×7 → 4×4 as the
    features are; every query row is a probe row."""
    a = load(request, "eager")
    compressor = Scripted(Site(Stage.PROJECTOR), needs=frozenset({"attention_received"}))
    batch = video_prompts(2)
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    got = compressor.seen[0].x.attention_received.view(2, FRAMES, POOLED, POOLED)
    pixels = a._encode(batch).image_inputs["pixel_values_videos"]
    for row in range(2):
        with torch.no_grad():
            out = a.model.model.vision_tower(pixels[row], output_attentions=True)
        received = out.attentions[-1].mean(dim=1).mean(dim=1).view(FRAMES, 1, SIDE, SIDE)
        pooled = torch.nn.functional.interpolate(received, size=(POOLED, POOLED), mode="bilinear")
        torch.testing.assert_close(got[row], pooled[:, 0], rtol=1e-4, atol=1e-7)
    assert run.generations[0].trace.probe_rows == FRAMES * SIDE * SIDE


def test_attention_received_on_an_image_is_each_crops_own(request):
    """A 98 px image is a base crop plus one sub-crop (no pooling, no unpadding): the signal is each
    crop's received attention in raster order."""
    a = load(request, "eager")
    compressor = Scripted(Site(Stage.PROJECTOR), needs=frozenset({"attention_received"}))
    prompt = [Prompt(image(7, 98), "how many ?")]
    a.run(prompt, compressor=compressor, budget=ALL, max_new_tokens=1)
    pixels = a._encode(prompt).image_inputs["pixel_values"][0]
    with torch.no_grad():
        out = a.model.model.vision_tower(pixels, output_attentions=True)
    stock = out.attentions[-1].mean(dim=1).mean(dim=1).reshape(1, -1)
    torch.testing.assert_close(compressor.seen[0].x.attention_received, stock, rtol=1e-4, atol=1e-7)


def test_frames_are_resized_to_the_encoder_without_tiling(request):
    """Without torchvision each frame is the image processor's base crop: the whole frame resized
    (bicubic, aspect ratio not kept, no padding) to 98×98, rescaled and normalised."""
    a = load(request)
    assert getattr(a.processor, "video_processor", None) is None  # the fallback path runs here
    frames = [image(t, 120).resize((150, 90)) for t in range(2)]
    pixels = a._video_pixels(frames)
    processor = a.processor.image_processor
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    for frame, got in zip(frames, pixels):
        resized = np.asarray(frame.resize((98, 98), Image.BICUBIC), dtype=np.float64) / 255
        expected = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1)).float()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_flops_match_flop_counter_per_frame(request):
    a = load(request)
    compressor = Scripted(Site(Stage.PROJECTOR), stride=4)
    generation, total = counted_flops(
        lambda: a.generate(video_prompts(1), compressor=compressor, budget=ALL, max_new_tokens=3)[0])

    flops = full_flops(a.info(frames=FRAMES).arch, generation.trace)
    steps = generation.trace.generated_tokens - 1
    assert total(r"SiglipVisionModel\..*layers\.\d+") == flops["vision"] > 0
    assert total("LlavaOnevisionMultiModalProjector") == flops["projector"]
    assert total("Qwen2DecoderLayer") == flops["llm_prefill"] + flops["decode"] - steps * flops["lm_head"]


@pytest.mark.parametrize("method, budget", [("random", "25%"), ("holitom", "25%"), ("dycoke", "50%"),
                                            ("fastv", "50%"), ("apet", "25%")])
def test_video_methods_run_end_to_end(request, method, budget):
    a = load(request)
    compressor = load_registry().compressor(method)()
    budget = Budget.parse(budget)
    generations = a.generate(video_prompts(2), compressor=compressor, budget=budget, max_new_tokens=2)
    target = budget.target(N_VISUAL)
    for g in generations:
        assert g.trace.n_visual == N_VISUAL
        if method in ("random", "dycoke", "apet"):  # exact counts before the LLM
            stage, _, keep = g.trace.plan[0]
            assert stage == "projector" and keep == round(target)
        assert g.trace.realised_tokens <= target + 0.02 * target, (method, g.trace.realised_tokens)
        assert g.trace.llm_total[-1] - g.trace.llm_visual[-1] == g.trace.prompt_tokens - N_VISUAL  # + newline


def test_refusals_name_the_signal_and_the_modality_mix(request):
    a = load(request)
    needs_cls = Scripted(Site(Stage.PROJECTOR), needs=frozenset({"cls_attention"}))
    with pytest.raises(Infeasible, match="cls_attention"):
        a.run(video_prompts(1), compressor=needs_cls, budget=ALL)
    with pytest.raises(AdapterError, match="one frame count"):
        a.run([*video_prompts(1), Prompt(image(0, 98), "how many ?")])
    mixed = [*video_prompts(1), Prompt(image(0, 98), "how many ?"), *video_prompts(1, 2)]
    assert [g.trace.n_visual for g in a.generate(mixed, max_new_tokens=1)] == [N_VISUAL, 98, 2 * PER_FRAME]


def test_shipped_config_takes_videos(tmp_path):
    """``--model llava-onevision-7b`` (random weights) narrowed to tiny widths: a 384 px frame is 27×27
    SigLIP patches pooled to 14×14, so 8 frames are 8 × 196 = 1568 visual tokens plus the newline."""
    import json
    from pathlib import Path

    import tokenbench
    from tokenbench.random_model import random_weight_adapter

    raw = json.loads((Path(tokenbench.__file__).parent / "configs" / "llava-onevision-7b.json").read_text())
    small = raw | {
        "text_config": raw["text_config"] | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 2},
        "vision_config": raw["vision_config"] | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2}}
    path = tmp_path / "llava-onevision-7b.json"
    path.write_text(json.dumps(small))
    a = random_weight_adapter(path, load_registry(), dtype=torch.float32, attn="sdpa", device=torch.device("cpu"))
    prompt = video_prompts(1, 8, size=64)
    info = a.info_for(prompt[0])
    assert (info.frames, info.grid, info.n_visual) == (8, (14, 14), 1568)
    trace = a.generate(prompt, max_new_tokens=2)[0].trace
    assert trace.n_visual == 1568 and trace.llm_visual == [1568, 1568] and trace.vision == [729, 729]
    assert int((a._encode(prompt).input_ids == a.model.config.video_token_id).sum()) == 1569


def test_tokenbench_run_on_shapes_video(request, tmp_path):
    """``tokenbench run --model DIR --tasks shapes-video`` on a saved tiny OneVision: video methods are
    planned on the clips' 8 frames (8 × 16 tokens) and meet their budgets."""
    import json

    from click.testing import CliRunner

    from tokenbench.cli import cli

    model = request.getfixturevalue("tiny_llava_onevision_video_dir")
    result = CliRunner().invoke(cli, ["run", "--model", str(model), "--tasks", "shapes-video", "--methods",
                                      "random,dycoke", "--budgets", "25%", "--limit", "2", "--no-efficiency",
                                      "--output", str(tmp_path / "out"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    for method in ("random", "dycoke"):
        assert rows[method]["infeasible"] is None and rows[method]["n_errors"] == 0
        assert rows[method]["n_visual"] == 8 * PER_FRAME and rows[method]["realised_ratio"] == 0.25
