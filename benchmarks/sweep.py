"""Interleaved prefill sweeps: method × budget arms on one random-weight model, timed as paired ratios.

Shared by the CPU proxy benchmark (``test_proxy_7b.py``) and the GPU check (``gpu_check.py``).

Each round runs every arm once, in an order rotated by one arm per round (A B C, B C A, C A B, ...),
so machine load hits every arm alike; the first ``warmup`` rounds are discarded. An arm's speed-up is
the median over rounds of (baseline time in that round) / (arm time in that round), a paired ratio
with its spread (min..max over rounds), set next to the FLOPs bound (baseline FLOPs / arm FLOPs, from
the arm's own token trace). Their ratio says how much of the FLOPs saving the clock sees.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
from PIL import Image

from tokenbench import Budget, Infeasible, TokenCompressor
from tokenbench.adapters.base import Prompt, VLMAdapter
from tokenbench.measure import PeakMemory, Timer, full_flops, kv_cache_bytes
from tokenbench.plugins import Registry
from tokenbench.random_model import config_path, random_weight_adapter, read_config

BASELINE = "none"
# about 60 words of question, like LLaVA-1.5's system prompt plus a benchmark question
QUESTION = ("A chat between a curious human and an artificial intelligence assistant . The assistant gives "
            "helpful detailed and polite answers to the human 's questions . Look at the picture carefully "
            "and answer the question about it with a single word or phrase : how many red circles are "
            "there to the left of the large blue square in the upper half of the image , and is any "
            "of them partly hidden ?")


@dataclass(frozen=True)
class Arm:
    """One method at one budget; the baseline is ``none`` without a budget."""

    method: str
    budget: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.method}@{self.budget}" if self.budget else self.method


def arms(methods: Sequence[str], budgets: Sequence[str],
         options: dict[str, dict[str, Any]] | None = None) -> list[Arm]:
    """The baseline, then every method × budget (``none`` is the baseline whatever the budget)."""
    options = options or {}
    out = [Arm(BASELINE)]
    out += [Arm(m, b, tuple(sorted(options.get(m, {}).items())))
            for m in methods if m != BASELINE for b in budgets]
    return out


def builtin_methods(registry: Registry) -> list[str]:
    """The registered methods that ship with tokenbench (not third-party plugins)."""
    return sorted(name for name, cls in registry.table("compressor").items()
                  if cls.__module__.startswith("tokenbench.methods"))


def build_adapter(config: str, registry: Registry, *, dtype: torch.dtype, device: torch.device,
                  attn: str = "sdpa", text: dict[str, Any] | None = None,
                  vision: dict[str, Any] | None = None) -> VLMAdapter:
    """A random-weight adapter from a shipped config (or config.json path) with field overrides:
    ``text`` for the language model (``text_config`` or the top level), ``vision`` for the encoder."""
    raw = read_config(config_path(config))
    if text:
        if "text_config" in raw:
            raw["text_config"] = raw["text_config"] | text
        else:
            raw |= text
    if vision:
        raw["vision_config"] = raw["vision_config"] | vision
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{Path(str(config)).stem}.json"
        path.write_text(json.dumps(raw))
        return random_weight_adapter(path, registry, dtype=dtype, attn=attn, device=device)


def image_for(adapter: VLMAdapter, n_visual: int = 576) -> Image.Image:
    """A noise image of the size that gives ``n_visual`` visual tokens (LLaVA: its fixed 336 px;
    Qwen2-VL: 28 px per merged token, so 672 px for 576)."""
    family = adapter.info().family
    side = 336 if family == "llava" else 28 * round(n_visual ** 0.5)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


class TimedReduce:
    """Wraps a compressor's ``reduce`` and sums its wall time (CUDA events on a GPU) per call batch."""

    def __init__(self, compressor: TokenCompressor, device: torch.device) -> None:
        self.ms = 0.0
        timer, inner = Timer(device), compressor.reduce

        def reduce(x):
            with timer.measure():
                out = inner(x)
            self.ms += timer.elapsed_ms
            return out

        compressor.reduce = reduce  # type: ignore[method-assign]


@dataclass
class ArmResult:
    arm: Arm
    runs: list[dict[str, float]] = field(default_factory=list)  # per kept round: vision, prefill, ttft, reduce
    flops: dict[str, Any] | None = None
    kv_bytes: int | None = None
    realised_tokens: float | None = None
    peak_memory_bytes: int | None = None
    skipped: str | None = None  # Infeasible: the reason
    error: str | None = None  # a crash: type and message


def run_once(adapter: VLMAdapter, registry: Registry, arm: Arm, prompt: Prompt, *, seed: int = 0,
             kernel: Callable[[], AbstractContextManager] = nullcontext,
             memory: bool = False) -> tuple[dict[str, float], Any, int | None]:
    """One batch-1 prefill (one generated token) of ``arm``: phase times, trace, peak bytes."""
    compressor = None if arm.method == BASELINE else registry.compressor(arm.method)(**dict(arm.options))
    timed = TimedReduce(compressor, adapter.device) if compressor is not None else None
    budget = Budget.parse(arm.budget) if arm.budget and compressor is not None else None
    meter = PeakMemory(adapter.device) if memory else None
    with torch.inference_mode(), kernel(), meter.measure() if meter else nullcontext():
        generation = adapter.generate([prompt], compressor=compressor, budget=budget, max_new_tokens=1,
                                      seed=seed)[0]
    t = generation.timings_ms
    times = {"vision": t.get("vision", 0.0), "prefill": t.get("prefill", 0.0),
             "ttft": t.get("vision", 0.0) + t.get("prefill", 0.0), "reduce": timed.ms if timed else 0.0}
    return times, generation.trace, meter.peak_bytes if meter else None


