"""The compressor contract suite, reusable by plugin authors.

``check_compressor(MyCompressor)`` runs every contract check on synthetic inputs and raises
``AssertionError`` naming the first broken rule. tokenbench's own test suite runs it over every
registered compressor, first- and third-party alike; a plugin's tests can call it directly::

    from tokenbench.testing import check_compressor

    def test_contract():
        check_compressor(MyCompressor)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import ValidationError

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

LLAVA_15 = ModelInfo(
    family="llava", stages=frozenset(Stage), grid=(24, 24), n_visual=576,
    arch=Architecture(llm_layers=32, llm_hidden=4096, llm_intermediate=11008, llm_heads=32, llm_kv_heads=32,
                      vocab_size=32064, vision_layers=23, vision_hidden=1024, vision_intermediate=4096,
                      vision_tokens=577, projector_in=1024, projector_hidden=4096))
QWEN2_VL = ModelInfo(
    family="qwen2_vl", stages=frozenset({Stage.PROJECTOR, Stage.LLM}), grid=(18, 24), n_visual=432,
    arch=Architecture(llm_layers=28, llm_hidden=1536, llm_intermediate=8960, llm_heads=12, llm_kv_heads=2,
                      vocab_size=151936, vision_layers=32, vision_hidden=1280, vision_intermediate=5120,
                      vision_tokens=1728, projector_in=5120, projector_hidden=1536))
REFERENCE_MODELS = {"llava-1.5-7b": LLAVA_15, "qwen2-vl-2b": QWEN2_VL}
REFERENCE_BUDGETS = (192, 128, 64)
SIGNAL_WIDTH = 32  # feature width of the synthetic tokens (small: the suite must stay fast)


def plan_for(compressor: TokenCompressor, info: ModelInfo, budget: float) -> list[tuple[Site, int]] | None:
    """``compressor``'s plan for ``budget``, checked against the contract; ``None`` if Infeasible."""
    try:
        plan = compressor.schedule(info.n_visual, float(budget), info)
    except Infeasible as exc:
        assert str(exc), f"{compressor.name}: Infeasible must say why"
        return None
    assert isinstance(plan, list), f"{compressor.name}: schedule must return a list, got {type(plan)}"
    for site, keep in plan:
        assert isinstance(site, Site), f"{compressor.name}: plan entries must be (Site, keep)"
        assert site.stage in info.stages, f"{compressor.name}: site {site} is not offered by {info.family}"
        assert isinstance(keep, int) and keep >= 1, f"{compressor.name}: keep must be a positive int, got {keep}"
        layers = info.llm_layers if site.stage is Stage.LLM else info.vision_layers
        assert 0 <= site.layer < max(layers, 1), f"{compressor.name}: {site} is outside the model's depth"
    averaged = layer_averaged_tokens(info.n_visual, plan, info.llm_layers)
    assert averaged <= budget + 1, (f"{compressor.name}: plan averages {averaged:.1f} visual tokens per "
                                    f"layer, over the budget {budget}")
    return plan


def synthetic_input(compressor: TokenCompressor, site: Site, keep: int, n: int, grid: tuple[int, int], *,
                    batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                    width: int = SIGNAL_WIDTH) -> SiteInput:
    """A :class:`SiteInput` with random tokens and exactly the signals ``compressor.needs`` asks for."""
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, n, width, generator=gen).to(dtype)
    origin = torch.sort(torch.randperm(grid[0] * grid[1], generator=gen)[:n]).values.expand(batch, n).clone()
    signals: dict[str, Any] = {}
    if "attention" in compressor.needs:
        queries = {"last": 1, "text": 6, "all": n + 8}[compressor.attention_queries]
        logits = torch.randn(batch, queries, n + 8, generator=gen)
        signals["attention"] = logits.softmax(-1)[..., :n].to(dtype)
    if "keys" in compressor.needs:
        signals["keys"] = torch.randn(batch, n, width, generator=gen).to(dtype)
    if "text" in compressor.needs:
        signals["text"] = torch.randn(batch, 6, width, generator=gen).to(dtype)
    if "cls_attention" in compressor.needs:
        signals["cls_attention"] = torch.rand(batch, n, generator=gen).softmax(-1).to(dtype)
    return SiteInput(visual=visual, origin=origin, grid=grid, keep=keep, site=site,
                     generator=torch.Generator().manual_seed(seed + 1),
                     sizes=torch.ones(batch, n, dtype=dtype), **signals)


