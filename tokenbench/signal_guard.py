"""Undeclared signals: a method that reads ``x.text`` without ``"text"`` in ``needs`` gets ``None``
and then fails somewhere inside its tensor code with a message about ``NoneType``. The harness wraps
each method's ``reduce`` so that reading such a signal raises :class:`UndeclaredSignal`, which names
the missing declaration.
"""

from __future__ import annotations

import functools
from typing import Any

from tokenbench import compressor as contract
from tokenbench.compressor import SiteInput, TokenCompressor


class UndeclaredSignal(AttributeError):
    """A method read a signal it did not request through ``needs``."""


class _DeclaredOnly(SiteInput):
    """A :class:`SiteInput` view whose undeclared signals raise on access."""

    def __getattribute__(self, name: str) -> Any:
        if name in contract.SIGNALS:
            owner = object.__getattribute__(self, "_guard_owner")
            if name not in owner.needs:
                declared = sorted(owner.needs | {name})
                raise UndeclaredSignal(
                    f"method '{owner.name}' reads x.{name} but does not declare it: add '{name}' to its "
                    f"needs (needs = frozenset({declared}))")
        return object.__getattribute__(self, name)


def guard_signals(compressor: TokenCompressor) -> TokenCompressor:
    """Make ``compressor.reduce`` see only the signals it declared (in place; returns it)."""
    reduce = compressor.reduce

    @functools.wraps(reduce)
    def guarded(x: SiteInput) -> Any:
        view = object.__new__(_DeclaredOnly)
        view.__dict__.update(x.__dict__)
        view.__dict__["_guard_owner"] = compressor
        return reduce(view)

    compressor.reduce = guarded  # type: ignore[method-assign]
    return compressor
