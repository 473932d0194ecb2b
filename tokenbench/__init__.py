"""tokenbench: benchmark suite and plugin registry for visual-token compression in VLMs."""

import os

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, spinning
# threads made small-model runs up to 40x slower. Must be set before torch loads; override freely.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tokenbench.budget import Budget
from tokenbench.compressor import (
    Architecture,
    DecodeInput,
    DecodeView,
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
    "Architecture",
    "Budget",
    "DecodeInput",
    "DecodeView",
    "Infeasible",
    "ModelInfo",
    "Reduction",
    "Sample",
    "Site",
    "SiteInput",
    "Stage",
    "Task",
    "TokenCompressor",
    "__version__",
    "hookimpl",
    "layer_averaged_tokens",
]
