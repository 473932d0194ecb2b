"""Result records: schema version, provenance, the per-sample JSONL store and the run JSON files.

An output directory holds

- ``manifest.json``: the schema version, and the arguments of every run that wrote there. Runs with
  other methods, budgets, tasks or limits share the directory: each reuses every finished sample
  (the baseline's included) and adds its own. Only another schema version is refused;
- ``samples.jsonl``: one line per finished sample (accuracy pass) or per finished efficiency
  measurement, each with a ``key`` hashed from everything that determines its output; a rerun skips
  every key already there, so nothing finished is recomputed;
- ``runs/<model>__<task>__<method>__<budget>__<settings>.json``: one public run record each, where
  ``<settings>`` hashes everything else that changes the record (options, limit, seed, dtype,
  attention, data, ...), so a run with other settings never overwrites it.

Public, stable fields of a run record (``SCHEMA_VERSION`` changes when one of them changes meaning):

- ``schema_version``; ``model`` (the name given to ``--model``); ``task``; ``method``; ``budget``
  (the label given, ``"64"`` or ``"11.1%"``; null for the uncompressed baseline ``none``);
- ``score``: the task's primary metric; ``metrics``: everything ``Task.aggregate`` returned, both over
  the samples without errors;
- ``relative``: score as a percentage of the baseline's on the samples where neither run failed,
  with ``relative_ci`` (paired bootstrap, 95%, seeded) and ``agreement`` (share of identical answers);
- ``realised_tokens``: layer-averaged visual tokens the decoder processed (mean over samples, from
  the trace); ``realised_ratio``: the same over the image's visual-token count;
- ``flops``: mean per sample, ``formula: "full_flops"`` in FLOP with ``prefill`` (vision + projector +
  LLM prefill + LM head on the last token + probe rows) and ``decode``, the parts, and the FastV
  paper's count under ``fastv_macs`` (MAC, LLM only) — see :mod:`tokenbench.measure`;
- ``latency_ms``: medians of batch-1 runs (``vision``, ``prefill``, ``ttft``, ``decode_per_token``,
  ``end_to_end``), their spread (``ttft_iqr``, ``end_to_end_iqr``: first and third quartile) and the
  number of timed runs ``repeats``; ``timing_conditions`` (device type, CPUs, threads, the 1-minute
  load average while timing, ``interleaved_arms``); ``peak_memory_bytes`` (with ``peak_memory_kind``);
- ``speedup``: ``ttft`` and ``end_to_end``, medians of the paired ratios baseline time ÷ arm time
  over runs of the same sample and round of the interleaved efficiency pass, with ``ttft_range`` /
  ``end_to_end_range`` and ``pairs`` (null for the baseline; see :mod:`tokenbench.speedup`);
  ``timed_runs``: every timed run in ms with its ``sample`` and ``repeat``;
- ``flash_attention``: ``class`` measured under the forced flash SDPA kernel (native / probe / eager
  / fails) with ``declared``, ``probe_rows``, ``probe_ms``, and ``flash_attention_2`` where run;
- ``n_samples``, ``n_errors`` (with ``errors`` by kind, and ``first_error``: the first failing
  sample's error and where it was raised), ``infeasible`` (the method's reason, or null);
- ``budget_tokens``: the token target the budget asks for (mean over samples); ``over_budget``: the
  realised tokens exceed it by more than :data:`OVER_BUDGET_TOLERANCE`; ``n_over_budget``: how
  many samples did;
- ``decode_kv_retention`` (only for methods with a ``decode`` site, spec wave 2 E10, apart from the
  prefill budget): the mean over samples of the share of cached visual KV entries that the decoder
  layers from the site on attended per decode step; ``decode_visual_tokens``: that number of
  entries; ``decode_samples``: the samples with a decode step;
- ``provenance``: tokenbench version and git sha, torch / transformers / python versions, device
  name and type, hardware fingerprint, threads, dtype, attention backend, seed, method options,
  model location, limit, max_new_tokens, batch size, random weights.

Extra fields (``stages``, ``n_visual``, ``kv_cache_bytes``, ``n_paired``, ``primary_metric``, ...) are
informative and may change.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

import tokenbench

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None
from tokenbench.config import ConfigError

SCHEMA_VERSION = 1
OVER_BUDGET_TOLERANCE = 0.02  # realised tokens beyond budget × 1.02 are over budget
PUBLIC_FIELDS = ("schema_version", "model", "task", "method", "budget", "score", "metrics", "relative",
                 "realised_tokens", "realised_ratio", "flops", "latency_ms", "speedup", "peak_memory_bytes",
                 "flash_attention", "n_samples", "n_errors", "provenance")


BASELINE = "none"  # the uncompressed baseline method, run in every run


class OutputDirError(ConfigError):
    """The output directory belongs to another run; the message says how to proceed."""


def record_key(**fields: Any) -> str:
    """A stable hash of everything that determines one record's output."""
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------ provenance

