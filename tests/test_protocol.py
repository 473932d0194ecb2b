"""LLaVA-1.5's evaluation protocol (pad to square, vicuna_v1) next to the HF one, and its defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tokenbench.adapters.base import Prompt
from tokenbench.adapters.llava import VICUNA_V1_SYSTEM, LlavaAdapter, pad_to_square, vicuna_v1_prompt
from tokenbench.cli import cli
from tokenbench.config import ConfigError, RunConfig
from tokenbench.models import ModelRef
from tokenbench.plugins import load_registry
from tokenbench.runner import resolve_protocol


def wide_image() -> Image.Image:
    """Red on the left third, green in the middle, blue on the right: a centre crop keeps only green."""
    image = Image.new("RGB", (36, 12), (0, 200, 0))
    image.paste((200, 0, 0), (0, 0, 12, 12))
    image.paste((0, 0, 200), (24, 0, 36, 12))
    return image


def test_pad_to_square_centres_the_image_on_the_fill_colour():
    square = pad_to_square(wide_image(), (122, 116, 104))
    assert square.size == (36, 36)
    assert square.getpixel((18, 0)) == (122, 116, 104) and square.getpixel((18, 35)) == (122, 116, 104)
    assert square.getpixel((0, 12)) == (200, 0, 0) and square.getpixel((35, 23)) == (0, 0, 200)
    tall = pad_to_square(Image.new("RGB", (5, 8), (9, 9, 9)), (1, 2, 3))
    assert tall.size == (8, 8) and tall.getpixel((0, 0)) == (1, 2, 3) and tall.getpixel((1, 0)) == (9, 9, 9)
    same = Image.new("RGB", (4, 4))
    assert pad_to_square(same, (0, 0, 0)) is same


def test_vicuna_v1_conversation():
    assert vicuna_v1_prompt("What is it?\nAnswer briefly.") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is it?\n"
        "Answer briefly. ASSISTANT:")


@pytest.fixture(scope="module")
def adapter(tiny_llava_dir):
    return LlavaAdapter.load(tiny_llava_dir)


def test_llava_protocol_pads_with_the_mean_colour_and_uses_vicuna_v1(adapter):
    prompt = Prompt(wide_image(), "What colour is on the left?")
    processor = adapter.processor
    adapter.protocol = "hf"
    hf = adapter._encode([prompt])
    adapter.protocol = "llava"
    try:
        llava = adapter._encode([prompt])
    finally:
        adapter.protocol = "hf"
    fill = tuple(int(255 * m) for m in processor.image_processor.image_mean)
    square = pad_to_square(wide_image(), fill)
    text = vicuna_v1_prompt(prompt.text, processor.image_token)
    assert text.startswith(VICUNA_V1_SYSTEM)
    assert torch.equal(llava.input_ids, processor(images=[square], text=[text], return_tensors="pt")["input_ids"])
    assert llava.input_ids.shape[1] > hf.input_ids.shape[1]     # the system prompt comes first
    assert int((llava.input_ids == llava.image_token_id).sum()) == llava.n_visual
    pixels = llava.image_inputs["pixel_values"][0]
    expected = processor.image_processor(images=[square], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(pixels, expected)
    # The padded band is the mean colour: ~0 after normalisation. Padding keeps the red left and blue
    # right thirds; the HF centre crop drops them.
    assert pixels[:, 0].abs().max() < 0.02
    middle = pixels.shape[1] // 2
    red, blue = (200 / 255 - 0.48145466) / 0.26862954, (200 / 255 - 0.40821073) / 0.27577711
    assert pixels[0, middle, 2] == pytest.approx(red, abs=0.05)
    assert pixels[2, middle, -3] == pytest.approx(blue, abs=0.05)
    cropped = hf.image_inputs["pixel_values"][0]
    assert cropped[0, middle, 2] < red - 1 and cropped[2, middle, -3] < blue - 1


def model_ref(path: str, embedded: bool) -> ModelRef:
    return ModelRef("m", path, "llava", embedded=embedded)


def test_protocol_defaults_llava_for_llava_checkpoints_and_hf_for_embedded_models(tmp_path):
    registry = load_registry()
    llava, qwen = registry.adapter_for("llava"), registry.adapter_for("qwen2_vl")
    config = RunConfig(model=model_ref("x", embedded=False), methods=[], budgets=[], tasks=["shapes"])
    assert resolve_protocol(config, llava) == "llava"
    assert resolve_protocol(config, qwen) == "hf"
    embedded = RunConfig(model=model_ref("x", embedded=True), methods=[], budgets=[], tasks=["shapes"])
    assert resolve_protocol(embedded, llava) == "hf"
    config.protocol = "hf"
    assert resolve_protocol(config, llava) == "hf"
    config.protocol = "llava"
    with pytest.raises(ConfigError, match="--protocol llava: the qwen2_vl adapter offers hf"):
        resolve_protocol(config, qwen)


def test_protocol_the_family_lacks_is_a_usage_error(tiny_qwen2_vl_dir: Path, tmp_path: Path):
    result = CliRunner().invoke(cli, ["run", "--model", str(tiny_qwen2_vl_dir), "--protocol", "llava",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--protocol llava: the qwen2_vl adapter offers hf" in result.output
