"""Video-LLaVA: keep-all equals the stock HF ``generate`` for videos and images, pruning follows the
plan with each frame's CLS token kept before its frame, the frame axis reaches the compressor, and
the analytic FLOPs match FlopCounterMode frame by frame."""

from __future__ import annotations

import functools

import pytest
import torch
from adapter_tools import ALL, Scripted, counted_flops, image, stock_generate
from tokenbench.methods.prumerge import PruMergePlus, PruMergePlusAdaptive

from tokenbench import Budget, Site, Stage
from tokenbench.adapters.base import AdapterError, Prompt
from tokenbench.adapters.llava import LlavaAdapter
from tokenbench.adapters.prefill import contiguous_positions
from tokenbench.adapters.video_llava import VideoLlavaAdapter
from tokenbench.measure import full_flops
from tokenbench.plugins import load_registry

STEPS = 4
FRAMES = 4
SIDE = 16  # 224 px frames, patch 14
SIGNALS = {Stage.VISION_OUT: frozenset({"keys", "cls_attention"}), Stage.PROJECTOR: frozenset(),
           Stage.LLM: frozenset({"attention", "keys", "key_l1", "final_norm", "input_states"})}
SITES = [None, Site(Stage.VISION_OUT), Site(Stage.PROJECTOR), Site(Stage.LLM, 2)]
TEXTS = ["what color is the circle ?", "how many ?"]


def video_prompts(batch: int, frames: int = FRAMES) -> list[Prompt]:
    return [Prompt(None, TEXTS[i % 2], video=[image(100 * i + t, 224) for t in range(frames)])
            for i in range(batch)]


def image_prompts(batch: int) -> list[Prompt]:
    return [Prompt(image(i, 224), TEXTS[i % 2]) for i in range(batch)]


@functools.cache
def _adapter(path: str, attn: str) -> VideoLlavaAdapter:
    return VideoLlavaAdapter.load(path, attn=attn)


def load(request, attn: str = "sdpa") -> VideoLlavaAdapter:
    return _adapter(str(request.getfixturevalue("tiny_video_llava_dir")), attn)


@functools.cache
def _reference(path: str, attn: str, kind: str, batch: int, frames: int):
    batch_prompts = video_prompts(batch, frames) if kind == "video" else image_prompts(batch)
    return stock_generate(_adapter(path, attn), batch_prompts, STEPS)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind,site", [("video", s) for s in SITES] + [("image", None), ("image", SITES[1])],
                         ids=lambda v: f"{v.stage}{v.layer}" if isinstance(v, Site) else str(v))
def test_keep_all_matches_stock(request, kind, site, attn, batch):
    a = load(request, attn)
    compressor = None
    if site is not None:
        needs = SIGNALS[site.stage] | ({"text"} if batch == 1 else set())
        compressor = Scripted(site, stride=1, needs=needs)
    batch_prompts = video_prompts(batch) if kind == "video" else image_prompts(batch)
    run = a.run(batch_prompts, compressor=compressor, budget=ALL, max_new_tokens=STEPS)
    tokens, logits = _reference(str(request.getfixturevalue("tiny_video_llava_dir")), attn, kind, batch, FRAMES)
    steps = min(tokens.shape[1], run.tokens.shape[1])
    assert torch.equal(run.tokens[:, :steps], tokens[:, :steps])
    torch.testing.assert_close(run.logits[:, :steps], logits[:, :steps], rtol=1e-4, atol=1e-4)
    frames = FRAMES if kind == "video" else 1
    n_visual = frames * SIDE * SIDE
    for g in run.generations:
        assert g.trace.n_visual == n_visual and g.trace.llm_visual == [n_visual] * 4
        assert g.trace.vision_frames == frames
    if compressor is not None:
        x = compressor.seen[0].x
        assert x.frames == frames and x.grid == (SIDE, SIDE) and x.visual.shape[1] == n_visual
        assert torch.equal(x.origin[0], torch.arange(n_visual))


def test_eight_frames_batch_two_matches_stock(request):
    """The reference's frame count: 8 × 257 = 2056 video tokens in the stock model's sequence."""
    a = load(request)
    run = a.run(video_prompts(2, 8), max_new_tokens=STEPS)
    tokens, logits = _reference(str(request.getfixturevalue("tiny_video_llava_dir")), "sdpa", "video", 2, 8)
    assert torch.equal(run.tokens, tokens)
    torch.testing.assert_close(run.logits, logits, rtol=1e-4, atol=1e-4)
    assert int((a._encode(video_prompts(1, 8)).input_ids == a.model.config.video_token_id).sum()) == 2056
    assert a.info(2048, frames=8).n_visual == 2048 and a.info(frames=8).frames == 8


