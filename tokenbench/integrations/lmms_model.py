"""tokenbench as an lmms-eval model: ``lmms-eval --model tokenbench --model_args pretrained=...``.

``generate_until`` runs every request through a tokenbench adapter (``runner.load_adapter``,
``adapter.generate``) with the method and budget of the model arguments, so a compressed model is
evaluated under exactly tokenbench's budget semantics and traces. When lmms-eval finishes
(``clean``), the realised visual tokens and FLOPs of the run are written as a tokenbench record
next to lmms-eval's ``*_results.json`` (``<output_path>/<model>/tokenbench_<task>_<method>_<budget>.json``).

Model arguments (lmms-eval's ``key=value,...``): ``pretrained`` (an embedded model name, a local
checkpoint or a hub id; default: the embedded default model), ``method`` (default ``none``),
``budget`` (``11.1%`` or a token count; required with a method), ``options``
(``KEY=VALUE;KEY=VALUE`` or a JSON object), ``seed``, ``dtype``, ``attn``, ``device``,
``record_dir`` (where the record goes, default lmms-eval's ``--output_path``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import sanitize_model_name
from loguru import logger
from tqdm import tqdm

from tokenbench.adapters.base import Generation, Prompt
from tokenbench.budget import Budget
from tokenbench.compressor import Infeasible
from tokenbench.config import ConfigError, MethodSpec, RunConfig, coerce_options
from tokenbench.integrations.lmms_requests import Decoding, single_image
from tokenbench.measure import flops_from_trace, kv_cache_bytes, mean_flops
from tokenbench.models import default_model, resolve_model
from tokenbench.plugins import load_registry
from tokenbench.results import BASELINE, provenance
from tokenbench.runner import DTYPES, load_adapter

RECORD_KIND = "lmms-eval-run"


def parse_options(text: Any) -> dict[str, str]:
    """``options=`` as ``KEY=VALUE;KEY=VALUE`` or a JSON object (strings, typed later by the method)."""
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in text.items()}
    text = str(text).strip()
    if text.startswith("{"):
        try:
            return parse_options(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"options={text}: not a JSON object ({exc.msg})") from None
    pairs = [p for p in text.split(";") if p.strip()]
    if not all("=" in p for p in pairs):
        raise ConfigError(f"options={text} must look like KEY=VALUE;KEY=VALUE, e.g. options=basis=10")
    return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}


def _cli_output_path() -> str | None:
    """lmms-eval's ``--output_path`` when it runs from its command line (the model is not told)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.output_path


