"""The harness: every task × (uncompressed baseline + method × budget) on one model.

Per task it runs, in order,

1. the **accuracy pass** of every arm, chunk by chunk (``--batch-size`` samples, generated as one
   batch where the adapter allows the method, else one by one); each arm's finished chunk is
   appended to ``samples.jsonl`` with one fsync, keyed by what determines its output, so a rerun
   resumes and a kill loses at most the batch in flight;
2. a **FlashAttention probe** per arm (one sample under the forced flash SDPA kernel) and, unless
   disabled, one **efficiency pass** over all live arms *interleaved* (baseline, A, B, baseline, A,
   B, ...: batch 1, one warm-up each, ``EFFICIENCY_REPEATS`` rounds over the same
   ``EFFICIENCY_SAMPLES`` samples), so machine load hits every arm alike and each arm's speed-up is
   a paired ratio against the baseline's run of the same round (:mod:`tokenbench.speedup`);
3. one run JSON per (model, task, method, budget, settings) with statistics against the baseline.

Each task image is decoded (or, for ``shapes``, rendered) once per chunk for all arms; those of the
first ``KEPT_PROMPTS`` samples, the ones the efficiency pass draws from, are kept for it.

Faults stay local: a sample whose image fails to decode, whose prompt exceeds the model's context,
or on which the method raises gets a record with the error (and, for an exception, the file and line
that raised it) and the run goes on; a budget the method cannot meet (``Infeasible``) gives a run
record with the reason. What cannot work at all fails before any sample runs, in one line: a model
that does not load, task data that do not read, a count budget above the image's token count, a
site outside the model's layers.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import tokenbench
from tokenbench.adapters.base import Generation, Prompt, TokenTrace, VLMAdapter
from tokenbench.adapters.placement import Placement, device_placement
from tokenbench.budget import Budget
from tokenbench.compressor import Infeasible, ModelInfo, Stage, TokenCompressor
from tokenbench.config import ConfigError, MethodSpec, RunConfig
from tokenbench.distributed import Processes, ShardedSampleStore, current_processes
from tokenbench.measure import (
    PeakMemory,
    Timer,
    flash_attn_available,
    flash_sdpa_probe,
    flops_from_trace,
    kv_cache_bytes,
    mean_flops,
    summarise_latency,
)
from tokenbench.plugins import Registry
from tokenbench.results import (
    BASELINE,
    OVER_BUDGET_TOLERANCE,
    SCHEMA_VERSION,
    SampleStore,
    claim_output_dir,
    provenance,
    record_key,
    write_run_record,
)
from tokenbench.signal_guard import guard_signals
from tokenbench.speedup import paired_speedup
from tokenbench.stats import compare
from tokenbench.tasks.base import Sample, Task, TaskDataError

EFFICIENCY_SAMPLES = 3
EFFICIENCY_REPEATS = 3
KEPT_PROMPTS = 2 * EFFICIENCY_SAMPLES  # decoded images kept from the accuracy pass for the efficiency pass
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Arm:
    """One method at one budget (the baseline has no budget)."""

    spec: MethodSpec
    budget: Budget | None

    @property
    def label(self) -> str:
        return f"{self.spec.name}@{self.budget.label}" if self.budget else self.spec.name


def arms(config: RunConfig) -> list[Arm]:
    """The baseline first, then every method × budget (``none`` in --methods is the baseline)."""
    out = [Arm(MethodSpec(BASELINE), None)]
    out += [Arm(spec, budget) for spec in config.methods if spec.name != BASELINE for budget in config.budgets]
    return out


def run_arguments(config: RunConfig, accuracy: bool = True) -> dict[str, Any]:
    """What identifies a run's output directory (batch size and --json do not change results)."""
    return {"accuracy": accuracy, "model": config.model.name, "model_location": config.model.location,
            "methods": [{"name": m.name, "options": m.options} for m in config.methods],
            "budgets": [b.label for b in config.budgets], "tasks": list(config.tasks),
            "limit": config.limit, "seed": config.seed, "dtype": config.dtype, "attn": config.attn,
            "device": config.device, "data_dir": str(config.data_dir) if config.data_dir else None,
            "efficiency": config.efficiency, "tokenbench": tokenbench.__version__,
            "scoring": config.scoring, "protocol": config.protocol} | ({"frames": config.frames} if config.frames else {})


def model_type_of(config: RunConfig) -> str:
    """``config.model``'s ``model_type``: known for local and embedded models, read from the hub
    model's config otherwise."""
    if config.model.model_type is not None:
        return config.model.model_type
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.model.location).model_type