def _expected_positions(enc, origin: torch.Tensor, n_extra: int) -> torch.Tensor:
    """Original positions of: the prefix, per frame its CLS then its kept patches, the extras at the
    span's last slot, the suffix."""
    per_frame = SIDE * SIDE
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    s, span = enc.input_ids.shape[1], enc.n_span
    rows = []
    for b in range(enc.input_ids.shape[0]):
        p0 = int(start[b])
        parts = [torch.arange(p0)]
        for t in range(enc.frames):
            mine = origin[b][origin[b] // per_frame == t]
            parts += [torch.tensor([p0 + t * (per_frame + 1)]), p0 + t * (per_frame + 1) + 1 + mine % per_frame]
        parts += [torch.full((n_extra,), p0 + span - 1), torch.arange(p0 + span, s)]
        rows.append(torch.cat(parts))
    index = torch.stack(rows)
    return contiguous_positions(enc.attention_mask.bool()).gather(1, index)


@pytest.mark.parametrize("site", SITES[1:], ids=lambda s: f"{s.stage}{s.layer}")
def test_pruning_follows_the_plan_and_keeps_each_frames_cls(request, site):
    a = load(request)
    batch = video_prompts(2)
    compressor = Scripted(site, stride=2, extra=2)
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=3)
    enc = a._encode(batch)
    n = enc.n_visual
    kept = compressor.kept(n)
    start = site.layer if site.stage is Stage.LLM else 0
    for g, length in zip(run.generations, enc.attention_mask.sum(dim=1).tolist()):
        assert g.trace.plan == [(str(site.stage), site.layer, kept)]
        assert g.trace.llm_visual == [n] * start + [kept + 2] * (4 - start)
        assert g.trace.llm_total[-1] == length - n + kept + 2  # every frame's CLS token stays
    expected = _expected_positions(enc, torch.arange(0, n, 2).expand(2, -1), 2)
    for layer in range(start, 4):
        assert torch.equal(run.layer_positions[layer], expected)
    assert compressor.seen[0].x.frames == FRAMES


def test_cls_attention_is_each_frames_own(request):
    """``cls_attention`` per frame equals the stock tower's attention map (CLS row, own patches)."""
    a = load(request, "eager")
    compressor = Scripted(Site(Stage.VISION_OUT), needs=frozenset({"cls_attention"}))
    batch = video_prompts(1)
    a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    got = compressor.seen[0].x.cls_attention.view(FRAMES, SIDE * SIDE)
    pixels = a._encode(batch).image_inputs["pixel_values_videos"][0]
    with torch.no_grad():
        out = a.model.model.video_tower(pixels, output_attentions=True)
    stock = out.attentions[a.vision_blocks - 1].mean(dim=1)[:, 0, 1:]
    torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(dim=1), 1 - out.attentions[a.vision_blocks - 1].mean(dim=1)[:, 0, 0])


def test_attention_received_is_each_frames_own(request):
    """``attention_received`` per frame equals the stock tower's map averaged over heads and all of
    the frame's queries (patch columns), as HoliTom reads it; every query row is a probe row."""
    a = load(request, "eager")
    compressor = Scripted(Site(Stage.VISION_OUT), needs=frozenset({"attention_received"}))
    batch = video_prompts(2)
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    got = compressor.seen[0].x.attention_received.view(2, FRAMES, SIDE * SIDE)
    pixels = a._encode(batch).image_inputs["pixel_values_videos"]
    for row in range(2):
        with torch.no_grad():
            out = a.model.model.video_tower(pixels[row], output_attentions=True)
        stock = out.attentions[a.vision_blocks - 1].mean(dim=1).mean(dim=1)[:, 1:]
        torch.testing.assert_close(got[row], stock, rtol=1e-4, atol=1e-7)
    assert run.generations[0].trace.probe_rows == FRAMES * (SIDE * SIDE + 1)


