"""Plugin discovery and the registry of compressors, adapters and tasks.

Plugins come from the entry-point group ``tokenbench`` (first-party methods are entry points of
tokenbench's own distribution, so they load exactly like a third party's) and from loose ``*.py``
files in ``--plugins-dir`` / ``TOKENBENCH_PLUGINS_DIR``. A plugin that fails to import, misspells a
hook name, raises in a hook or registers something invalid is reported by name with the reason and
skipped; ``TOKENBENCH_STRICT_PLUGINS=1`` makes any such problem fatal.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from tokenbench import hookspecs
from tokenbench.compressor import SIGNALS, Stage, TokenCompressor

GROUP = hookspecs.PROJECT
HOOKS = {"register_compressors": "compressor", "register_adapters": "adapter", "register_tasks": "task"}
KIND_WORDS = {"compressor": "method", "adapter": "adapter", "task": "task"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]*$")
LMMS_PREFIX = "lmms:"  # tasks named lmms:<task> come from lmms-eval (tokenbench.integrations)


class PluginError(Exception):
    """A plugin problem (fatal only under ``TOKENBENCH_STRICT_PLUGINS=1``)."""


class UnknownName(LookupError):
    """A CLI name that no plugin registered; the message suggests the closest ones."""

    def __init__(self, kind: str, name: str, available: list[str]) -> None:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ";"
        listing = ", ".join(sorted(available)) or "none"
        super().__init__(f"unknown {KIND_WORDS.get(kind, kind)} '{name}'{hint} available: {listing}")


@dataclass
class PluginRecord:
    """One plugin as discovered: where it came from and what it registered (or why it was skipped)."""

    name: str
    origin: str  # "entry point" | "plugins dir"
    location: str  # module path or file path
    distribution: str | None = None
    version: str | None = None
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in HOOKS.values()})
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.distribution:
            return f"{self.name} ({self.distribution} {self.version})"
        return f"{self.name} ({self.location})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "origin": self.origin, "location": self.location,
                "distribution": self.distribution, "version": self.version,
                "registered": {f"{k}s": v for k, v in self.registered.items()},
                "problems": self.problems}


@dataclass
class Registry:
    """Everything the plugins registered, each entry attributed to its plugin."""

    plugin_manager: pluggy.PluginManager
    plugins: list[PluginRecord] = field(default_factory=list)
    compressors: dict[str, type] = field(default_factory=dict)
    adapters: dict[str, type] = field(default_factory=dict)
    tasks: dict[str, type] = field(default_factory=dict)
    owner: dict[tuple[str, str], PluginRecord] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        return [f"plugin {p.label}: {msg}" for p in self.plugins for msg in p.problems]

    def table(self, kind: str) -> dict[str, type]:
        return {"compressor": self.compressors, "adapter": self.adapters, "task": self.tasks}[kind]

    def get(self, kind: str, name: str) -> type:
        table = self.table(kind)
        if name not in table:
            raise UnknownName(kind, name, list(table))
        return table[name]

    def compressor(self, name: str) -> type[TokenCompressor]:
        return self.get("compressor", name)

    def task(self, name: str) -> type:
        if name.startswith(LMMS_PREFIX) and name not in self.tasks:
            self._add_lmms_task(name)
        return self.get("task", name)

    def _add_lmms_task(self, name: str) -> None:
        """``lmms:<task>``: an lmms-eval task, built on first use (lmms-eval is imported only then)."""
        from tokenbench.integrations import lmms_eval_version
        from tokenbench.integrations.lmms_tasks import task_class

        self.tasks[name] = task_class(name[len(LMMS_PREFIX):])
        self.owner[("task", name)] = PluginRecord("lmms-eval", "lmms-eval", "lmms_eval.tasks", "lmms-eval",
                                                  lmms_eval_version())

    def adapter_for(self, model_type: str) -> type:
        for cls in self.adapters.values():
            if model_type in cls.model_types:
                return cls
        known = sorted(t for cls in self.adapters.values() for t in cls.model_types)
        raise UnknownName("adapter", model_type, known)


def get_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with tokenbench's hook specifications (no plugins yet)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def _strict() -> bool:
    return os.environ.get("TOKENBENCH_STRICT_PLUGINS", "").strip() not in ("", "0", "false", "no")


def load_registry(plugins_dir: str | Path | None = None, *, strict: bool | None = None,
                  entry_points: bool = True) -> Registry:
    """Discover plugins (entry points, then ``plugins_dir`` or ``TOKENBENCH_PLUGINS_DIR``) and
    collect what they register."""
    strict = _strict() if strict is None else strict
    registry = Registry(get_plugin_manager())
    sources: list[tuple[PluginRecord, Callable[[], Any]]] = []
    if entry_points:
        for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: (e.dist.name != "tokenbench"
                                                                            if e.dist else True, e.name)):
            dist = ep.dist
            record = PluginRecord(ep.name, "entry point", ep.value,
                                  dist.name if dist else None, dist.version if dist else None)
            sources.append((record, ep.load))
    directory = plugins_dir or os.environ.get("TOKENBENCH_PLUGINS_DIR") or None
    if directory:
        for path in plugin_files(directory):
            sources.append((PluginRecord(path.stem, "plugins dir", str(path)),
                            lambda path=path: _import_file(path)))
    for record, load in sources:
        registry.plugins.append(record)
        _load_one(registry, record, load)
        if strict and record.problems:
            raise PluginError(registry.problems[-1])
    return registry


def plugin_files(directory: str | Path) -> list[Path]:
    path = Path(directory)
    if not path.is_dir():
        raise PluginError(f"plugins dir '{directory}' does not exist or is not a directory")
    return sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))


def _import_file(path: Path) -> ModuleType:
    module_name = f"tokenbench_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _load_one(registry: Registry, record: PluginRecord, load: Callable[[], Any]) -> None:
    pm = registry.plugin_manager
    try:
        plugin = load()
    except Exception as exc:  # noqa: BLE001 -- a broken plugin must not take the others down
        record.problems.append(f"failed to import: {type(exc).__name__}: {exc}")
        return
    misspelled = _unknown_hooks(pm, plugin)
    if misspelled:
        record.problems.extend(misspelled)
        return
    try:
        pm.register(plugin, name=f"{record.origin}:{record.name}:{id(plugin)}")
    except (ValueError, pluggy.PluginValidationError) as exc:
        record.problems.append(f"invalid hook implementation: {exc}")
        return
    for hook_name, kind in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                try:
                    impl.function(register=lambda obj, kind=kind: _register(registry, record, kind, obj))
                except Exception as exc:  # noqa: BLE001 -- recorded against the plugin, others go on
                    record.problems.append(f"{hook_name} raised {type(exc).__name__}: {exc}")


def _unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Hook implementations whose names match no specification (pluggy's ``check_pending``)."""
    problems = []
    for attr in dir(plugin):
        if pm.parse_hookimpl_opts(plugin, attr) is not None and attr not in HOOKS:
            close = difflib.get_close_matches(attr, list(HOOKS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown hook '{attr}'{hint} hooks: {', '.join(HOOKS)}")
    return problems


def _register(registry: Registry, record: PluginRecord, kind: str, obj: Any) -> None:
    problem = _validate(kind, obj)
    name = getattr(obj, "name", None)
    if problem:
        record.problems.append(f"registered an invalid {kind} {obj!r}: {problem}")
        return
    table = registry.table(kind)
    if name in table:
        first = registry.owner[(kind, name)]
        record.problems.append(f"{KIND_WORDS[kind]} '{name}' is already registered by plugin "
                               f"{first.label}; this one from {record.label} is skipped")
        return
    table[name] = obj
    registry.owner[(kind, name)] = record
    record.registered[kind].append(name)


def _validate(kind: str, obj: Any) -> str | None:
    from tokenbench.adapters.base import VLMAdapter
    from tokenbench.tasks.base import Task

    base = {"compressor": TokenCompressor, "adapter": VLMAdapter, "task": Task}[kind]
    if not (inspect.isclass(obj) and issubclass(obj, base) and obj is not base):
        return f"expected a subclass of {base.__module__}.{base.__name__}"
    name = getattr(obj, "name", "")
    if not isinstance(name, str) or not _NAME.match(name):
        return f"name {name!r} must be lower-case letters, digits, '_', '-', '.', '+'"
    if kind == "compressor":
        if not set(obj.needs) <= SIGNALS:
            return f"needs {set(obj.needs) - SIGNALS} are not among {sorted(SIGNALS)}"
        if not obj.stages or not all(isinstance(s, Stage) for s in obj.stages):
            return "stages must be a non-empty tuple of tokenbench.Stage"
        for method in ("schedule", "reduce"):
            if getattr(obj, method) is getattr(TokenCompressor, method):
                return f"does not implement {method}()"
    if kind == "adapter" and not obj.model_types:
        return "model_types must list the HF config.model_type values it handles"
    return None
