"""The ``lmms_eval.models`` entry point: tokenbench's model manifest for lmms-eval's registry.

lmms-eval loads this module while it builds its model registry, for every command, so it stays
light: the model class (torch, the adapters) is imported only when ``--model tokenbench`` is used.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "tokenbench"
MODEL_CLASS = "tokenbench.integrations.lmms_model.TokenbenchLMM"


def manifest() -> Any:
    """``ModelManifest(model_id="tokenbench")`` pointing at :class:`TokenbenchLMM` (a simple model:
    it receives lmms-eval's text context and visuals and applies the model's own chat template)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