class TokenbenchLMM(lmms):
    """A tokenbench adapter, method and budget behind lmms-eval's model interface."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str = BASELINE, budget: Any = None,
                 options: Any = None, seed: int = 0, dtype: str = "float32", attn: str = "sdpa",
                 device: str | None = None, batch_size: Any = 1, record_dir: str | None = None,
                 **unused: Any) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            raise ConfigError(f"unknown model_args for tokenbench: {', '.join(sorted(unused))}; known: "
                              "pretrained, method, budget, options, seed, dtype, attn, device, record_dir")
        registry = load_registry()
        self.method = str(method)
        registry.compressor(self.method)
        if self.method == BASELINE:
            self.budget = None
        elif budget in (None, ""):
            raise ConfigError(f"method={self.method} needs a budget, e.g. budget=11.1% or budget=64")
        else:
            self.budget = Budget.parse(str(budget))
        self.options = coerce_options(registry.compressor(self.method), self.method, parse_options(options)) \
            if self.method != BASELINE else {}
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device}: CUDA is not available here; use device=cpu")
        model = resolve_model(str(pretrained or default_model()), registry)
        spec = MethodSpec(self.method, self.options)
        self.config = RunConfig(model=model, methods=[spec], budgets=[self.budget] if self.budget else [],
                                tasks=[], seed=int(seed), dtype=dtype, attn=attn, device=device)
        self.adapter = load_adapter(self.config, registry)
        self.compressor = spec.build(registry) if self.budget else None
        self._check_feasible()
        self.arch = self.adapter.info().arch
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.record_dir = record_dir
        self.samples: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def _check_feasible(self) -> None:
        if self.compressor is None or self.budget is None:
            return
        info = self.adapter.info()
        try:
            self.compressor.schedule(info.n_visual, self.budget.target(info.n_visual), info)
        except Infeasible as exc:
            raise ConfigError(f"{self.method}@{self.budget.label} is infeasible on "
                              f"{self.config.model.name}: {exc}") from None

    # ------------------------------------------------------------------------------- requests
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("Loglikelihood is not implemented for tokenbench (it generates text only)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("Multi-round generation is not implemented for tokenbench")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding") as bar:
            for batch in self._batches(requests):
                answers += self._answer(batch)
                bar.update(len(batch))
        return answers

    def _batches(self, requests: Sequence[Instance]) -> Iterator[list[tuple[Instance, Decoding]]]:
        """Consecutive requests of equal decoding, ``batch_size`` at a time (1 where the adapter
        cannot batch the method); the order of the answers stays the order of the requests."""
        size = self.batch_size if self.adapter.batchable(self.compressor) else 1
        batch: list[tuple[Instance, Decoding]] = []
        for request in requests:
            decoding = Decoding.from_generation_kwargs(request.args[1])
            if batch and (len(batch) == size or batch[-1][1] != decoding):
                yield batch
                batch = []
            batch.append((request, decoding))
        if batch:
            yield batch

    def _answer(self, batch: Sequence[tuple[Instance, Decoding]]) -> list[str]:
        prompts = []
        for request, _ in batch:
            context, _, doc_to_visual, doc_id, task, split = request.args[:6]
            # keyed by the doc id, as `tokenbench run --tasks lmms:<task>` keys its samples, so a
            # stochastic method draws the same numbers for a document in both directions
            prompts.append(Prompt(single_image(doc_to_visual(self.task_dict[task][split][doc_id])), context,
                                  key=str(doc_id)))
        decoding = batch[0][1]
        with torch.inference_mode():
            generations = self.adapter.generate(prompts, compressor=self.compressor, budget=self.budget,
                                                max_new_tokens=decoding.max_new_tokens, seed=self.config.seed)
        answers = []
        for (request, _), generation in zip(batch, generations):
            answer = decoding.cut(generation.text)
            self._remember(request, answer, generation)
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answer)
        return answers

    def _remember(self, request: Instance, answer: str, generation: Generation) -> None:
        trace = generation.trace
        self.samples[request.task_name].append({
            "doc_id": request.doc_id, "prediction": answer, "trace": trace.to_dict(),
            "flops": flops_from_trace(self.arch, trace),
            "kv_cache_bytes": kv_cache_bytes(self.arch, trace, DTYPES[self.config.dtype]),
            "timings_ms": generation.timings_ms})

    # --------------------------------------------------------------------------------- record
    def records(self) -> dict[str, dict[str, Any]]:
        """One tokenbench record per lmms-eval task of the run: realised tokens, FLOPs, traces."""
        out = {}
        for task, samples in self.samples.items():
            traces = [s["trace"] for s in samples]
            realised = sum(t["realised_tokens"] for t in traces) / len(traces)
            n_visual = sum(t["n_visual"] for t in traces) / len(traces)
            out[task] = {
                "kind": RECORD_KIND, "harness": "lmms-eval", "model": self.config.model.name, "task": task,
                "method": self.method, "budget": self.budget.label if self.budget else None,
                "n_samples": len(samples), "realised_tokens": realised,
                "realised_ratio": realised / n_visual if n_visual else None, "n_visual": n_visual,
                "flops": mean_flops([s["flops"] for s in samples]),
                "kv_cache_bytes": sum(s["kv_cache_bytes"] for s in samples) / len(samples),
                "provenance": provenance(device=torch.device(self.config.device), dtype=self.config.dtype,
                                         attn=self.config.attn, seed=self.config.seed, options=self.options,
                                         model_location=self.config.model.location),
                "samples": sorted(samples, key=lambda s: s["doc_id"])}
        return out

    def record_directory(self) -> Path | None:
        """Where lmms-eval writes this run's results (``<output_path>/<model>``), or ``record_dir``."""
        if self.record_dir:
            return Path(self.record_dir)
        output = _cli_output_path()
        if not output:
            return None
        base = Path(output)
        if base.suffix in (".json", ".jsonl"):
            base = base.parent
        return base / sanitize_model_name(self.config.model.name)

    def write_records(self) -> list[Path]:
        directory = self.record_directory()
        records = self.records()
        if records and directory is None:
            logger.warning("tokenbench: no --output_path (or record_dir=) given; the tokenbench record "
                           "of realised tokens and FLOPs is not written")
            return []
        paths = []
        for task, record in records.items():
            assert directory is not None
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"tokenbench_{task}_{self.method}_{record['budget'] or 'full'}.json".replace("%", "pct")
            path.write_text(json.dumps(record, indent=2) + "\n")
            paths.append(path)
            logger.warning(f"tokenbench: {task}: {record['realised_tokens']:.1f} visual tokens realised of "
                           f"{record['n_visual']:.1f}; record written to {path}")
        return paths

    def clean(self) -> None:
        """lmms-eval calls this once every task has its answers: write the records, then free."""
        self.write_records()
        self.samples.clear()
        super().clean()
