"""Shared inputs for the in-LLM methods' tests (fastv, pdrop, sparsevlm, dart)."""

from __future__ import annotations

from tokenbench import Architecture, ModelInfo, Stage


def model_info(llm_layers: int = 32, n_visual: int = 576) -> ModelInfo:
    """A LLaVA-1.5-shaped model (24×24 grid, every stage) with ``llm_layers`` decoder layers and small
    widths: enough for ``schedule`` and the layer-averaged budget."""
    arch = Architecture(llm_layers=llm_layers, llm_hidden=64, llm_intermediate=128, llm_heads=4,
                        llm_kv_heads=4, vocab_size=100, vision_layers=4, vision_hidden=32,
                        vision_intermediate=64, vision_tokens=n_visual + 1, projector_in=32,
                        projector_hidden=64)
    return ModelInfo("llava", frozenset(Stage), (24, 24), n_visual, arch)