def load_adapter(config: RunConfig, registry: Registry, random_weights: bool = False) -> VLMAdapter:
    """The adapter for ``config.model``: from its checkpoint, or with random weights from a config."""
    dtype, device = DTYPES[config.dtype], torch.device(config.device)
    if random_weights:
        from tokenbench.random_model import random_weight_adapter

        adapter = random_weight_adapter(Path(config.model.location), registry, dtype=dtype, attn=config.attn,
                                        device=device)
        adapter.protocol = resolve_protocol(config, type(adapter))
        return adapter
    cls = registry.adapter_for(model_type_of(config))
    placement = Placement(config.device_map, config.max_memory, config.output / "offload") \
        if config.device_map else device
    adapter = cls.load(config.model.location, dtype=dtype, attn=config.attn, device=placement)
    adapter.protocol = resolve_protocol(config, cls)
    return adapter


def video_frames(config: RunConfig, registry: Registry) -> int:
    """``--frames``, else the frame count of the model family's reference evaluation
    (``VLMAdapter.video_frames``); a hub model not read yet is read for its ``model_type`` (when
    that fails, loading the model reports why)."""
    if config.frames:
        return config.frames
    try:
        model_type = model_type_of(config)
    except Exception:  # noqa: BLE001 -- the model's own load says what is wrong
        return VLMAdapter.video_frames
    return registry.adapter_for(model_type).video_frames


def resolve_protocol(config: RunConfig, adapter_cls: type[VLMAdapter]) -> str:
    """``--protocol``, else ``hf`` for embedded models (the protocol they were trained with), else the
    family's default (``llava`` for LLaVA checkpoints); ``ConfigError`` when the family lacks it."""
    offered = getattr(adapter_cls, "protocols", ("hf",))
    if config.protocol is None:
        return "hf" if config.model.embedded else getattr(adapter_cls, "default_protocol", "hf")
    if config.protocol not in offered:
        raise ConfigError(f"--protocol {config.protocol}: the {adapter_cls.name} adapter offers "
                          f"{', '.join(offered)}; drop --protocol or pick one of those")
    return config.protocol


