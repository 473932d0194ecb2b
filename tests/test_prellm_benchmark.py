"""Micro-benchmark: ``reduce`` of visionzip, fastervlm and vispruner next to apet's on LLaVA-1.5-shaped
input (batch 1, 576 CLIP tokens of 1024 dims, keep 64, the signals each method needs).

pytest's addopts disable benchmarking, so in the normal suite each function runs once as a plain test.
For figures: ``OMP_NUM_THREADS=2 pytest tests/test_prellm_benchmark.py --benchmark-enable``.
"""

from __future__ import annotations

import pytest
import torch
from prellm_tools import llava_input

from tokenbench.plugins import load_registry

REGISTRY = load_registry()
KEEP = 64


@pytest.mark.benchmark(group="reduce llava-1.5 1x576x1024 keep 64")
@pytest.mark.parametrize("method,options", [("apet", {}), ("fastervlm", {}), ("visionzip", {}),
                                            ("visionzip", {"cls": "first"}), ("vispruner", {}),
                                            ("vispruner", {"important_ratio": 0.75})],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_benchmark_reduce(benchmark, method, options):
    compressor = REGISTRY.compressor(method)(**options)
    x = llava_input(1, KEEP, seed=0)
    x.generator = torch.Generator().manual_seed(0)
    out = benchmark.pedantic(compressor.reduce, args=(x,), rounds=30, iterations=1, warmup_rounds=3)
    total = sum(t.shape[1] for t in (out.keep, out.extra, out.prefix) if t is not None)
    assert total == KEEP
