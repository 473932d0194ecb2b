"""Hook specifications: the plugin contract.

A plugin is a module (or object) with functions marked ``@tokenbench.hookimpl`` whose names are
among the hooks below. Each hook receives a ``register`` callback; call it once per object::

    import tokenbench

    @tokenbench.hookimpl
    def register_compressors(register):
        register(MyCompressor)

tokenbench validates every registered object and attributes it to the plugin that registered it.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "tokenbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_compressors(register: Callable[[type], None]) -> None:
    """Register compression methods: ``register(cls)`` with a ``TokenCompressor`` subclass that
    has a unique, non-empty ``name``."""


@hookspec
def register_adapters(register: Callable[[type], None]) -> None:
    """Register VLM adapters: ``register(cls)`` with a ``VLMAdapter`` subclass whose
    ``model_types`` lists the HF ``config.model_type`` values it handles."""


@hookspec
def register_tasks(register: Callable[[type], None]) -> None:
    """Register tasks: ``register(cls)`` with a ``Task`` subclass that has a unique ``name``."""