def check_reduction(compressor: TokenCompressor, x: SiteInput) -> Reduction:
    """Run ``reduce`` on ``x`` and check the result against the contract."""
    result = compressor.reduce(x)
    assert isinstance(result, Reduction), f"{compressor.name}: reduce must return a Reduction"
    try:
        result.check(x)
    except ValueError as exc:
        raise AssertionError(f"{compressor.name} at {x.site}: {exc}") from None
    assert result.keep.shape[1] <= x.keep, f"{compressor.name}: kept more than {x.keep}"
    for name in ("values", "extra"):
        tensor = getattr(result, name)
        if tensor is not None:
            assert tensor.dtype == x.visual.dtype, f"{compressor.name}: {name} dtype {tensor.dtype} != input"
            assert torch.isfinite(tensor.float()).all(), f"{compressor.name}: {name} has non-finite values"
    return result


def _same(a: Reduction, b: Reduction) -> bool:
    pairs = [(a.keep, b.keep), (a.values, b.values), (a.extra, b.extra), (a.sizes, b.sizes)]
    return all((p is None and q is None) or (p is not None and q is not None and torch.equal(p, q))
               for p, q in pairs)


def check_plan_reductions(compressor: TokenCompressor, info: ModelInfo, plan: list[tuple[Site, int]], *,
                          batch: int, dtype: torch.dtype) -> None:
    """Feed each planned site its predecessor's survivors and check every reduction (and determinism)."""
    n = info.n_visual
    for index, (site, keep) in enumerate(plan):
        x = synthetic_input(compressor, site, keep, n, info.grid, batch=batch, dtype=dtype, seed=index)
        first = check_reduction(compressor, x)
        again = check_reduction(compressor, synthetic_input(compressor, site, keep, n, info.grid, batch=batch,
                                                            dtype=dtype, seed=index))
        assert _same(first, again), f"{compressor.name} at {site}: not deterministic under a fixed seed"
        if compressor.draws_per_row and batch > 1:
            check_row_draws(compressor, x)
        n = first.keep.shape[1] + (first.extra.shape[1] if first.extra is not None else 0)


def check_row_draws(compressor: TokenCompressor, x: SiteInput) -> None:
    """For a ``draws_per_row`` method: with one generator per row, each row keeps what it keeps alone
    with the same generator, so its draws depend on neither its batch position nor the batch size."""
    rows = x.visual.shape[0]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(1000 + row) for row in range(rows)]

    batched = compressor.reduce(dataclasses.replace(x, generator=None, generators=generators()))
    for row, generator in zip(range(rows)[::-1], generators()[::-1]):  # alone, and in another order
        alone = dataclasses.replace(x, generator=generator, generators=[generator], **{
            f.name: getattr(x, f.name)[row:row + 1] for f in dataclasses.fields(x)
            if isinstance(getattr(x, f.name), torch.Tensor)})
        assert torch.equal(compressor.reduce(alone).keep[0], batched.keep[row]), (
            f"{compressor.name} at {x.site}: row {row} keeps other tokens in a batch than alone; "
            "with draws_per_row it must draw row b from SiteInput.row_generators()[b] only")


def check_compressor(cls: type[TokenCompressor], options: dict[str, Any] | None = None, *,
                     models: Iterable[ModelInfo] = REFERENCE_MODELS.values(),
                     budgets: Iterable[int] = REFERENCE_BUDGETS) -> None:
    """Every contract rule for ``cls``: options, schedule, reduce (batch 1 and 3, fp32 and bf16)."""
    compressor = cls(**(options or {}))
    assert cls.name, "a compressor needs a name"
    try:
        cls(no_such_option_xyz=1)
    except ValidationError as exc:
        assert "no_such_option_xyz" in str(exc), f"{cls.name}: unknown option error must name the key"
    else:
        raise AssertionError(f"{cls.name}: Options must reject unknown keys")
    assert compressor.flash_attention in ("native", "probe", "eager")
    feasible = 0
    for info in models:
        full = plan_for(compressor, info, info.n_visual)
        if full is not None:
            feasible += 1
            averaged = layer_averaged_tokens(info.n_visual, full, info.llm_layers)
            assert averaged >= info.n_visual - 1, f"{cls.name}: a budget of every token must keep every token"
        for budget in budgets:
            plan = plan_for(compressor, info, budget)
            if plan is None:
                continue
            feasible += 1
            for batch in (1, 3):
                for dtype in (torch.float32, torch.bfloat16):
                    check_plan_reductions(compressor, info, plan, batch=batch, dtype=dtype)
    assert feasible, f"{cls.name}: Infeasible for every reference model and budget"