def run(config: RunConfig, registry: Registry, *, accuracy: bool = True,
        random_weights: bool = False) -> list[dict[str, Any]]:
    """Run everything ``config`` asks for; return the public run records (also written as JSON).
    ``config.threads`` (``--threads``) sets torch's CPU thread count first.

    ``accuracy=False`` skips the accuracy pass (scores are null; FLOPs and tokens come from the
    efficiency samples); ``random_weights`` builds ``config.model`` (an HF config.json) with random
    weights, for timing model shapes without a checkpoint."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.device}: CUDA is not available here; use --device cpu")
    if config.model.model_type is None and not random_weights and not Path(config.model.location).exists():
        from tokenbench.hub import unreachable_reason

        if reason := unreachable_reason(config.model.location):  # at once, not after the hub's retries
            raise ConfigError(f"cannot load model '{config.model.name}': {reason}")
    processes = current_processes(cpu=config.device == "cpu" and not config.device_map)
    if processes.is_main:  # one writer of the manifest; the others start once it is claimed
        claim_output_dir(config.output, run_arguments(config, accuracy) | {"random_weights": random_weights})
    processes.barrier()
    config = dataclasses.replace(config, device=processes.device(config.device),
                                 max_memory=config.max_memory or (processes.gpu_share() if config.device_map
                                                                  else None))
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    frames = video_frames(config, registry)
    tasks = {name: load_task(name, config, registry, frames) for name in config.tasks}
    try:
        adapter = load_adapter(config, registry, random_weights)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- missing or corrupt files, bad config: one line, exit 2
        hint = ("; a *.safetensors file there is truncated or corrupt: copy or save the checkpoint again"
                if "safetensor" in type(exc).__name__.lower() else "")
        raise ConfigError(f"cannot load model '{config.model.name}' from {config.model.location}: "
                          f"{_describe(exc)[:300]}{hint}") from None
    if config.device_map:  # timings and provenance look where the inputs go, not at --device
        config = dataclasses.replace(config, device=str(adapter.device))
    harness = Harness(config, registry, adapter, accuracy=accuracy, random_weights=random_weights)
    for task, samples in tasks.values():
        harness.check_plans(harness.reference_info(task, samples))
    harness.processes = processes
    records: list[dict[str, Any]] = []
    with ShardedSampleStore(config.output, processes) as store:
        harness.store = store
        if processes.distributed:  # each process its shard of the accuracy passes; then the main alone
            processes.barrier()  # every store loaded before any process appends: one view to shard
            for task, samples in tasks.values():
                harness.run_task(task, samples, shard=True)
            processes.barrier()
            if not processes.is_main:
                return []
            store.reload()
        for task, samples in tasks.values():
            records += harness.run_task(task, samples)
    return records


def load_task(name: str, config: RunConfig, registry: Registry,
              frames: int | None = None) -> tuple[Task, list[Sample]]:
    """The task and its samples, read before the model loads; a task that samples frames from its
    videos takes ``frames`` of each. Unreadable data are one line (the ``datasets`` library's own
    error log, which says the same at length, is held back)."""
    disabled = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        cls = registry.task(name)
        takes_frames = frames is not None and "frames" in inspect.signature(cls).parameters
        task: Task = cls(config.data_dir, frames=frames) if takes_frames else cls(config.data_dir)
        task.scoring = config.scoring
        return task, list(task.samples(config.limit))
    except TaskDataError:
        raise
    except Exception as exc:  # noqa: BLE001 -- unreadable files (parquet, arrow, ...): one line, exit 2
        where = f" under --data-dir {config.data_dir}" if config.data_dir else ""
        raise TaskDataError(f"task '{name}': cannot read its data{where}: {_describe(exc)[:300]}") from None
    finally:
        logging.disable(disabled)


class Harness:
    """The passes of one run over one loaded adapter."""

    def __init__(self, config: RunConfig, registry: Registry, adapter: VLMAdapter, *,
                 accuracy: bool = True, random_weights: bool = False) -> None:
        self.config, self.registry, self.adapter = config, registry, adapter
        self.accuracy, self.random_weights = accuracy, random_weights
        self.device = torch.device(config.device)
        self.dtype = adapter.dtype  # what the weights are in: KV bytes and provenance describe what ran
        self.store: SampleStore
        self.processes = Processes()
        text_config = adapter.model.config.get_text_config() if hasattr(adapter.model, "config") else None
        self.max_context: int | None = getattr(text_config, "max_position_embeddings", None)
        self.arch = adapter.info().arch
        self._kept: dict[str, Prompt | str] = {}  # decoded prompts the efficiency pass reuses (per task)
        # per task (by id): the model facts of its first sample and that sample's decoded prompt
        self._reference: dict[int, tuple[ModelInfo, Prompt | str | None]] = {}

    # ------------------------------------------------------------------------------------- keys
    def _key(self, kind: str, task: Task, arm: Arm, sample_id: str | None = None) -> str:
        return record_key(kind=kind, model=self.config.model.location, task=task.name, sample=sample_id,
                          method=arm.spec.name, options=arm.spec.options,
                          budget=arm.budget.label if arm.budget else None, seed=self.config.seed,
                          dtype=self.config.dtype, attn=self.config.attn, version=tokenbench.__version__,
                          max_new_tokens=task.max_new_tokens, protocol=getattr(self.adapter, "protocol", "hf"),
                          scoring=getattr(task, "scoring", "official"),
                          **({"frames": task.frames} if getattr(task, "frames", None) else {}))

    # ------------------------------------------------------------------------------------- task
    def reference_info(self, task: Task, samples: Sequence[Sample]) -> ModelInfo:
        """The model facts the checks before the run use: for a video task those of its first sample
        (its frames; decoded once, then kept for the accuracy pass), else the model's default image
        (nothing is decoded, so a finished run decodes nothing)."""
        if id(task) not in self._reference:
            video = bool(samples) and samples[0].video is not None
            prompt = self._prompt(samples[0], {}) if video else None
            info = self.adapter.info_for(prompt) if isinstance(prompt, Prompt) else self.adapter.info()
            self._reference[id(task)] = (info, prompt)
        return self._reference[id(task)][0]

    def check_plans(self, info: ModelInfo) -> None:
        """Before any sample runs: every count budget fits the visual tokens of ``info`` (a task's
        first sample), and every site a method schedules lies inside this model's layers (raises
        ConfigError)."""
        for budget in self.config.budgets:
            if budget.tokens is not None and budget.tokens > info.n_visual:
                raise ConfigError(f"--budgets {budget.label}: the model's images have {info.n_visual} visual "
                                  f"tokens, so this budget would keep them all; give at most {info.n_visual} "
                                  f"or a percentage")
        for arm in arms(self.config)[1:]:
            try:
                plan = self._compressor(arm).schedule(info.n_visual, arm.budget.target(info.n_visual), info)
            except Infeasible:
                continue  # recorded per arm by run_task
            for site, _ in plan:
                if problem := _site_problem(site.stage, site.layer, info):
                    raise ConfigError(f"method '{arm.spec.name}' at budget {arm.budget.label} schedules a "
                                      f"site at {site.stage}:{site.layer}, {problem}")

    def run_task(self, task: Task, samples: list[Sample], shard: bool = False) -> list[dict[str, Any]]:
        """The task's run records; ``shard``: only this process's share of the accuracy pass."""
        live: list[tuple[Arm, TokenCompressor | None]] = []
        infeasible: dict[str, str] = {}  # by arm label
        info = self.reference_info(task, samples)
        for arm in arms(self.config):
            compressor = self._compressor(arm)
            reason = self._infeasible(compressor, arm, info)
            if reason:
                infeasible[arm.label] = reason
                tqdm.write(f"tokenbench: {arm.label}: infeasible: {reason}", file=sys.stderr)
            else:
                live.append((arm, compressor))
        first = self._reference[id(task)][1]
        self._kept = {samples[0].id: first} if first is not None else {}
        if shard:
            if self.accuracy:
                self.accuracy_pass(task, samples, live, self.processes)
            return []
        per_arm = self.accuracy_pass(task, samples, live) if self.accuracy else {a.label: [] for a, _ in live}
        efficiency = self.efficiency_pass(task, samples, per_arm, live)
        self._kept = {}
        baseline = per_arm.get(arms(self.config)[0].label, [])
        out = []
        for arm in arms(self.config):
            if arm.label in infeasible:
                record = self._infeasible_record(task, arm, infeasible[arm.label])
            else:
                record = self._run_record(task, arm, per_arm[arm.label], baseline, efficiency[arm.label])
            write_run_record(self.config.output, record)
            out.append(record)
        return out

    def _compressor(self, arm: Arm) -> TokenCompressor | None:
        return None if arm.budget is None else guard_signals(arm.spec.build(self.registry))

    def _infeasible(self, compressor: TokenCompressor | None, arm: Arm, info: ModelInfo) -> str | None:
        """The method's own verdict on this budget for the task's first sample (checked again per
        sample by the adapter, whose images may differ in size)."""
        if compressor is None or arm.budget is None:
            return None
        try:
            plan = compressor.schedule(info.n_visual, arm.budget.target(info.n_visual), info)
        except Infeasible as exc:
            return str(exc)
        return self.adapter.unserved_signal_reason(compressor, plan)

    # ----------------------------------------------------------------------------- accuracy pass
    def accuracy_pass(self, task: Task, samples: Sequence[Sample],
                      live: Sequence[tuple[Arm, TokenCompressor | None]],
                      shard: Processes | None = None) -> dict[str, list[dict[str, Any]]]:
        """Every arm on every sample, chunk by chunk (each image is decoded once for all arms);
        samples already in the store are skipped. Returns the records per arm label. ``shard``:
        only that process's chunks (see :mod:`tokenbench.distributed`)."""
        keys = {arm.label: [self._key("sample", task, arm, s.id) for s in samples] for arm, _ in live}
        chunks = list(_chunks(range(len(samples)), self.config.batch_size))
        if shard is not None:  # deal out the batches with work left, as every process loaded the store
            chunks = shard.shard([c for c in chunks if any(ks[i] not in self.store for ks in keys.values()
                                                           for i in c)])
        mine = [i for chunk in chunks for i in chunk]
        done = sum(ks[i] in self.store for ks in keys.values() for i in mine)
        if done:
            tqdm.write(f"tokenbench: {task.name}: {done} of {len(mine) * len(live)} samples already done in "
                       f"{self.store.path.parent}; skipped", file=sys.stderr)
        kept = {s.id for s in samples[:KEPT_PROMPTS]}
        with tqdm(total=len(mine) * len(live), initial=done, desc=f"{task.name} accuracy", unit="sample",
                  file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
            for chunk in chunks:
                prompts: dict[str, Prompt | str] = {}
                for arm, compressor in live:
                    todo = [(samples[i], keys[arm.label][i]) for i in chunk if keys[arm.label][i] not in self.store]
                    size = len(todo) if self.adapter.batchable(compressor) else 1
                    records: list[dict[str, Any]] = []
                    for batch in _chunks(todo, size or 1):
                        records += self._run_batch(task, arm, compressor, batch, prompts)
                    self.store.extend(records)  # one fsync per arm and chunk
                    bar.update(len(todo))
                self._kept |= {i: p for i, p in prompts.items() if i in kept}
        return {label: [self.store.get(k) for k in ks] for label, ks in keys.items()}  # type: ignore[misc]

    def _prompt(self, sample: Sample, cache: dict[str, Prompt | str]) -> Prompt | str:
        """The sample's prompt with its decoded image (or video frames), or the decoding error (once
        per chunk, and once per run for the kept samples)."""
        if sample.id not in cache:
            if sample.id in self._kept:
                cache[sample.id] = self._kept[sample.id]
                return cache[sample.id]
            try:
                cache[sample.id] = Prompt(sample.load_image(), sample.prompt, key=sample.id,
                                          video=sample.load_video())
            except Exception as exc:  # noqa: BLE001 -- a broken image or video fails its sample only
                cache[sample.id] = f"{'video' if sample.video is not None else 'image'}: {_describe(exc)}"
        return cache[sample.id]

    def _run_batch(self, task: Task, arm: Arm, compressor: TokenCompressor | None,
                   chunk: Sequence[tuple[Sample, str]], prompts: dict[str, Prompt | str]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        ready: list[tuple[Sample, str, Prompt]] = []
        for sample, key in chunk:
            prompt = self._prompt(sample, prompts)
            if isinstance(prompt, str):
                records.append(self._error_record(task, arm, sample, key, prompt))
            else:
                ready.append((sample, key, prompt))
        if not ready:
            return records
        try:
            generations = self._generate([p for _, _, p in ready], compressor, arm, task)
        except Exception as exc:  # noqa: BLE001 -- recorded in the sample's record; the run goes on
            if len(ready) == 1:
                sample, key, _ = ready[0]
                return records + [self._error_record(task, arm, sample, key, _describe(exc),
                                                     retry=is_transient(exc), at=_raised_at(exc, compressor))]
            # isolate the failing sample(s): retry one by one
            for sample, key, _ in ready:
                records += self._run_batch(task, arm, compressor, [(sample, key)], prompts)
            return records
        for (sample, key, _), generation in zip(ready, generations):
            records.append(self._sample_record(task, arm, sample, key, generation))
        return records

    def _generate(self, prompts: Sequence[Prompt], compressor: TokenCompressor | None, arm: Arm,
                  task: Task) -> list[Generation]:
        with torch.inference_mode():
            return self.adapter.generate(prompts, compressor=compressor, budget=arm.budget,
                                         max_new_tokens=task.max_new_tokens, seed=self.config.seed)

    def _base_record(self, task: Task, arm: Arm, sample: Sample, key: str) -> dict[str, Any]:
        return {"key": key, "kind": "sample", "model": self.config.model.name, "task": task.name,
                "method": arm.spec.name, "options": arm.spec.options,
                "budget": arm.budget.label if arm.budget else None, "sample_id": sample.id,
                "meta": sample.meta}

    def _error_record(self, task: Task, arm: Arm, sample: Sample, key: str, error: str,
                      retry: bool = False, at: str | None = None) -> dict[str, Any]:
        """A failed sample (``at``: the file and line that raised). ``retry``: the failure was the
        machine's, not the sample's (see :func:`is_transient`); the record counts as an error in this
        run, and a resumed run computes the sample again."""
        record = self._base_record(task, arm, sample, key) | {"prediction": None, "scores": None, "error": error,
                                                              "error_at": at}
        return record | {"retry": True} if retry else record

    def _sample_record(self, task: Task, arm: Arm, sample: Sample, key: str,
                       generation: Generation) -> dict[str, Any]:
        trace = generation.trace
        if self.max_context is not None and trace.prompt_tokens > self.max_context:
            return self._error_record(task, arm, sample, key,
                                      f"context: the prompt has {trace.prompt_tokens} tokens, more than "
                                      f"the model's context of {self.max_context}")
        try:
            scores = task.score(sample, generation.text)
        except Exception as exc:  # noqa: BLE001 -- recorded in the sample's record; the run goes on
            return self._error_record(task, arm, sample, key, f"score: {_describe(exc)}")
        return self._base_record(task, arm, sample, key) | {
            "prediction": generation.text, "scores": scores, "error": None, "trace": trace.to_dict(),
            "flops": flops_from_trace(self.arch, trace),
            "kv_cache_bytes": kv_cache_bytes(self.arch, trace, self.dtype),
            "timings_ms": generation.timings_ms}

    # --------------------------------------------------------------------------- efficiency pass
    def efficiency_pass(self, task: Task, samples: Sequence[Sample], per_arm: dict[str, list[dict[str, Any]]],
                        live: Sequence[tuple[Arm, TokenCompressor | None]]) -> dict[str, dict[str, Any]]:
        """The FlashAttention probe of every live arm and, with --efficiency, the arms timed
        together, interleaved; results by arm label.

        Results are stored (one batch), so a rerun does not time an arm again. Arms added later are
        timed with the baseline, whose stored result is then replaced by this pass's, so every
        speed-up pairs runs of one pass. A pass interrupted by a kill stores nothing: the rerun times
        all its arms again, together."""
        results: dict[str, dict[str, Any]] = {}
        todo: list[tuple[Arm, TokenCompressor | None]] = []
        for arm, compressor in live:
            keys = (self._key("efficiency" if self.config.efficiency else "flash", task, arm),
                    self._key("efficiency", task, arm))  # a timed pass also serves a --no-efficiency run
            stored = next((self.store.get(k) for k in keys if k in self.store), None)
            if stored is not None:
                results[arm.label] = stored
            else:
                todo.append((arm, compressor))
        if not todo:
            return results
        if self.config.efficiency and todo[0][0].budget is not None:  # the baseline (first) as reference
            todo.insert(0, live[0])
        fresh: dict[str, dict[str, Any]] = {}
        for arm, compressor in tqdm(todo, desc=f"{task.name} flash probe", unit="arm", file=sys.stderr,
                                    leave=False, dynamic_ncols=True):
            fresh[arm.label] = {"key": self._key("efficiency" if self.config.efficiency else "flash", task, arm),
                                "kind": "efficiency", "task": task.name, "method": arm.spec.name,
                                "budget": arm.budget.label if arm.budget else None, "flash_attention": None,
                                "latency_ms": None, "peak_memory_bytes": None}
            first = self._usable(samples, per_arm, [arm.label], 1)
            if first:
                fresh[arm.label]["flash_attention"] = self._flash_attention(first[0], compressor, arm, task)
        if self.config.efficiency:
            shared = self._usable(samples, per_arm, [arm.label for arm, _ in todo], EFFICIENCY_SAMPLES)
            if shared:
                for label, timing in self._time(shared, todo, task).items():
                    fresh[label] |= timing
        stamp = time.time_ns()  # replaces a stored record of the key in whichever samples*.jsonl it is
        self.store.extend(record | {"stored_at": stamp} for record in fresh.values())
        return results | fresh

    def _usable(self, samples: Sequence[Sample], per_arm: dict[str, list[dict[str, Any]]],
                labels: Sequence[str], count: int) -> list[Prompt]:
        """The prompts of the first ``count`` samples that succeeded in the accuracy pass of every
        arm in ``labels`` (without an accuracy pass: whose image decodes)."""
        out: list[Prompt] = []
        for index, sample in enumerate(samples):
            if len(out) == count:
                break
            if self.accuracy and any(per_arm[label][index].get("error") for label in labels):
                continue
            prompt = self._prompt(sample, self._kept)
            if not isinstance(prompt, str):
                out.append(prompt)
        return out

    def _flash_attention(self, prompt: Prompt, compressor: TokenCompressor | None, arm: Arm,
                         task: Task) -> dict[str, Any]:
        result = flash_sdpa_probe(lambda: self._generate([prompt], compressor, arm, task), self.arch,
                                  self.device, self.dtype)
        result["declared"] = compressor.flash_attention if compressor is not None else "native"
        if flash_attn_available() and self.device.type == "cuda" and not self.random_weights:
            result["flash_attention_2"] = self._flash_attention_2(prompt, compressor, arm, task)
        return result

    def _flash_attention_2(self, prompt: Prompt, compressor: TokenCompressor | None, arm: Arm,
                           task: Task) -> dict[str, Any]:
        """One sample with the model loaded under ``attn_implementation="flash_attention_2"``."""
        try:
            if not hasattr(self, "_fa2_adapter"):
                cls = type(self.adapter)
                self._fa2_adapter = cls.load(self.config.model.location, dtype=self.dtype,
                                             attn="flash_attention_2", device=self.device)
                self._fa2_adapter.protocol = self.adapter.protocol  # the run's prompts and preprocessing
            with torch.inference_mode():
                generation = self._fa2_adapter.generate([prompt], compressor=compressor, budget=arm.budget,
                                                        max_new_tokens=task.max_new_tokens,
                                                        seed=self.config.seed)[0]
        except Exception as exc:  # noqa: BLE001 -- recorded in the sample's record; the run goes on
            return {"class": "fails", "error": _describe(exc)}
        from tokenbench.measure import classify_flash_attention

        return {"class": classify_flash_attention(generation.trace),
                "probe_rows": generation.trace.probe_rows}

    def _time(self, prompts: Sequence[Prompt], timed: Sequence[tuple[Arm, TokenCompressor | None]],
              task: Task) -> dict[str, dict[str, Any]]:
        """Batch-1 timings of every arm in ``timed`` (the baseline first), interleaved run by run:
        a warm-up each, then ``EFFICIENCY_REPEATS`` rounds over ``prompts``, every arm in turn on each
        prompt. An arm that raises is left out from then on, with its error."""
        failed: dict[str, str] = {}
        runs: dict[str, list[dict[str, float]]] = {arm.label: [] for arm, _ in timed}
        traces: dict[str, list[TokenTrace]] = {arm.label: [] for arm, _ in timed}

        def attempt(arm: Arm, compressor: TokenCompressor | None, prompt: Prompt) -> tuple[Generation, float] | None:
            if arm.label in failed:
                return None
            timer = Timer(self.device)
            try:
                with timer.measure():
                    generation = self._generate([prompt], compressor, arm, task)[0]
            except Exception as exc:  # noqa: BLE001 -- recorded; the accuracy results stand
                failed[arm.label] = _describe(exc)
                return None
            return generation, timer.elapsed_ms

        for arm, compressor in timed:
            attempt(arm, compressor, prompts[0])  # warm-up
        load_before = _load_average()
        with tqdm(total=EFFICIENCY_REPEATS * len(prompts) * len(timed), desc=f"{task.name} efficiency",
                  unit="run", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
            for repeat in range(EFFICIENCY_REPEATS):
                for index, prompt in enumerate(prompts):
                    for arm, compressor in timed:
                        if (done := attempt(arm, compressor, prompt)) is not None:
                            generation, elapsed = done
                            runs[arm.label].append(dict(generation.timings_ms) | {
                                "end_to_end": elapsed, "sample": index, "repeat": repeat,
                                "generated_tokens": generation.trace.generated_tokens})
                            traces[arm.label].append(generation.trace)
                        bar.update()
        load = [v for v in (load_before, _load_average()) if v is not None]
        conditions = {"device_type": self.device.type, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "load_average": max(load) if load else None, "interleaved_arms": len(timed)}
        reference = runs[timed[0][0].label] if timed[0][0].label not in failed else []
        out: dict[str, dict[str, Any]] = {}
        for arm, compressor in timed:
            if arm.label in failed:
                out[arm.label] = {"error": failed[arm.label], "timing_conditions": conditions}
                continue
            memory = PeakMemory(self.device)  # apart from the timings: the CPU profiler slows the run
            try:
                with memory.measure():
                    self._generate(prompts[:1], compressor, arm, task)
            except Exception as exc:  # noqa: BLE001 -- recorded; the accuracy results stand
                out[arm.label] = {"error": _describe(exc), "timing_conditions": conditions}
                continue
            first = traces[arm.label][:len(prompts)]
            arm_runs = runs[arm.label]
            out[arm.label] = {
                "latency_ms": summarise_latency(arm_runs, [r["generated_tokens"] for r in arm_runs]),
                "timed_runs": arm_runs, "timing_conditions": conditions,
                "speedup": paired_speedup(reference, arm_runs) if arm.budget is not None else None,
                "flops": mean_flops([flops_from_trace(self.arch, t) for t in first]),
                "realised_tokens": sum(t.realised_tokens for t in first) / len(first),
                "n_visual": sum(t.n_visual for t in first) / len(first),
                "kv_cache_bytes": sum(kv_cache_bytes(self.arch, t, self.dtype) for t in first) / len(first),
                "peak_memory_bytes": memory.peak_bytes,
                "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "profiler_tensor_peak"}
        return out

    # ------------------------------------------------------------------------------ run records
    def _common(self, task: Task, arm: Arm, records: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "model": self.config.model.name, "task": task.name,
                "method": arm.spec.name, "budget": arm.budget.label if arm.budget else None,
                "stages": self._stages(arm, records),
                "primary_metric": task.primary_metric, "metric_scale": task.metric_scale,
                "provenance": provenance(device=self.device, dtype=str(self.dtype).removeprefix("torch."),
                                         attn=self.config.attn,
                                         seed=self.config.seed, options=arm.spec.options,
                                         model_location=self.config.model.location)
                | {"processes": self.processes.world_size, **device_placement(self.adapter.model)}
                | {"limit": self.config.limit, "max_new_tokens": task.max_new_tokens,
                   "batch_size": self.config.batch_size, "random_weights": self.random_weights,
                   "data_dir": str(self.config.data_dir) if self.config.data_dir else None,
                   "accuracy": self.accuracy, "protocol": getattr(self.adapter, "protocol", "hf")}
                | getattr(task, "provenance", dict)()}

    def _stages(self, arm: Arm, records: Sequence[dict[str, Any]]) -> list[str]:
        """The stages the method actually acted at (from the traces' plans), else those it declares."""
        if arm.budget is None:
            return []
        used = [stage for r in records if r.get("trace") for stage, _, _ in r["trace"]["plan"]]
        return list(dict.fromkeys(used)) or [str(s) for s in self.registry.compressor(arm.spec.name).stages]

    def _infeasible_record(self, task: Task, arm: Arm, reason: str) -> dict[str, Any]:
        return self._common(task, arm) | {
            "score": None, "metrics": {}, "relative": None, "relative_ci": None, "agreement": None,
            "realised_tokens": None, "realised_ratio": None, "flops": None, "latency_ms": None,
            "peak_memory_bytes": None, "flash_attention": None, "kv_cache_bytes": None, "speedup": None,
            "n_samples": 0, "n_errors": 0, "infeasible": reason, "errors": {}, "first_error": None,
            "budget_tokens": None, "over_budget": None, "n_over_budget": None}

    def _run_record(self, task: Task, arm: Arm, records: Sequence[dict[str, Any]],
                    baseline: Sequence[dict[str, Any]], efficiency: dict[str, Any]) -> dict[str, Any]:
        ok = [r for r in records if not r.get("error")]
        metrics = task.aggregate(ok) if ok else {}
        score = metrics.get(task.primary_metric)
        stats = compare(records, baseline, task.aggregate, task.primary_metric, seed=self.config.seed,
                        unit=getattr(task, "bootstrap_unit", ()),
                        per_sample_score=getattr(task, "per_sample_score", None))
        traces = [r["trace"] for r in ok]
        realised = sum(t["realised_tokens"] for t in traces) / len(traces) if traces else \
            efficiency.get("realised_tokens")
        n_visual = sum(t["n_visual"] for t in traces) / len(traces) if traces else efficiency.get("n_visual")
        errors: dict[str, int] = {}
        for r in records:
            if r.get("error"):
                kind = r["error"].split(":", 1)[0]
                errors[kind] = errors.get(kind, 0) + 1
        first_error = next(({"sample_id": r["sample_id"], "error": r["error"], "at": r.get("error_at")}
                            for r in records if r.get("error")), None)
        return self._common(task, arm, ok) | self._budget_use(arm, traces, realised, n_visual) | {
            "score": score, "metrics": metrics, **stats,
            "realised_tokens": realised, "realised_ratio": realised / n_visual if realised and n_visual else None,
            "n_visual": n_visual, "flops": mean_flops([r["flops"] for r in ok]) or efficiency.get("flops"),
            "kv_cache_bytes": (sum(r["kv_cache_bytes"] for r in ok) / len(ok)) if ok else
            efficiency.get("kv_cache_bytes"),
            "latency_ms": efficiency.get("latency_ms"), "peak_memory_bytes": efficiency.get("peak_memory_bytes"),
            "peak_memory_kind": efficiency.get("peak_memory_kind"),
            "flash_attention": efficiency.get("flash_attention"),
            "timing_conditions": efficiency.get("timing_conditions"), "speedup": efficiency.get("speedup"),
            "timed_runs": efficiency.get("timed_runs"),
            "n_samples": len(records), "n_errors": len(records) - len(ok), "errors": errors,
            "first_error": first_error, "infeasible": None} | decode_retention(traces)

    @staticmethod
    def _budget_use(arm: Arm, traces: Sequence[dict[str, Any]], realised: float | None,
                    n_visual: float | None) -> dict[str, Any]:
        """The budget's token target and whether the method went over it (by more than
        OVER_BUDGET_TOLERANCE), per sample and on average."""
        if arm.budget is None or realised is None or not n_visual:
            return {"budget_tokens": None, "over_budget": None, "n_over_budget": None}
        targets = [arm.budget.target(t["n_visual"]) for t in traces] or [arm.budget.target(round(n_visual))]
        over = sum(t["realised_tokens"] > (1 + OVER_BUDGET_TOLERANCE) * target for t, target in zip(traces, targets))
        target = sum(targets) / len(targets)
        return {"budget_tokens": target, "over_budget": realised > (1 + OVER_BUDGET_TOLERANCE) * target,
                "n_over_budget": over}


def decode_retention(traces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Decode-time KV retention of a method with a ``decode`` site (spec wave 2 E10), apart from the
    prefill budget: the mean over samples of each sample's mean share of the cached visual KV entries
    that the layers from the site on attended per decode step, and of that count of entries. Empty
    when no sample had a decode step under a decode site."""
    shares = [t["decode_kv_retention"] for t in traces if t.get("decode_kv_retention") is not None]
    if not shares:
        return {}
    counts = [sum(t["decode_visual"]) / len(t["decode_visual"]) for t in traces if t.get("decode_visual")]
    return {"decode_kv_retention": sum(shares) / len(shares), "decode_visual_tokens": sum(counts) / len(counts),
            "decode_samples": len(shares)}


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


_TRANSIENT_MESSAGES = ("out of memory", "CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")


def is_transient(exc: BaseException) -> bool:
    """Out of memory or an accelerator fault: errors of the machine at that moment rather than of
    the sample, worth computing again when the run is resumed."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TRANSIENT_MESSAGES)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _raised_at(exc: BaseException, compressor: TokenCompressor | None) -> str | None:
    """``file:line`` where ``exc`` was raised: the innermost frame in the method's own module (a
    plugin's file) when the traceback passes through it, else the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    module = sys.modules.get(type(compressor).__module__) if compressor is not None else None
    own = getattr(module, "__file__", None)
    mine = [f for f in frames if Path(f.filename).resolve() == Path(own).resolve()] if own else []
    frame = (mine or frames)[-1]
    return f"{frame.filename}:{frame.lineno}"


def _site_problem(stage: Stage, layer: int, info: ModelInfo) -> str | None:
    """Why a site cannot exist on this model, or None."""
    depth = {Stage.LLM: info.llm_layers, Stage.VISION: info.vision_layers}.get(stage)
    if depth is not None and not 0 <= layer < depth:
        return f"outside this model's {depth} {stage} layers (0..{depth - 1})"
    if stage is Stage.DECODE and not 1 <= layer < info.llm_layers:
        return f"outside 1..{info.llm_layers - 1} (a decode site reads the attention of the layer before it)"
    return None


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the CPU was while timing."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
