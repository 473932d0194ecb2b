"""A validated ``tokenbench run`` request: everything that determines what runs and where results go.

The CLI builds a :class:`RunConfig` only after every name, budget and option has been checked, so
the harness never starts a model load on input that would fail later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tokenbench.budget import Budget
from tokenbench.compressor import TokenCompressor
from tokenbench.models import ModelRef
from tokenbench.plugins import Registry


class ConfigError(ValueError):
    """Bad user input; the message is one line that says what to fix."""


@dataclass(frozen=True)
class MethodSpec:
    """A method name with its validated options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, registry: Registry) -> TokenCompressor:
        return registry.compressor(self.name)(**self.options)


@dataclass
class RunConfig:
    model: ModelRef
    methods: list[MethodSpec]
    budgets: list[Budget]
    tasks: list[str]
    limit: int | None = None
    seed: int = 0
    output: Path = Path("tokenbench-results")
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "cpu"
    batch_size: int = 8
    data_dir: Path | None = None
    efficiency: bool = True
    scoring: str = "official"  # each benchmark's official rule, or "lenient" (Task.scoring)
    protocol: str | None = None  # "llava" / "hf"; None: the model's default (runner.resolve_protocol)
    device_map: str | None = None  # --device-map: spread the model over devices (adapters.placement)
    max_memory: dict[int | str, str] | None = None  # --max-memory, with --device-map
    threads: int | None = None  # torch.set_num_threads before the run; None: torch's default
    frames: int | None = None  # --frames: per video of a video benchmark; None: the model's (runner.video_frames)


def parse_method_list(text: str, registry: Registry) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--methods is empty; give e.g. --methods apet,fastv")
    seen: set[str] = set()
    for name in names:
        registry.compressor(name)  # raises UnknownName with a suggestion
        if name in seen:
            raise ConfigError(f"method '{name}' is given twice in --methods")
        seen.add(name)
    return names


def parse_option_assignments(assignments: tuple[str, ...], methods: list[str],
                             registry: Registry) -> dict[str, dict[str, Any]]:
    """Turn ``-o METHOD.KEY=VALUE`` strings into validated per-method option dicts."""
    raw: dict[str, dict[str, str]] = {m: {} for m in methods}
    for text in assignments:
        target, sep, value = text.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key:
            raise ConfigError(f"-o '{text}' must look like METHOD.KEY=VALUE, e.g. -o apet.basis=10")
        registry.compressor(method)
        if method not in raw:
            raise ConfigError(f"-o '{text}' sets an option of '{method}', which is not in --methods")
        raw[method][key] = value
    return {method: coerce_options(registry.compressor(method), method, values)
            for method, values in raw.items()}


def coerce_options(cls: type[TokenCompressor], method: str, raw: dict[str, str]) -> dict[str, Any]:
    """Validate string option values against ``cls.Options``; a field that rejects the string is
    retried with the value read as JSON (for lists and the like). Returns the typed values."""
    known = list(cls.Options.model_fields)
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown option '{key}' for method '{method}'; options: "
                              f"{', '.join(known) or 'none'}")
    values: dict[str, Any] = dict(raw)
    for attempt in range(2):
        try:
            return cls.Options(**values).model_dump(exclude_unset=True)
        except ValidationError as exc:
            failing = {str(err["loc"][0]) for err in exc.errors() if err.get("loc")}
            if attempt == 0 and any(_parse_json(raw[k]) is not None for k in failing if k in raw):
                values.update({k: _parse_json(raw[k]) for k in failing
                               if k in raw and _parse_json(raw[k]) is not None})
                continue
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err.get("loc", ())) or "?"
            raise ConfigError(f"-o {method}.{key}={raw.get(key, '')}: {err['msg']}") from None
    raise AssertionError("unreachable")


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
