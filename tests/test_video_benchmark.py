"""Micro-benchmark: one ``reduce`` call of each video method on a Video-LLaVA-shaped input (8 frames x
16x16 tokens = 2048, width 1024), at 12.5% (256 tokens; DyCoke at its 25% floor, 512).

pytest's addopts disable benchmarking, so in the normal suite each function runs once as a plain test
that checks the kept count. For figures:
``OMP_NUM_THREADS=2 pytest tests/test_video_benchmark.py --benchmark-enable``.
"""

from __future__ import annotations

import pytest
import torch
from tokenbench.methods.apet import ApET
from tokenbench.methods.dycoke import DyCoke
from tokenbench.methods.holitom import HoliTom

from tokenbench import Site, SiteInput, Stage

FRAMES, GRID, WIDTH = 8, (16, 16), 1024
METHODS = {"apet": (ApET, 256), "apet-image": (lambda: ApET(video="image", stage2=False), 256),
           "holitom": (HoliTom, 256), "dycoke": (DyCoke, 512)}


@pytest.fixture(scope="module")
def video_input() -> SiteInput:
    """Half the positions static (a shared token plus noise), the others new in every frame."""
    gen = torch.Generator().manual_seed(0)
    n = GRID[0] * GRID[1]
    base = torch.randn(1, 1, n, WIDTH, generator=gen)
    static = (torch.rand(1, 1, n, 1, generator=gen) < 0.5).float()
    frames = static * (base + 0.3 * torch.randn(1, FRAMES, n, WIDTH, generator=gen)) + (1 - static) * torch.randn(
        1, FRAMES, n, WIDTH, generator=gen)
    total = FRAMES * n
    return SiteInput(visual=frames.reshape(1, total, WIDTH), origin=torch.arange(total).unsqueeze(0), grid=GRID,
                     keep=0, site=Site(Stage.PROJECTOR), generator=torch.Generator().manual_seed(1), frames=FRAMES,
                     attention_received=torch.rand(1, total, generator=gen))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.benchmark(group="video reduce, Video-LLaVA 8x16x16x1024")
def test_benchmark_video_reduce(benchmark, video_input, name):
    factory, keep = METHODS[name]
    video_input.keep = keep
    method = factory()
    out = benchmark.pedantic(method.reduce, args=(video_input,), rounds=10, iterations=1, warmup_rounds=1)
    extra = 0 if out.extra is None else out.extra.shape[1]
    assert out.keep.shape[1] + extra == keep