def _hand_next_block_signals(a: VideoLlavaAdapter, tower: torch.nn.Module, pixels: torch.Tensor, heads: str):
    """Per frame, from the stock tower's selected hidden states [B·F, 1 + P, D] and the next block's
    ``layer_norm1`` / ``q_proj`` / ``k_proj``: the CLS row over the frame's own patches [B·F, P]
    and the patch keys [B·F, P, Dk], heads averaged or concatenated; and the stock next block's
    eager attention map (head mean, CLS row) [B·F, P]."""
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        block = tower.encoder.layers[a.vision_blocks]
        attn = block.self_attn
        normed = block.layer_norm1(out.hidden_states[a.vision_blocks])
        n, t, width = normed.shape
        q, k = attn.q_proj(normed[:, 0]), attn.k_proj(normed)
        if heads == "mean":
            qh, kh = q.view(n, attn.num_heads, attn.head_dim), k.view(n, t, attn.num_heads, attn.head_dim)
            scores = torch.einsum("nhd,nthd->nht", qh, kh) * attn.head_dim ** -0.5
            cls_row, keys = scores.softmax(dim=-1).mean(dim=1)[:, 1:], kh[:, 1:].mean(dim=2)
        else:
            cls_row = (torch.einsum("nd,ntd->nt", q, k) * width ** -0.5).softmax(dim=-1)[:, 1:]
            keys = k[:, 1:]
    return cls_row, keys, out.attentions[a.vision_blocks].mean(dim=1)[:, 0, 1:]


@pytest.mark.parametrize("heads", ["mean", "concat"])
@pytest.mark.parametrize("kind", ["video", "image"])
def test_next_block_signals_are_each_frames_own(request, kind, heads):
    """``cls_attention_next`` / ``keys_next`` (PruMerge+'s E2 signals) per frame equal a hand computation
    on the stock tower: the block after the selected one run on each frame's selected features,
    frame-major [B, F·P] and [B, F·P, Dk]; one probe row per frame."""
    a = load(request, "eager")
    compressor = Scripted(Site(Stage.VISION_OUT), needs=frozenset({"cls_attention_next", "keys_next"}))
    compressor.next_block_heads = heads
    batch = video_prompts(2) if kind == "video" else image_prompts(2)
    frames = FRAMES if kind == "video" else 1
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    x = compressor.seen[0].x
    pixels = a._encode(batch).image_inputs["pixel_values_videos" if kind == "video" else "pixel_values"]
    tower = a.model.model.video_tower if kind == "video" else a.model.model.image_tower
    cls_row, keys, stock = _hand_next_block_signals(a, tower, pixels.flatten(0, 1) if kind == "video" else pixels,
                                                    heads)
    per = SIDE * SIDE
    assert x.cls_attention_next.shape == (2, frames * per) and x.keys_next.shape[:2] == (2, frames * per)
    torch.testing.assert_close(x.cls_attention_next, cls_row.reshape(2, frames * per), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.keys_next, keys.reshape(2, frames * per, -1), rtol=1e-5, atol=1e-6)
    if heads == "mean":  # the stock next block's own attention map agrees
        torch.testing.assert_close(x.cls_attention_next, stock.reshape(2, frames * per), rtol=1e-4, atol=1e-7)
    rows = x.cls_attention_next.view(2, frames, per).sum(dim=2)
    assert bool(((rows > 0) & (rows < 1)).all())  # each frame's softmax also covers its own CLS
    assert run.generations[0].trace.probe_rows == frames


def test_prumerge_plus_runs_on_a_video_at_its_budget(request):
    """PruMerge+ (an image method) on F·h·w frame-major tokens: 25% of 4 × 256 = 256 tokens enter the
    LLM (255 kept, merged, plus the extra token)."""
    a = load(request)
    batch = video_prompts(2)
    run = a.run(batch, compressor=PruMergePlus(), budget=Budget(ratio=0.25), max_new_tokens=2)
    for g in run.generations:
        assert g.trace.n_visual == FRAMES * 256 and g.trace.realised_tokens == 256
        assert g.trace.llm_visual[0] == 256 and g.trace.probe_rows == FRAMES
    adaptive = a.generate(batch[:1], compressor=PruMergePlusAdaptive(), budget=Budget(ratio=0.25),
                          max_new_tokens=2)[0]
    assert 1 < adaptive.trace.realised_tokens <= FRAMES * 256 + 1


def test_next_block_signals_are_refused_where_no_block_follows(request, monkeypatch):
    a = load(request)
    vision_out = [(Site(Stage.VISION_OUT), 64)]
    assert a.unserved_signal_reason(PruMergePlus(), vision_out) is None
    reason = a.unserved_signal_reason(PruMergePlus(), [(Site(Stage.PROJECTOR), 64)])
    assert "cls_attention_next" in reason and "video_llava" in reason
    monkeypatch.setattr(a, "vision_blocks", len(a.model.model.video_tower.encoder.layers))
    assert "no block follows" in a.unserved_signal_reason(PruMergePlus(), vision_out)


