"""VLM adapters: one module per family; the only code that knows model internals."""

from tokenbench.adapters.base import AdapterError, Generation, Prompt, TokenTrace, VLMAdapter

__all__ = ["AdapterError", "Generation", "Prompt", "TokenTrace", "VLMAdapter"]
