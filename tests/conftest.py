"""Shared pytest fixtures."""

import pytest


# --- tiny models (issue 4, adapters): random-weight VLMs built from configs, no downloads --------
@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A LLaVA-1.5-shaped checkpoint (576 visual tokens, 4 decoder layers) saved once per session."""
    from tokenbench.tiny_models import tiny_llava

    return tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    """A Qwen2-VL checkpoint (8×8 = 64 visual tokens at 224px, 4 decoder layers) saved once per session."""
    from tokenbench.tiny_models import tiny_qwen2_vl

    return tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory):
    """A Qwen2.5-VL checkpoint (windowed vision attention, 64 visual tokens at 224px)."""
    from tokenbench.tiny_models import tiny_qwen2_vl

    return tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), variant="qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory):
    """A LLaVA-NeXT checkpoint (112px crops of 8×8 tokens, 1×2/2×1/2×2 pinpoints, 4 decoder layers)."""
    from tokenbench.tiny_models import tiny_llava_next

    return tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tmp_path_factory):
    """A LLaVA-OneVision checkpoint (56px SigLIP crops of 4×4 tokens, pinpoints up to 4×4 crops, so
    large images are pooled by anyres_max_9; 4 Qwen2 decoder layers)."""
    from tokenbench.tiny_models import tiny_llava_onevision

    return tiny_llava_onevision(tmp_path_factory.mktemp("tiny-llava-onevision"))


@pytest.fixture(scope="session")
def tiny_video_llava_dir(tmp_path_factory):
    """A Video-LLaVA checkpoint (224px frames of 16×16 patches plus CLS, 4 decoder layers)."""
    from tokenbench.tiny_models import tiny_video_llava

    return tiny_video_llava(tmp_path_factory.mktemp("tiny-video-llava"))


@pytest.fixture(scope="session")
def tiny_llava_onevision_video_dir(tmp_path_factory):
    """A LLaVA-OneVision checkpoint at 98 px: a video frame is 7×7 SigLIP patches, pooled by the model
    to 4×4 tokens (an odd grid, like the real 27×27 → 14×14)."""
    from tokenbench.tiny_models import tiny_llava_onevision

    return tiny_llava_onevision(tmp_path_factory.mktemp("tiny-llava-onevision-video"), image_size=98)
