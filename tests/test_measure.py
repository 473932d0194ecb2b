"""Analytic FLOPs against FlopCounterMode, fvcore and hand-computed LLaVA-1.5-7B numbers; KV bytes,
memory, latency summaries and the FlashAttention probe."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenbench
from tokenbench.adapters.base import Generation, Prompt, TokenTrace
from tokenbench.budget import Budget
from tokenbench.compressor import Architecture
from tokenbench.measure import (
    PeakMemory,
    fastv_macs,
    flash_sdpa_probe,
    full_flops,
    kv_cache_bytes,
    llm_prefill_macs,
    summarise_latency,
)
from tokenbench.plugins import load_registry

CONFIGS = Path(tokenbench.__file__).parent / "configs"
NEW_TOKENS = 3


def llava_7b_arch() -> Architecture:
    """LLaVA-1.5-7B from its config file: Vicuna-7B decoder, CLIP ViT-L/14-336 up to layer -2."""
    raw = json.loads((CONFIGS / "llava-1.5-7b.json").read_text())
    text, vision = raw["text_config"], raw["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    return Architecture(
        llm_layers=text["num_hidden_layers"], llm_hidden=text["hidden_size"],
        llm_intermediate=text["intermediate_size"], llm_heads=text["num_attention_heads"],
        llm_kv_heads=text["num_key_value_heads"], vocab_size=text["vocab_size"],
        vision_layers=vision["num_hidden_layers"] - 1, vision_hidden=vision["hidden_size"],
        vision_intermediate=vision["intermediate_size"], vision_tokens=side * side + 1,
        projector_in=vision["hidden_size"], projector_hidden=text["hidden_size"],
        patch_in=3 * vision["patch_size"] ** 2)


def uniform_trace(arch: Architecture, llm_total: list[int], generated: int = 0) -> TokenTrace:
    return TokenTrace(n_visual=576, vision=[577] * arch.vision_layers, llm_visual=[n - 95 for n in llm_total],
                      llm_total=llm_total, generated_tokens=generated)


# ------------------------------------------------------------------------- hand-computed LLaVA-1.5-7B

def test_llava_7b_vanilla_prefill_is_3_50_tmacs_with_the_fastv_formula():
    arch = llava_7b_arch()
    macs = fastv_macs(arch, uniform_trace(arch, [671] * 32))["prefill"]
    assert macs == 32 * (4 * 671 * 4096**2 + 2 * 671**2 * 4096 + 2 * 671 * 4096 * 11008)
    assert macs / 1e12 == pytest.approx(3.50, abs=0.005)


@pytest.mark.parametrize("kept, fastv_fraction, pre_llm_fraction",
                         [(192, 0.456, 0.419), (128, 0.367, 0.325), (64, 0.279, 0.231)])
def test_llava_7b_reduction_fractions_match_spec(kept, fastv_fraction, pre_llm_fraction):
    arch = llava_7b_arch()
    full = fastv_macs(arch, uniform_trace(arch, [671] * 32))["prefill"]
    short = 35 + kept + 60
    fastv = fastv_macs(arch, uniform_trace(arch, [671] * 2 + [short] * 30))["prefill"]
    pre_llm = fastv_macs(arch, uniform_trace(arch, [short] * 32))["prefill"]
    assert round(fastv / full, 3) == fastv_fraction
    assert round(pre_llm / full, 3) == pre_llm_fraction


def test_llava_7b_full_flops_by_hand():
    arch = llava_7b_arch()
    flops = full_flops(arch, uniform_trace(arch, [671] * 32, generated=1))
    d, m, n = 4096, 11008, 671
    llm = 32 * (n * (2 * d * d + 2 * d * d) + 2 * n * n * d + 3 * n * d * m)  # MHA: kv width = d
    vision = 23 * (4 * 577 * 1024**2 + 2 * 577**2 * 1024 + 2 * 577 * 1024 * 4096)
    projector = 576 * (1024 * 4096 + 4096 * 4096)
    patch_embed = 576 * (3 * 14 * 14) * 1024  # the 14×14 RGB patches of 336×336 into CLIP-L's width
    assert flops["llm_prefill"] == 2 * llm
    assert flops["vision"] == 2 * vision
    assert flops["projector"] == 2 * projector
    assert flops["patch_embed"] == 2 * patch_embed and flops["patch_embed"] / 1e9 == pytest.approx(0.69, abs=0.005)
    assert flops["probe"] == 0
    assert flops["prefill"] == 2 * (llm + vision + projector + patch_embed + d * 32064)
    assert flops["decode"] == 0  # one generated token comes from the prefill logits
    assert flops["prefill"] / 1e12 == pytest.approx(9.32, abs=0.01)  # 4.66 TMACs, 93% in the LLM


def test_llava_7b_probe_rows_pay_their_q_projection_and_scores():
    arch = llava_7b_arch()
    trace = uniform_trace(arch, [671] * 2 + [290] * 30)
    trace.probe_rows = 1  # FastV's last-token row at layer K - 1
    assert full_flops(arch, trace)["probe"] == 2 * (4096 * 4096 + 671 * 4096)


def test_kv_cache_bytes_llava_7b_half_megabyte_per_token():
    arch = llava_7b_arch()
    trace = uniform_trace(arch, [671] * 32, generated=5)
    assert kv_cache_bytes(arch, trace, torch.float16) == 671 * 32 * 2 * 4096 * 2
    assert kv_cache_bytes(arch, trace, torch.float16, after_decode=True) == 675 * 32 * 2 * 4096 * 2


def test_decode_flops_grow_with_each_layers_own_cache():
    arch = Architecture(llm_layers=2, llm_hidden=8, llm_intermediate=16, llm_heads=2, llm_kv_heads=1,
                        vocab_size=10, vision_layers=0, vision_hidden=4, vision_intermediate=8,
                        vision_tokens=0, projector_in=4, projector_hidden=8)
    trace = TokenTrace(n_visual=4, llm_total=[10, 6], llm_visual=[4, 0], generated_tokens=3)
    per_step_layer = 2 * 64 + 2 * 8 * 4 + 3 * 8 * 16
    attention = 2 * 8 * ((10 + 1) + (10 + 2)) + 2 * 8 * ((6 + 1) + (6 + 2))
    assert full_flops(arch, trace)["decode"] == 2 * (2 * 2 * per_step_layer + attention) + 2 * 80 * 2


# --------------------------------------------------------------------- FlopCounterMode on tiny models

@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def shapes_prompt():
    from tokenbench.tasks.shapes import ShapesTask

    sample = next(iter(ShapesTask().samples(1)))
    return Prompt(sample.load_image(), sample.prompt)


def _measured(adapter, prompt, compressor, budget):
    # the math SDPA backend decomposes attention into matmuls that FlopCounterMode counts
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        generation = adapter.generate([prompt], compressor=compressor, budget=budget,
                                      max_new_tokens=NEW_TOKENS)[0]
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return generation, counts


def _sum(counts: dict[str, int], pattern: str) -> int:
    return sum(v for k, v in counts.items() if re.fullmatch(pattern, k))


LLAVA_ARMS = [(None, None), ("random", "64"), ("fastv", "192"), ("apet", "64"), ("tome", "400")]


@pytest.mark.parametrize("method, budget", LLAVA_ARMS, ids=[m or "none" for m, _ in LLAVA_ARMS])
def test_full_flops_match_flop_counter_on_tiny_llava(tiny_llava_dir, registry, shapes_prompt, method, budget):
    from tokenbench.adapters.llava import LlavaAdapter

    adapter = _cached_adapter(LlavaAdapter, tiny_llava_dir)
    compressor = registry.compressor(method)() if method else None
    generation, counts = _measured(adapter, shapes_prompt, compressor, Budget.parse(budget) if budget else None)
    flops = full_flops(adapter.info().arch, generation.trace)
    steps = generation.trace.generated_tokens - 1
    assert _sum(counts, "CLIPVisionEmbeddings") == flops["patch_embed"] > 0
    assert _sum(counts, "CLIPEncoderLayer") == flops["vision"]
    assert _sum(counts, "LlavaMultiModalProjector") == flops["projector"]
    assert _sum(counts, "LlamaDecoderLayer") == flops["llm_prefill"] + flops["decode"] - steps * flops["lm_head"]
    assert _sum(counts, "Linear") == (steps + 1) * flops["lm_head"]  # the LM head, called directly
    _check_total(counts, flops, method)
    if method is not None:
        assert flops["prefill"] < _cached_baseline_prefill(adapter, generation.trace)


QWEN_ARMS = [(None, None), ("random", "16"), ("fastv", "40"), ("apet", "16")]


@pytest.mark.parametrize("method, budget", QWEN_ARMS, ids=[m or "none" for m, _ in QWEN_ARMS])
def test_full_flops_match_flop_counter_on_tiny_qwen2_vl(tiny_qwen2_vl_dir, registry, shapes_prompt, method,
                                                         budget):
    from tokenbench.adapters.qwen2_vl import Qwen2VLAdapter

    adapter = _cached_adapter(Qwen2VLAdapter, tiny_qwen2_vl_dir)
    compressor = registry.compressor(method)() if method else None
    prompt = Prompt(shapes_prompt.image.resize((224, 224)), shapes_prompt.text)
    generation, counts = _measured(adapter, prompt, compressor, Budget.parse(budget) if budget else None)
    flops = full_flops(adapter.info().arch, generation.trace)
    steps = generation.trace.generated_tokens - 1
    assert _sum(counts, r".*\.patch_embed") == flops["patch_embed"] > 0
    assert _sum(counts, r".*\.blocks\.\d+") == flops["vision"]
    assert _sum(counts, r".*\.merger") == flops["projector"]
    assert _sum(counts, "Qwen2VLDecoderLayer") == flops["llm_prefill"] + flops["decode"] - steps * flops["lm_head"]
    assert _sum(counts, "Linear") == (steps + 1) * flops["lm_head"]
    _check_total(counts, flops, method)


def _check_total(counts: dict[str, int], flops: dict, method: str | None) -> None:
    """Every counted matrix product, probe rows (q-projection and scores) included, is in the formula;
    ApET's and ToMe's own matrix products (selection and merging overhead) are the only extra."""
    formula = flops["prefill"] + flops["decode"]
    if method in (None, "random", "fastv"):
        assert counts["Global"] == formula
    else:
        assert counts["Global"] > formula


_ADAPTERS: dict = {}


def _cached_adapter(cls, path):
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = cls.load(path)
    return _ADAPTERS[cls]


def _cached_baseline_prefill(adapter, trace: TokenTrace) -> int:
    baseline = TokenTrace(n_visual=trace.n_visual, vision=[trace.vision[0]] * len(trace.vision),
                          llm_visual=[trace.n_visual] * len(trace.llm_total),
                          llm_total=[trace.llm_total[0] - trace.llm_visual[0] + trace.n_visual] * len(trace.llm_total))
    return full_flops(adapter.info().arch, baseline)["prefill"]


# ------------------------------------------------------------------------------------ fvcore

def _fvcore_layers(language_model, layers: slice, tokens: int) -> int:
    """fvcore MACs of the stock decoder layers ``layers`` on ``tokens`` input embeddings, with a
    handle for SDPA (which fvcore skips by default)."""
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

    def sdpa(inputs, outputs):
        b, h, n, head = get_shape(inputs[0])
        return 2 * b * h * n * get_shape(inputs[1])[-2] * head  # QKᵀ and AV, MACs

    part = copy.copy(language_model)
    part._modules = dict(language_model._modules)  # a new module table: the model keeps its layers
    part.layers = torch.nn.ModuleList(list(language_model.layers)[layers])

    class Embeds(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.part = part

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.part(inputs_embeds=x, use_cache=False).last_hidden_state

    x = torch.randn(1, tokens, language_model.config.hidden_size)
    analysis = FlopCountAnalysis(Embeds(), (x,)).set_op_handle("aten::scaled_dot_product_attention", sdpa)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return int(analysis.total())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fvcore traces with torch.jit
@pytest.mark.parametrize("method, budget", [(None, None), ("random", "64"), ("fastv", "192"), ("apet", "64")],
                         ids=["none", "random", "fastv", "apet"])
def test_llm_prefill_macs_match_fvcore(tiny_llava_dir, registry, shapes_prompt, method, budget):
    """The trace's per-layer lengths, replayed through the stock layers under fvcore, cost exactly
    what the formula says (runs of equal length are counted as one slice of layers)."""
    from tokenbench.adapters.llava import LlavaAdapter

    adapter = _cached_adapter(LlavaAdapter, tiny_llava_dir)
    compressor = registry.compressor(method)() if method else None
    with torch.inference_mode():
        trace = adapter.generate([shapes_prompt], compressor=compressor,
                                 budget=Budget.parse(budget) if budget else None, max_new_tokens=1)[0].trace
    language_model = adapter.model.model.language_model
    measured, start = 0, 0
    lengths = trace.llm_total
    for index in range(1, len(lengths) + 1):
        if index == len(lengths) or lengths[index] != lengths[start]:
            measured += _fvcore_layers(language_model, slice(start, index), lengths[start])
            start = index
    assert measured == llm_prefill_macs(adapter.info().arch, trace)


# ------------------------------------------------------------------------------ flash attention

def test_flash_probe_classes(tiny_llava_dir, registry, shapes_prompt):
    from tokenbench.adapters.llava import LlavaAdapter

    adapter = _cached_adapter(LlavaAdapter, tiny_llava_dir)
    arch = adapter.info().arch
    fastv_cls = registry.compressor("fastv")

    class FullMapFastV(fastv_cls):  # asks for the full attention map: must be classed eager
        attention_queries = "all"

    def probe(compressor, budget):
        return flash_sdpa_probe(lambda: adapter.generate([shapes_prompt], compressor=compressor,
                                                          budget=Budget.parse(budget), max_new_tokens=1), arch)

    native = probe(registry.compressor("random")(), "64")
    assert native["class"] == "native" and native["eager_attention_calls"] == 0
    fastv = probe(fastv_cls(), "192")
    assert fastv["class"] == "probe" and fastv["probe_rows"] >= 1 and fastv["probe_ms"] >= 0
    assert probe(FullMapFastV(), "192")["class"] == "eager"

    def broken():
        raise RuntimeError("No available kernel")

    failed = flash_sdpa_probe(broken, arch)
    assert failed["class"] == "fails" and "No available kernel" in failed["error"]


def test_flash_probe_really_forces_the_flash_kernel():
    seen = []

    def generate():
        q = torch.randn(1, 2, 4, 8)
        with sdpa_kernel(SDPBackend.MATH):  # nested request for another backend than the forced one
            pass
        seen.append(torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled())
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return [Generation("x", TokenTrace(n_visual=1))]

    result = flash_sdpa_probe(generate, llava_7b_arch())
    assert result["class"] == "native" and seen == [True]


# -------------------------------------------------------------------------------- memory / latency

def test_peak_memory_sees_a_temporary_tensor():
    meter = PeakMemory(torch.device("cpu"))
    with meter.measure():
        big = torch.ones(1024, 1024)  # 4 MiB
        del big
        small = torch.ones(16)
    assert meter.peak_bytes is not None and 4 * 2**20 <= meter.peak_bytes < 5 * 2**20
    assert small.sum() == 16


def test_latency_summary_uses_medians_and_decode_steps():
    runs = [{"vision": 1.0, "prefill": 2.0, "decode": 4.0, "end_to_end": 8.0},
            {"vision": 3.0, "prefill": 2.0, "decode": 8.0, "end_to_end": 20.0},
            {"vision": 2.0, "prefill": 5.0, "decode": 6.0, "end_to_end": 10.0}]
    summary = summarise_latency(runs, [3, 3, 3])
    assert summary == {"vision": 2.0, "prefill": 2.0, "ttft": 5.0, "decode_per_token": 3.0,
                       "end_to_end": 10.0, "repeats": 3, "ttft_iqr": [4.0, 6.0], "end_to_end_iqr": [9.0, 15.0]}