def git_sha() -> str | None:
    """The commit of the tokenbench checkout (editable installs), else None."""
    root = Path(tokenbench.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_fingerprint(device: torch.device) -> str:
    """What latency depends on: device model, thread count (CPU) or CUDA version (GPU), torch."""
    parts = [device.type, device_name(device), torch.__version__]
    if device.type == "cuda":
        parts.append(str(torch.version.cuda))
    else:
        parts.append(f"threads={torch.get_num_threads()}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def provenance(*, device: torch.device, dtype: str, attn: str, seed: int, options: dict[str, Any],
               model_location: str) -> dict[str, Any]:
    import transformers

    return {"tokenbench": tokenbench.__version__, "git_sha": git_sha(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device_name(device), "device_type": device.type,
            "hardware": hardware_fingerprint(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "dtype": dtype, "attention_backend": attn, "seed": seed, "options": options,
            "model_location": model_location}


# ---------------------------------------------------------------------------------------- JSONL store

class SampleStore:
    """Append-only JSONL of finished records, keyed by ``record["key"]``.

    Each written batch (:meth:`extend`: an arm's chunk of at most ``--batch-size`` samples) is
    flushed and fsync'ed once, so a kill loses at most the batch in flight. On opening, a torn last line (killed mid-write) is cut off with a warning on stderr and
    its sample is recomputed; malformed lines elsewhere are skipped the same way. Records marked
    ``retry`` (a sample that failed for out of memory or an accelerator fault) are not loaded, so
    those samples are computed again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.dropped = 0
        self.retried = 0
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed by close()
        try:
            if fcntl is not None:  # POSIX: one writer per output directory
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.close()
            raise OutputDirError(f"another tokenbench run is writing to '{path.parent}'; wait for it to "
                                 f"finish or use another --output") from None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            self.dropped += 1
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
        retry: set[str] = set()
        for line in data[:complete].decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record["key"]
            except (json.JSONDecodeError, KeyError, TypeError):
                self.dropped += 1
                continue
            if record.get("retry"):
                retry.add(key)
            else:
                self.records[key] = record
        self.retried = len(retry - set(self.records))
        if self.dropped:
            print(f"tokenbench: warning: {self.path}: {self.dropped} incomplete record(s) dropped; "
                  f"those samples are recomputed", file=sys.stderr)
        if self.retried:
            print(f"tokenbench: {self.path}: {self.retried} sample(s) that failed for out of memory or an "
                  f"accelerator fault are computed again", file=sys.stderr)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def append(self, record: dict[str, Any]) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Write ``records`` (one batch) and make them durable with one fsync."""
        records = list(records)
        if not records:
            return
        self._handle.write("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        for record in records:
            self.records[record["key"]] = record

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SampleStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------ output directory

def claim_output_dir(directory: Path, arguments: dict[str, Any]) -> None:
    """Create ``directory`` for a run with ``arguments``, or join it when it already holds results of
    this schema version (whatever their arguments: every record is keyed by what determines it);
    raise :class:`OutputDirError` for another schema version or a directory that is not ours."""
    manifest_path = directory / "manifest.json"
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"--output '{directory}' is a file; give a directory")
    runs: list[dict[str, Any]] = []
    if manifest_path.exists():
        try:
            existing = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            existing = {}
        if existing.get("schema_version") != SCHEMA_VERSION:
            raise OutputDirError(f"--output '{directory}' holds results of schema version "
                                 f"{existing.get('schema_version')}, this tokenbench writes {SCHEMA_VERSION}; "
                                 f"give a new folder (--output {directory}-v{SCHEMA_VERSION}) or remove the "
                                 f"old one (rm -r '{directory}')")
        runs = existing.get("runs") or ([existing["arguments"]] if existing.get("arguments") else [])
    elif directory.is_dir() and any(directory.iterdir()):
        raise OutputDirError(f"--output '{directory}' is not empty and is not a tokenbench results "
                             f"directory; use another --output or delete '{directory}'")
    if arguments not in runs:
        runs.append(arguments)
    manifest = {"schema_version": SCHEMA_VERSION, "runs": runs}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.replace(manifest_path)
    except OSError as exc:
        raise OutputDirError(f"--output '{directory}' cannot be created ({exc.strerror}); give a "
                             f"writable directory") from None


# -------------------------------------------------------------------------------------- run records

def run_file_name(model: str, task: str, method: str, budget: str | None, settings: str | None = None) -> str:
    parts = [model, task, method, budget if budget is not None else "full"] + ([settings] if settings else [])
    return "__".join(re.sub(r"[^A-Za-z0-9.+-]", "_", p.replace("%", "pct")) for p in parts) + ".json"


# what, besides model, task, method and budget, changes a run record's numbers
SETTINGS = ("model_location", "options", "limit", "seed", "dtype", "attention_backend", "max_new_tokens",
            "random_weights", "data_dir", "accuracy", "protocol", "scoring")


def settings_key(record: dict[str, Any]) -> str:
    """A short hash of the record's :data:`SETTINGS` (from its provenance): records of one model,
    task, method and budget with equal keys are the same computation."""
    provenance = record.get("provenance") or {}
    frames = {"frames": provenance["frames"]} if provenance.get("frames") else {}  # video benchmarks only
    return record_key(**{name: provenance.get(name) for name in SETTINGS}, **frames)[:10]


def write_run_record(directory: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` under ``directory/runs``, named by model, task, method, budget and settings."""
    path = directory / "runs" / run_file_name(record["model"], record["task"], record["method"],
                                              record["budget"], settings_key(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def is_run_record(data: Any) -> bool:
    return isinstance(data, dict) and all(k in data for k in ("schema_version", "model", "task", "method"))


def load_run_records(paths: Iterable[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every run record under ``paths`` (files or directories, searched recursively)."""
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        for path in files:
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if is_run_record(data):
                yield path, data