def test_flops_match_flop_counter_per_frame(request):
    a = load(request)
    compressor = Scripted(Site(Stage.VISION_OUT), stride=4)
    generation, total = counted_flops(
        lambda: a.generate(video_prompts(1), compressor=compressor, budget=ALL, max_new_tokens=3)[0])

    flops = full_flops(a.info(frames=FRAMES).arch, generation.trace)
    steps = generation.trace.generated_tokens - 1
    assert generation.trace.vision_frames == FRAMES
    assert total("CLIPEncoderLayer") == flops["vision"] > 0
    assert total("VideoLlavaMultiModalProjector") == flops["projector"]
    assert total("LlamaDecoderLayer") == flops["llm_prefill"] + flops["decode"] - steps * flops["lm_head"]


def test_registry_batches_and_refusals(request):
    registry = load_registry()
    assert registry.adapter_for("video_llava").name == "video_llava"
    a = load(request)
    mixed = [*video_prompts(1), *image_prompts(1), *video_prompts(2, 2)]
    generations = a.generate(mixed, max_new_tokens=2)
    assert [g.trace.n_visual for g in generations] == [FRAMES * 256, 256, 2 * 256, 2 * 256]
    with pytest.raises(AdapterError, match="mixes videos and images"):
        a.run(mixed[:2])
    llava = LlavaAdapter.__new__(LlavaAdapter)
    llava.name = "llava"
    with pytest.raises(AdapterError, match="images only"):
        llava.run(video_prompts(1))


def test_shipped_config_builds_a_random_weight_video_model(tmp_path):
    """``--model-config video-llava-7b`` narrowed to tiny widths: 8 frames × (256 + CLS) in the prompt,
    2048 visual tokens, 24 CLIP blocks up to the selected layer −2 → 23 run per frame."""
    import json
    from pathlib import Path

    import tokenbench
    from tokenbench.random_model import config_model_ref, random_weight_adapter

    raw = json.loads((Path(tokenbench.__file__).parent / "configs" / "video-llava-7b.json").read_text())
    assert raw["vision_config"]["image_size"] // raw["vision_config"]["patch_size"] == SIDE
    small = raw | {
        "text_config": raw["text_config"] | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 4},
        "vision_config": raw["vision_config"] | {"hidden_size": 32, "intermediate_size": 64,
                                                 "num_attention_heads": 2}}
    path = tmp_path / "video-llava-7b.json"
    path.write_text(json.dumps(small))
    registry = load_registry()
    assert config_model_ref("video-llava-7b", registry).location.endswith("configs/video-llava-7b.json")
    a = random_weight_adapter(path, registry, dtype=torch.float32, attn="sdpa", device=torch.device("cpu"))
    trace = a.generate(video_prompts(1, 8), max_new_tokens=2)[0].trace
    assert trace.n_visual == 2048 and trace.llm_visual == [2048, 2048]
    assert trace.vision == [257] * 23 and trace.vision_frames == 8
    assert int((a._encode(video_prompts(1, 8)).input_ids == a.model.config.video_token_id).sum()) == 2056


def test_protocols_differ_in_the_system_prompt(request):
    a = VideoLlavaAdapter(load(request).model, load(request).processor)
    a.protocol = "llava"  # what `tokenbench run` uses for this family unless --protocol hf
    assert VideoLlavaAdapter.default_protocol == "llava"
    assert a._conversation("<video>", "why ?").startswith("A chat between a curious user")
    a.protocol = "hf"
    assert a._conversation("<video>", "why ?") == "USER: <video>\nwhy ? ASSISTANT:"


def test_video_llava_from_llava_keeps_the_image_model(tiny_llava_dir, tmp_path):
    """The converted checkpoint computes the source LLaVA's logits on an image prompt (the new
    ``<video>`` row aside), and its video path runs through the adapter."""
    from transformers import LlavaForConditionalGeneration

    from tokenbench.tiny_models import video_llava_from_llava

    target = video_llava_from_llava(tiny_llava_dir, tmp_path / "video")
    a = VideoLlavaAdapter.load(target)
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    assert a.model.config.video_token_id == llava.config.text_config.vocab_size
    prompt = Prompt(image(3, 336), "what color is the circle ?")
    enc = a._encode([prompt])
    with torch.no_grad():
        ours = a.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.image_inputs).logits
        theirs = llava(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       pixel_values=enc.image_inputs["pixel_values"]).logits
    torch.testing.assert_close(ours[..., :-1], theirs, rtol=1e-5, atol=1e-5)
    trace = a.generate(video_prompts(1, 2), max_new_tokens=2)[0].trace
    assert trace.n_visual == 2 * 24 * 24 and trace.vision_frames == 2
