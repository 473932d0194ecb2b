"""Model names: an embedded zoo name, a local checkpoint directory, or a hub id.

Resolution happens before anything heavy loads, so a misspelled name fails at once.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenbench.plugins import Registry

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNameError(ValueError):
    pass


@dataclass(frozen=True)
class ModelRef:
    """A resolved ``--model``: the name the user gave and where ``from_pretrained`` reads it."""

    name: str
    location: str  # local directory or hub id
    model_type: str | None  # from config.json when it is local; None for a hub id not read yet
    embedded: bool = False


def embedded_models() -> dict[str, Path]:
    from tokenbench import zoo

    return dict(getattr(zoo, "EMBEDDED", {}))


def default_model() -> str:
    from tokenbench import zoo

    return getattr(zoo, "DEFAULT_MODEL", "tiny-llava-shapes")


def resolve_model(name: str, registry: Registry) -> ModelRef:
    """Resolve ``name`` and check an adapter handles its ``model_type`` (raises ``ModelNameError``)."""
    zoo = embedded_models()
    if name in zoo:
        path = zoo[name]
        return ModelRef(name, str(path), _model_type(path, name, registry), embedded=True)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNameError(f"model directory '{name}' has no config.json; give a checkpoint saved "
                                 f"with save_pretrained")
        return ModelRef(name, str(path), _model_type(path, name, registry))
    if _HUB_ID.match(name):
        return ModelRef(name, name, None)
    close = difflib.get_close_matches(name, list(zoo), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    raise ModelNameError(f"unknown model '{name}'{hint} available: {', '.join(sorted(zoo)) or 'none'}, "
                         f"a local checkpoint directory, or a hub id such as llava-hf/llava-1.5-7b-hf")


def _model_type(path: Path, name: str, registry: Registry) -> str:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNameError(f"cannot read {path}/config.json for model '{name}': {exc}") from None
    model_type = config.get("model_type", "")
    try:
        registry.adapter_for(model_type)
    except LookupError:
        known = sorted(t for cls in registry.adapters.values() for t in cls.model_types)
        raise ModelNameError(f"model '{name}' has model_type '{model_type}', which no adapter handles; "
                             f"supported: {', '.join(known) or 'none'}") from None
    return model_type
