"""tokenbench: benchmark suite and plugin registry for visual-token compression in VLMs."""

from tokenbench.budget import Budget
from tokenbench.compressor import (
    Architecture,
    Infeasible,
    ModelInfo,
    Reduction,
    Site,
    SiteInput,
    Stage,
    TokenCompressor,
    layer_averaged_tokens,
)
from tokenbench.hookspecs import hookimpl
from tokenbench.tasks.base import Sample, Task

__version__ = "0.1.0"

__all__ = [
    "Architecture", "Budget", "Infeasible", "ModelInfo", "Reduction", "Sample", "Site", "SiteInput",
    "Stage", "Task", "TokenCompressor", "hookimpl", "layer_averaged_tokens", "__version__",
]
