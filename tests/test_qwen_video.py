"""Qwen2-VL / Qwen2.5-VL video input: keep-all equals the stock ``generate`` on the same
``pixel_values_videos`` / ``video_grid_thw``, pruned tokens keep their 3-D (t, h, w) M-RoPE ids, the
frame axis reaches the compressor, and the frames are paired into temporal patches in the video
processor's layout."""

from __future__ import annotations

import pytest
import torch
from adapter_tools import ALL, Scripted, adapter, image, model_dir

from tokenbench import Site, Stage
from tokenbench.adapters.base import Prompt

FRAMES = 4  # 2 temporal steps of 2 frames
TEXTS = ["what color is the circle ?", "how many ?"]


def video_prompts(batch: int, frames: int = FRAMES) -> list[Prompt]:
    return [Prompt(None, TEXTS[i % 2], video=[image(50 * i + t, 224) for t in range(frames)]) for i in range(batch)]


def stock(a, batch_prompts, steps: int):
    enc = a._encode(batch_prompts)
    with torch.no_grad():
        out = a.model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.image_inputs,
                               mm_token_type_ids=2 * (enc.input_ids == enc.image_token_id).int(),
                               max_new_tokens=steps, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    return out.sequences[:, enc.input_ids.shape[1]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("site", [None, Site(Stage.PROJECTOR), Site(Stage.LLM, 2)],
                         ids=lambda s: "none" if s is None else f"{s.stage}{s.layer}")
def test_keep_all_video_matches_stock(request, family, site):
    a = adapter(family, model_dir(request, family), "sdpa")
    batch = video_prompts(2)
    compressor = Scripted(site, stride=1) if site is not None else None
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=3)
    tokens, logits = stock(a, batch, 3)
    assert torch.equal(run.tokens, tokens)
    torch.testing.assert_close(run.logits, logits, rtol=1e-4, atol=1e-4)
    n_visual = 2 * 8 * 8  # t = 2 steps of an 8×8 merged grid at 224 px
    for g in run.generations:
        assert g.trace.n_visual == n_visual and g.trace.llm_visual == [n_visual] * 4
        assert g.trace.vision_frames == 2 and set(g.trace.vision) == {16 * 16}
    if compressor is not None:
        x = compressor.seen[0].x
        assert x.frames == 2 and x.grid == (8, 8) and x.visual.shape[1] == n_visual


def test_pruned_video_tokens_keep_their_temporal_ids(request):
    a = adapter("qwen2_vl", model_dir(request, "qwen2_vl"), "sdpa")
    batch = video_prompts(2)
    compressor = Scripted(Site(Stage.PROJECTOR), stride=3)
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=2)
    enc = a._encode(batch)
    full = enc.positions  # [3, B, S] from the stock get_rope_index
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    kept = torch.arange(0, enc.n_visual, 3)
    s = enc.input_ids.shape[1]
    index = torch.stack([torch.cat([torch.arange(int(p)), int(p) + kept, torch.arange(int(p) + enc.n_visual, s)])
                         for p in start])
    expected = full.gather(2, index.expand(3, -1, -1))
    for layer in range(4):
        assert torch.equal(run.layer_positions[layer], expected)
    temporal = expected[0, 0, int(start[0]):int(start[0]) + kept.numel()]
    assert temporal.unique().numel() == 2  # both temporal steps survive, with distinct t ids
    assert run.generations[0].trace.plan == [("projector", 0, kept.numel())]


def test_frames_pair_into_temporal_patches(request):
    """Temporal patch k carries frame 2k in its first and frame 2k+1 in its second T slot, in the
    (C, T, ph, pw) order of each patch vector; an odd frame count repeats the last frame."""
    a = adapter("qwen2_vl", model_dir(request, "qwen2_vl"), "sdpa")
    frames = [image(t, 224) for t in range(3)]
    pixels, grid = a._video_pixels(frames)
    assert grid.tolist() == [[2, 16, 16]] and pixels.shape == (2 * 256, 3 * 2 * 14 * 14)
    per_frame = [a.processor.image_processor(images=[f], return_tensors="pt")["pixel_values"].view(256, 3, 2, 14, 14)
                 for f in frames]
    video = pixels.view(2, 256, 3, 2, 14, 14)
    for k, (first, second) in enumerate([(0, 1), (2, 2)]):
        assert torch.equal(video[k, :, :, 0], per_frame[first][:, :, 0])
        assert torch.equal(video[k, :, :, 1], per_frame[second][:, :, 1])


def test_vision_flops_count_each_temporal_step_on_its_own(request):
    """Attention in the ViT stays inside each temporal step: the analytic count (per step, times the
    steps) equals FlopCounterMode on the stock blocks, and 2 steps cost exactly twice 1 step."""
    import re

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from tokenbench.measure import full_flops

    a = adapter("qwen2_vl", model_dir(request, "qwen2_vl"), "sdpa")
    analytic = []
    for frames in (2, 4):
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            trace = a.generate(video_prompts(1, frames), max_new_tokens=1)[0].trace
        counted = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                      if re.fullmatch(r".*\.blocks\.\d+", name))
        analytic.append(full_flops(a.info(frames=frames // 2).arch, trace)["vision"])
        assert counted == analytic[-1] > 0
    assert analytic[1] == 2 * analytic[0]


def test_frames_are_resized_by_the_checkpoints_video_limits(request, tmp_path):
    """Where the checkpoint ships a ``video_preprocessor_config.json`` its video processor resizes
    frames by its own pixel limits, not the image processor's: the torchvision-free path does too
    (320×240 frames: 20×28 patches by Qwen2-VL's video defaults, as the stock ``Qwen2VLVideoProcessor``
    gives them)."""
    import json
    import shutil

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    frames = [image(t, 320).resize((320, 240)) for t in range(2)]
    plain = adapter("qwen2_vl", model_dir(request, "qwen2_vl"), "sdpa")
    if getattr(plain.processor, "video_processor", None) is not None:
        pytest.skip("torchvision is installed: the stock video processor runs instead of the fallback")
    size = plain.processor.image_processor.size  # no video config: the image processor's limits
    height, width = smart_resize(240, 320, factor=28, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    assert plain._video_pixels(frames)[1].tolist() == [[1, height // 14, width // 14]] != [[1, 20, 28]]
    checkpoint = tmp_path / "qwen2_vl"
    shutil.copytree(model_dir(request, "qwen2_vl"), checkpoint)
    low, high = 128 * 28 * 28, 768 * 28 * 28
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": low, "longest_edge": high}}))
    height, width = smart_resize(240, 320, factor=28, min_pixels=low, max_pixels=high)
    assert (height // 14, width // 14) == (20, 28)
    assert adapter("qwen2_vl", str(checkpoint), "sdpa")._video_pixels(frames)[1].tolist() == [[1, 20, 28]]
