"""Measurements: analytic FLOPs from a token trace, KV-cache bytes, latency, peak memory, and the
FlashAttention compatibility probe.

FLOPs are computed from :class:`~tokenbench.adapters.base.TokenTrace` (tokens alive per vision block
and per decoder layer) and :class:`~tokenbench.compressor.Architecture`, so they are exact for what
actually ran and need no model internals. Two formulas, always named in the output:

``full_flops`` (unit FLOP = 2 × multiply–accumulates) counts every matrix product:

- patch embedding, per patch: ``patch_in·dv`` (the convolution: channels × patch area × frames
  input values to width ``dv``);
- vision encoder, per block with ``t`` tokens, width ``dv``, MLP width ``mv``: Q, K, V, O projections
  ``4·t·dv²``, attention ``QKᵀ`` and ``AV`` ``2·t²·dv``, MLP ``2·t·dv·mv`` (MACs), once per frame of a
  video (``TokenTrace.vision_frames``);
- projector, per visual token it runs on: ``in·hidden + hidden·d``;
- LLM prefill, per decoder layer with ``n`` tokens, width ``d``, MLP width ``m``, ``h`` query heads,
  ``g`` key/value heads (head size ``d/h``): Q and O ``2·n·d²``, K and V ``2·n·d·g·d/h`` (GQA-aware),
  attention ``2·n²·d`` (the full square that SDPA computes, causal mask or not), MLP ``3·n·d·m`` with
  SwiGLU's gate matrix (``2·n·d·m`` without), plus the LM head ``d·V`` on the last prompt token only;
- LLM decode, for each of the ``R − 1`` forward steps after the first generated token (the first
  comes from the prefill logits): per layer ``2d² + 2d·g·d/h + 3dm`` and attention ``2·d·c`` over the
  ``c`` cached tokens of that layer (pruned layers keep shorter caches), plus the LM head; under a
  ``decode`` site (DyCoke's KV pruning) the layers from the site on attend only the entries of that
  step's view, so ``c`` drops by the visual entries left out of it;
- attention probes (``probe_rows``): per row the q-projection ``d²`` and ``QKᵀ`` over the prompt
  (a ``decode`` site's one row per decode step is among them, so it is charged with the prefill).

Not counted: position embeddings, norms, activations, softmax, rotary embeddings, residual adds,
token-compression overhead other than probe attention rows (all of them are O(n·d), a fraction of a
percent here).

``fastv_macs`` (unit MAC) is the FastV paper's per-layer ``4nd² + 2n²d + 2ndm`` over the LLM decoder
only (it ignores GQA, SwiGLU's third matrix and the LM head); decode follows the paper's variant
``R(4d² + 2dm) + 2·Σᵢ d(n + i)`` with ``R`` generated tokens. Its ``vision`` entry applies the same
formula to the vision encoder blocks for reference; its ``prefill`` is the LLM only, as in the papers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch

from tokenbench.adapters.base import AdapterError, TokenTrace
from tokenbench.adapters.loading import check_attention
from tokenbench.compressor import Architecture

FORMULAS = ("full_flops", "fastv_macs")
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def _head_dim(arch: Architecture) -> int:
    return arch.llm_hidden // arch.llm_heads


def _kv_width(arch: Architecture) -> int:
    return arch.llm_kv_heads * _head_dim(arch)


def vision_macs(arch: Architecture, trace: TokenTrace) -> int:
    """Vision encoder MACs over the blocks that ran (non-gated MLP, as in CLIP and Qwen2-VL's ViT).

    Approximate for Qwen2.5-VL, whose ViT has a gated (three-matrix) MLP and windowed attention in
    most blocks: its MLP term is undercounted by a third and its attention term overcounted. Vision
    FLOPs are the same for every method there (no ``vision`` stage), so comparisons are unaffected."""
    dv, mv = arch.vision_hidden, arch.vision_intermediate
    per_frame = sum(4 * t * dv * dv + 2 * t * t * dv + 2 * t * dv * mv for t in trace.vision)
    return per_frame * trace.vision_frames  # a video's frames run through the encoder one by one


def patch_embed_macs(arch: Architecture, trace: TokenTrace) -> int:
    """The patch-embedding convolution: every patch of the image, ``patch_in`` values to ``dv``."""
    return trace.n_visual * arch.patches_per_token * arch.patch_in * arch.vision_hidden


def projector_tokens(trace: TokenTrace) -> int:
    """Visual tokens the projector runs on: those entering the LLM, unless a ``projector`` site (or
    an ``llm`` site at layer 0) reduced them after the projector ran on the earlier count."""
    if trace.projector_tokens is not None:
        return trace.projector_tokens
    after_projector = [(stage, layer) for stage, layer, _ in trace.plan
                       if stage == "projector" or (stage == "llm" and layer == 0)]
    if after_projector or not trace.llm_visual:
        before = [keep for stage, _, keep in trace.plan if stage == "vision_out"]
        return before[-1] if before else trace.n_visual
    return trace.llm_visual[0]


def projector_macs(arch: Architecture, trace: TokenTrace) -> int:
    """Two-matrix projector (LLaVA's MLP, Qwen2-VL's merger): in → hidden → LLM width per token."""
    per_token = arch.projector_in * arch.projector_hidden + arch.projector_hidden * arch.llm_hidden
    return projector_tokens(trace) * per_token


def llm_prefill_macs(arch: Architecture, trace: TokenTrace) -> int:
    """Decoder-layer MACs of the prefill (no LM head)."""
    d, m = arch.llm_hidden, arch.llm_intermediate
    mlp_mats = 3 if arch.gated_mlp else 2
    proj = 2 * d * d + 2 * d * _kv_width(arch)
    return sum(n * proj + 2 * n * n * d + mlp_mats * n * d * m for n in trace.llm_total)


def decode_steps(trace: TokenTrace) -> int:
    """Forward passes after the prefill: the first generated token comes from the prefill logits."""
    return max(trace.generated_tokens - 1, 0)


def llm_decode_macs(arch: Architecture, trace: TokenTrace) -> int:
    """Decoder-layer MACs of the decode steps, each attending over its layer's growing cache."""
    d, m = arch.llm_hidden, arch.llm_intermediate
    mlp_mats = 3 if arch.gated_mlp else 2
    steps = decode_steps(trace)
    per_step = 2 * d * d + 2 * d * _kv_width(arch) + mlp_mats * d * m
    # step i (1..steps) attends over n + i cached positions of its layer
    attention = sum(2 * d * (steps * n + steps * (steps + 1) // 2) for n in trace.llm_total)
    return steps * per_step * len(trace.llm_total) + attention - 2 * d * decode_view_savings(trace)


def decode_view_savings(trace: TokenTrace) -> int:
    """Cached entries a ``decode`` site's view left unattended, summed over the decode steps and the
    layers from the site on (0 without a decode site)."""
    if trace.decode_layer is None:
        return 0
    dropped = sum(trace.decode_cached_visual - kept for kept in trace.decode_visual[:decode_steps(trace)])
    return dropped * (len(trace.llm_total) - trace.decode_layer)


def probe_macs(arch: Architecture, trace: TokenTrace) -> int:
    """Attention-probe rows computed beside the fused kernel: each row's q-projection (``d²``) and
    ``QKᵀ`` over the prompt (an upper bound: each row is charged the full prompt length; rows of a
    vision-encoder probe are charged at the LLM width too), plus the key projection of the tokens
    whose keys the probe computed itself rather than read from the cache."""
    context = max(trace.llm_total, default=0)
    return (trace.probe_rows * (context * arch.llm_hidden + arch.llm_hidden * arch.llm_hidden)
            + trace.probe_key_tokens * arch.llm_hidden * _kv_width(arch))


def full_flops(arch: Architecture, trace: TokenTrace) -> dict[str, Any]:
    vision = 2 * vision_macs(arch, trace)
    patch_embed = 2 * patch_embed_macs(arch, trace)
    projector = 2 * projector_macs(arch, trace)
    llm_prefill = 2 * llm_prefill_macs(arch, trace)
    lm_head = 2 * arch.llm_hidden * arch.vocab_size
    probe = 2 * probe_macs(arch, trace)
    decode = 2 * llm_decode_macs(arch, trace) + decode_steps(trace) * lm_head
    return {"formula": "full_flops", "unit": "FLOP",
            "prefill": patch_embed + vision + projector + llm_prefill + lm_head + probe, "decode": decode,
            "patch_embed": patch_embed, "vision": vision, "projector": projector, "llm_prefill": llm_prefill, "lm_head": lm_head,
            "probe": probe}


def fastv_macs(arch: Architecture, trace: TokenTrace) -> dict[str, Any]:
    d, m = arch.llm_hidden, arch.llm_intermediate
    prefill = sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in trace.llm_total)
    r = trace.generated_tokens
    decode = sum(r * (4 * d * d + 2 * d * m) + 2 * d * (r * n + r * (r + 1) // 2) for n in trace.llm_total)
    decode -= 2 * d * decode_view_savings(trace)
    return {"formula": "fastv_macs", "unit": "MAC", "prefill": prefill, "decode": decode,
            "vision": vision_macs(arch, trace)}


def flops_from_trace(arch: Architecture, trace: TokenTrace) -> dict[str, Any]:
    """Both formulas for one sample: ``full_flops`` at the top level, ``fastv_macs`` nested."""
    return full_flops(arch, trace) | {"fastv_macs": fastv_macs(arch, trace)}


def mean_flops(per_sample: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-sample FLOPs averaged over samples (numeric fields only; names kept)."""
    if not per_sample:
        return None

    def average(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items[0].items():
            if isinstance(value, dict):
                out[key] = average([item[key] for item in items])
            elif isinstance(value, (int, float)):
                out[key] = sum(item[key] for item in items) / len(items)
            else:
                out[key] = value
        return out

    return average(per_sample)


def kv_cache_bytes(arch: Architecture, trace: TokenTrace, dtype: torch.dtype, *, after_decode: bool = False) -> int:
    """Bytes of the K and V caches: Σ_layers length × 2 × kv_heads × head_dim × dtype bytes, after
    the prefill (or, with ``after_decode``, once every generated token is cached)."""
    extra = decode_steps(trace) if after_decode else 0
    per_position = 2 * _kv_width(arch) * DTYPE_BYTES.get(dtype, 4)
    return sum((n + extra) * per_position for n in trace.llm_total)


# --------------------------------------------------------------------------------------------- timing

CPU = torch.device("cpu")


@dataclass
class Timer:
    """Wall-clock of a block: CUDA events on a GPU (synchronised), ``perf_counter`` on CPU."""

    device: torch.device
    elapsed_ms: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize(self.device)
            self.elapsed_ms = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            yield
            self.elapsed_ms = (time.perf_counter() - begin) * 1000.0


def summarise_latency(runs: Sequence[dict[str, float]], generated: Sequence[int]) -> dict[str, Any]:
    """Medians over repeated runs: vision, prefill, time to first token (vision + prefill), decode
    per token (decode time / decode steps), end to end; the spread of time to first token and end
    to end as their first and third quartiles (``ttft_iqr``, ``end_to_end_iqr``); and the number of
    timed runs (``repeats``)."""
    per_token = [r.get("decode", 0.0) / max(g - 1, 1) for r, g in zip(runs, generated)]
    ttft = [r.get("vision", 0.0) + r.get("prefill", 0.0) for r in runs]
    end_to_end = [r["end_to_end"] for r in runs]
    return {"vision": median([r.get("vision", 0.0) for r in runs]),
            "prefill": median([r.get("prefill", 0.0) for r in runs]),
            "ttft": median(ttft), "ttft_iqr": quartiles(ttft),
            "decode_per_token": median(per_token),
            "end_to_end": median(end_to_end), "end_to_end_iqr": quartiles(end_to_end),
            "repeats": len(runs)}


def quartiles(values: Sequence[float]) -> list[float]:
    """First and third quartile (linear interpolation between order statistics)."""
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return [at(0.25), at(0.75)]


# --------------------------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak tensor memory allocated during a block, in bytes above what was allocated at its start.

    On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. On CPU, where torch keeps
    no such counter: the PyTorch profiler with ``profile_memory=True`` records every tensor
    allocation and free; the peak of their running sum is the same quantity (tensor memory only, no
    allocator caches or Python objects). The profiler slows the block, so time it separately.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - base
            return
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _silent_stderr_fd():  # kineto logs its start and stop on file descriptor 2
            profiler.start()
        try:
            yield
        finally:
            with _silent_stderr_fd():
                profiler.stop()
        events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        self.peak_bytes = peak


@contextlib.contextmanager
def _silent_stderr_fd() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ------------------------------------------------------------------------------------ flash attention

def classify_flash_attention(trace: TokenTrace) -> str:
    """``eager`` when a full attention map was materialised, ``probe`` when only query rows were
    computed beside the fused kernel, else ``native``."""
    if trace.eager_attention_calls > 0:
        return "eager"
    if trace.probe_rows > 0:
        return "probe"
    return "native"


def flash_sdpa_probe(generate: Callable[[], Sequence[Any]], arch: Architecture,
                     device: torch.device = CPU,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Run ``generate`` (one sample, batch 1) with SDPA forced onto its FlashAttention kernel and
    report the class measured from the trace: ``native`` / ``probe`` (with probe rows, their analytic
    FLOPs and their time on ``device`` in ``dtype``) / ``eager`` / ``fails`` (with the error)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            generation = generate()[0]
    except Exception as exc:  # noqa: BLE001 -- any failure under the forced kernel is the finding
        return {"class": "fails", "backend": "sdpa:flash", "error": f"{type(exc).__name__}: {exc}"}
    trace = generation.trace
    result: dict[str, Any] = {"class": classify_flash_attention(trace), "backend": "sdpa:flash",
                              "eager_attention_calls": trace.eager_attention_calls,
                              "probe_rows": trace.probe_rows}
    if trace.probe_rows:
        result["probe_flops"] = 2 * probe_macs(arch, trace)
        result["probe_ms"] = time_probe_rows(arch, trace, device, dtype)
    return result


def time_probe_rows(arch: Architecture, trace: TokenTrace, device: torch.device = CPU,
                    dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Measured cost (ms, median of ``repeats``, on ``device`` in ``dtype``) of what a probe adds
    beside the fused kernel: ``softmax(q·Kᵀ)`` for the trace's probe rows over the prompt, all
    heads, then the head mean. Timed apart from the run, at the trace's sizes, with :class:`Timer`."""
    heads, head_dim = arch.llm_heads, _head_dim(arch)
    context = max(trace.llm_total, default=1)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, trace.probe_rows, head_dim, generator=generator).to(device, dtype)
    k = torch.randn(1, heads, context, head_dim, generator=generator).to(device, dtype)
    timer, times = Timer(device), []
    for _ in range(repeats):
        with timer.measure():
            torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1).mean(dim=1)
        times.append(timer.elapsed_ms)
    return median(times)


def flash_attn_available() -> bool:
    """Whether ``flash_attention_2`` can run here (flash-attn and CUDA); then it is tried too."""
    try:
        check_attention("flash_attention_2")
    except AdapterError:
        return False
    return True