def rotations(items: Sequence[Arm], rounds: int) -> Iterator[tuple[int, list[Arm]]]:
    """Round r runs the arms starting at r mod len: every arm takes every position in turn."""
    for r in range(rounds):
        shift = r % len(items)
        yield r, list(items[shift:]) + list(items[:shift])


def sweep(adapter: VLMAdapter, registry: Registry, plan: Sequence[Arm], prompt: Prompt, *, rounds: int,
          warmup: int = 1, kernel: Callable[[], AbstractContextManager] = nullcontext,
          memory: bool = False, log: Callable[[str], None] = lambda _: None) -> dict[str, ArmResult]:
    """Run ``plan`` interleaved for ``warmup + rounds`` rounds; keep the last ``rounds``. A crash or an
    ``Infeasible`` budget is recorded on its arm, which then sits out the later rounds. With
    ``memory``, each arm's peak memory is measured in one extra untimed run after the sweep."""
    results = {arm.label: ArmResult(arm) for arm in plan}
    for r, order in rotations(plan, warmup + rounds):
        for arm in order:
            result = results[arm.label]
            if result.skipped or result.error:
                continue
            try:
                times, trace, _ = run_once(adapter, registry, arm, prompt, kernel=kernel)
            except Infeasible as exc:
                result.skipped = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 -- reported per arm; the sweep goes on
                result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
                continue
            if r >= warmup:
                result.runs.append(times)
            result.flops = full_flops(adapter.info().arch, trace)
            result.kv_bytes = kv_cache_bytes(adapter.info().arch, trace, adapter.dtype)
            result.realised_tokens = trace.realised_tokens
        log(f"round {r + 1}/{warmup + rounds} done" + (" (warm-up)" if r < warmup else ""))
    if memory:
        for result in results.values():
            if result.runs:
                result.peak_memory_bytes = run_once(adapter, registry, result.arm, prompt, kernel=kernel,
                                                    memory=True)[2]
    return results


def summarise(results: dict[str, ArmResult], phase: str = "ttft") -> list[dict[str, Any]]:
    """Per arm: median ``phase`` ms with its min..max, the paired speed-up over the baseline (median of
    per-round ratios, with min..max), the FLOPs bound and their ratio. ``phase``: ``ttft`` against
    prefill FLOPs (vision + LLM), or ``prefill`` (LLM only) against the LLM's prefill FLOPs."""
    base = results[BASELINE]
    rows = []
    for label, result in results.items():
        row: dict[str, Any] = {"arm": label, "skipped": result.skipped, "error": result.error}
        if result.runs and base.runs:
            times = [run[phase] for run in result.runs]
            ratios = [b[phase] / a[phase] for b, a in zip(base.runs, result.runs) if a[phase] > 0]
            flops_bound = _flops(base, phase) / _flops(result, phase)
            speedup = median(ratios) if ratios else float("nan")
            row |= {"ms": median(times), "ms_min": min(times), "ms_max": max(times),
                    "speedup": speedup, "speedup_min": min(ratios, default=float("nan")),
                    "speedup_max": max(ratios, default=float("nan")), "flops_bound": flops_bound,
                    "ratio": speedup / flops_bound, "tokens": result.realised_tokens,
                    "reduce_share": median(run["reduce"] / run["ttft"] for run in result.runs if run["ttft"]),
                    "kv_bytes": result.kv_bytes, "peak_memory_bytes": result.peak_memory_bytes,
                    "rounds": len(result.runs)}
        rows.append(row)
    return rows


def _flops(result: ArmResult, phase: str) -> float:
    flops = result.flops or {}
    if phase == "prefill":
        return flops["llm_prefill"] + flops["lm_head"] + flops["probe"]
    return flops["prefill"]


def table(rows: Sequence[dict[str, Any]], phase: str = "ttft") -> str:
    """A plain-text table of :func:`summarise` rows."""
    head = (f"{'arm':<16} {'tokens':>6} {phase + ' ms':>10} {'min..max':>17} {'speed-up':>8} "
            f"{'min..max':>11} {'FLOPs x':>7} {'ratio':>5} {'reduce':>6} {'KV MiB':>7} {'peak MiB':>8}")
    lines = [head, "-" * len(head)]
    for row in rows:
        if row.get("skipped") or row.get("error"):
            what = f"skipped: {row['skipped']}" if row.get("skipped") else f"CRASHED: {row['error']}"
            lines.append(f"{row['arm']:<16} {what}")
            continue
        if "ms" not in row:
            continue
        peak = f"{row['peak_memory_bytes'] / 2**20:8.0f}" if row.get("peak_memory_bytes") is not None else f"{'-':>8}"
        lines.append(
            f"{row['arm']:<16} {row['tokens']:6.1f} {row['ms']:10.1f} {row['ms_min']:8.1f}..{row['ms_max']:<7.1f} "
            f"{row['speedup']:8.2f} {row['speedup_min']:5.2f}..{row['speedup_max']:<4.2f} "
            f"{row['flops_bound']:7.2f} {row['ratio']:5.2f} {100 * row['reduce_share']:5.1f}% "
            f"{row['kv_bytes'] / 2**20:7.1f} {peak}")
    return "\n".join(lines)
