"""Micro-benchmark: batched ``apet_compress`` next to the slow loop implementation on LLaVA-1.5-shaped
input (8 images x 576 CLIP tokens x 1024 dims, keep 96, basis 10).

pytest's addopts disable benchmarking, so in the normal suite each function runs once as a plain test
(and the results are still compared, by the slow loops on two of the eight images). For figures:
``OMP_NUM_THREADS=2 pytest tests/test_apet_benchmark.py --benchmark-enable``; the table's
parenthesised numbers are the ratio to the fastest entry of the group.
"""

from __future__ import annotations

import pytest
import torch
from apet_slow import slow_apet
from tokenbench.methods.apet import apet_compress

BATCH, TOKENS, DIMS, KEEP, BASIS = 8, 576, 1024, 96, 10
STARTS = [0, 100, 200, 300, 400, 500, 575, 7]


@pytest.fixture(scope="module")
def llava_features() -> torch.Tensor:
    return torch.randn(BATCH, TOKENS, DIMS, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def slow_result() -> dict:
    """Lets the slow test compare against the fast output without recomputing it."""
    return {}


@pytest.mark.benchmark(group="apet_compress llava-1.5 8x576x1024 keep 96")
def test_benchmark_apet_compress(benchmark, llava_features, slow_result):
    out = benchmark.pedantic(apet_compress, args=(llava_features, KEEP, BASIS),
                             kwargs={"start": torch.tensor(STARTS)}, rounds=20, iterations=1,
                             warmup_rounds=2)
    assert out.keep.shape == (BATCH, KEEP) and out.values.shape == (BATCH, KEEP, DIMS)
    slow_result["fast"] = out


@pytest.mark.benchmark(group="apet_compress llava-1.5 8x576x1024 keep 96")
def test_benchmark_slow_loops(benchmark, llava_features, slow_result):
    # as a plain test, the loops check two of the eight images (the first and the last FPS start);
    # timed, all eight, as the batched function
    images = list(range(BATCH)) if benchmark.enabled else [0, 6]
    kept, values, _ = benchmark.pedantic(slow_apet, args=(llava_features[images], KEEP, BASIS,
                                                          [STARTS[i] for i in images]), rounds=3, iterations=1)
    fast = slow_result.get("fast") or apet_compress(llava_features, KEEP, BASIS, start=torch.tensor(STARTS))
    assert fast.keep[images].tolist() == kept
    assert torch.allclose(fast.values[images].double(), values, atol=1e-4)
