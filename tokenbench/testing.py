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

LLAVA_15 = ModelInfo(
    family="llava", stages=frozenset(Stage), grid=(24, 24), n_visual=576,
    arch=Architecture(llm_layers=32, llm_hidden=4096, llm_intermediate=11008, llm_heads=32, llm_kv_heads=32,
                      vocab_size=32064, vision_layers=23, vision_hidden=1024, vision_intermediate=4096,
                      vision_tokens=577, projector_in=1024, projector_hidden=4096))
QWEN2_VL = ModelInfo(
    family="qwen2_vl", stages=frozenset({Stage.PROJECTOR, Stage.LLM, Stage.DECODE}), grid=(18, 24), n_visual=432,
    arch=Architecture(llm_layers=28, llm_hidden=1536, llm_intermediate=8960, llm_heads=12, llm_kv_heads=2,
                      vocab_size=151936, vision_layers=32, vision_hidden=1280, vision_intermediate=5120,
                      vision_tokens=1728, projector_in=5120, projector_hidden=1536))
# LLaVA-NeXT-7B on a wide image: base crop plus two sub-crops that unpadding cuts to 24×18 tokens each
LLAVA_NEXT = ModelInfo(
    family="llava_next", stages=frozenset({Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM, Stage.DECODE}), grid=(24, 24),
    n_visual=576 + 2 * 24 * 18, arch=LLAVA_15.arch, crops=((24, 24), (24, 18), (24, 18)))
# Video-LLaVA-7B on a video (spec wave 2 §20 E8): 8 frames of 16×16 tokens, frame-major, 2048 in all
VIDEO_LLAVA = ModelInfo(
    family="video_llava", stages=frozenset({Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM, Stage.DECODE}),
    grid=(16, 16),
    n_visual=8 * 16 * 16, frames=8,
    arch=Architecture(llm_layers=32, llm_hidden=4096, llm_intermediate=11008, llm_heads=32, llm_kv_heads=32,
                      vocab_size=32000, vision_layers=23, vision_hidden=1024, vision_intermediate=4096,
                      vision_tokens=257, projector_in=1024, projector_hidden=4096))
REFERENCE_MODELS = {"llava-1.5-7b": LLAVA_15, "qwen2-vl-2b": QWEN2_VL, "llava-next-7b": LLAVA_NEXT,
                    "video-llava-7b": VIDEO_LLAVA}
REFERENCE_BUDGETS = (192, 128, 64)
# Budgets of the video reference models: 25% and 12.5% of the frames' tokens (ApET's video point)
REFERENCE_VIDEO_BUDGETS = (512, 256)
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
        layers = info.llm_layers if site.stage in (Stage.LLM, Stage.DECODE) else info.vision_layers
        assert 0 <= site.layer < max(layers, 1), f"{compressor.name}: {site} is outside the model's depth"
        assert site.stage is not Stage.DECODE or site.layer >= 1, f"{compressor.name}: a decode site needs layer >= 1"
    averaged = layer_averaged_tokens(info.n_visual, plan, info.llm_layers)
    assert averaged <= budget + 1 or compressor.adaptive_count, (
        f"{compressor.name}: plan averages {averaged:.1f} visual tokens per layer, over the budget {budget}")
    return plan


def synthetic_input(compressor: TokenCompressor, site: Site, keep: int, n: int, grid: tuple[int, int], *,
                    batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                    width: int = SIGNAL_WIDTH, crops: tuple[tuple[int, int], ...] = (),
                    frames: int = 1) -> SiteInput:
    """A :class:`SiteInput` with random tokens and exactly the signals ``compressor.needs`` asks for;
    with ``crops`` (a multi-crop image) the tokens come from those crops, with their ``crop_origin``;
    with ``frames`` > 1 (a video) from that many frames of ``grid``, frame-major."""
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, n, width, generator=gen).to(dtype)
    total = sum(h * w for h, w in crops) if crops else frames * grid[0] * grid[1]
    origin = torch.sort(torch.randperm(total, generator=gen)[:n]).values.expand(batch, n).clone()
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
    signals.update(_llm_state_signals(compressor, batch, n, width, gen, dtype))
    if "cls_attention_next" in compressor.needs:  # peaked, like a real CLS row: a few outliers
        logits = torch.randn(batch, n + 1, generator=gen) * 2
        signals["cls_attention_next"] = logits.softmax(-1)[:, 1:].float()
    if "keys_next" in compressor.needs:
        signals["keys_next"] = torch.randn(batch, n, width, generator=gen).to(dtype)
    if "clip_visual" in compressor.needs:
        signals["clip_visual"] = torch.randn(batch, n, width, generator=gen)
    if "clip_text" in compressor.needs:
        signals["clip_text"] = torch.randn(batch, 2, width, generator=gen)
    if "cls_token" in compressor.needs:
        signals["cls_token"] = torch.randn(batch, 1, width, generator=gen).to(dtype)
    if "attention_received" in compressor.needs:
        signals["attention_received"] = torch.rand(batch, n, generator=gen).softmax(-1).to(dtype)
    if crops:
        table = torch.cat([torch.stack([torch.full((h * w,), c), torch.arange(h * w) // w, torch.arange(h * w) % w],
                                       dim=1) for c, (h, w) in enumerate(crops)])
        signals |= {"crops": crops, "crop_origin": table[origin]}
    return SiteInput(visual=visual, origin=origin, grid=grid, keep=keep, site=site,
                     generator=torch.Generator().manual_seed(seed + 1),
                     sizes=torch.ones(batch, n, dtype=dtype), frames=frames, **signals)


def _llm_state_signals(compressor: TokenCompressor, batch: int, n: int, width: int, gen: torch.Generator,
                       dtype: torch.dtype) -> dict[str, Any]:
    """Random ``key_l1``, ``final_norm`` and ``input_states`` signals (6 text tokens; at batch > 1 the
    first row's text is two tokens shorter, as left padding makes it, and ``text_valid`` says so)."""
    text = 6
    signals: dict[str, Any] = {}
    if "key_l1" in compressor.needs:
        signals["key_l1"] = torch.rand(batch, n, generator=gen).to(dtype) * width
        signals["text_key_l1"] = torch.rand(batch, text, generator=gen).to(dtype) * width
    if "final_norm" in compressor.needs:
        signals["normed_visual"] = torch.randn(batch, n, width, generator=gen).to(dtype)
        signals["normed_text"] = torch.randn(batch, text, width, generator=gen).to(dtype)
    if "input_states" in compressor.needs:
        signals["input_visual"] = torch.randn(batch, n + 4, width, generator=gen).to(dtype)
        signals["input_text"] = torch.randn(batch, text, width, generator=gen).to(dtype)
    if signals and batch > 1:
        valid = torch.ones(batch, text, dtype=torch.bool)
        valid[0, :2] = False
        signals["text_valid"] = valid
    return signals


def check_reduction(compressor: TokenCompressor, x: SiteInput) -> Reduction:
    """Run ``reduce`` on ``x`` and check the result against the contract."""
    result = compressor.reduce(x)
    assert isinstance(result, Reduction), f"{compressor.name}: reduce must return a Reduction"
    try:
        result.check(x)
    except ValueError as exc:
        raise AssertionError(f"{compressor.name} at {x.site}: {exc}") from None
    prefix = result.prefix.shape[1] if result.prefix is not None else 0
    assert result.keep.shape[1] + prefix <= x.keep, f"{compressor.name}: kept more than {x.keep}"
    for name in ("values", "extra", "prefix"):
        tensor = getattr(result, name)
        if tensor is not None:
            assert tensor.dtype == x.visual.dtype, f"{compressor.name}: {name} dtype {tensor.dtype} != input"
            assert torch.isfinite(tensor.float()).all(), f"{compressor.name}: {name} has non-finite values"
    return result


def _same(a: Reduction, b: Reduction) -> bool:
    pairs = [(a.keep, b.keep), (a.values, b.values), (a.extra, b.extra), (a.sizes, b.sizes),
             (a.prefix, b.prefix), (a.extra_after, b.extra_after)]
    return all((p is None and q is None) or (p is not None and q is not None and torch.equal(p, q))
               for p, q in pairs)


def check_plan_reductions(compressor: TokenCompressor, info: ModelInfo, plan: list[tuple[Site, int]], *,
                          batch: int, dtype: torch.dtype) -> None:
    """Feed each planned site its predecessor's survivors and check every reduction (and determinism)."""
    n = info.n_visual
    for index, (site, keep) in enumerate(plan):
        if site.stage is Stage.DECODE:
            check_decode_view(compressor, site, keep, n, info, batch=batch)
            continue
        x = synthetic_input(compressor, site, keep, n, info.grid, batch=batch, dtype=dtype, seed=index,
                            crops=info.crops, frames=info.frames)
        first = check_reduction(compressor, x)
        again = check_reduction(compressor, synthetic_input(compressor, site, keep, n, info.grid, batch=batch,
                                                            dtype=dtype, seed=index, crops=info.crops,
                                                            frames=info.frames))
        assert _same(first, again), f"{compressor.name} at {site}: not deterministic under a fixed seed"
        if compressor.draws_per_row and batch > 1:
            check_row_draws(compressor, x)
        n = first.keep.shape[1] + (first.extra.shape[1] if first.extra is not None else 0) + (
            first.prefix.shape[1] if first.prefix is not None else 0)


def check_decode_view(compressor: TokenCompressor, site: Site, keep: int, n: int, info: ModelInfo, *,
                      batch: int, steps: int = 4) -> None:
    """Run ``decode_view`` over a few steps of random attention rows, carrying its state: every view
    keeps the contract, the steps repeat exactly from a fresh state (``None``), and each row's views
    are those it gets alone (rows of a batch are independent generations)."""
    gen = torch.Generator().manual_seed(7)
    rows = [(torch.randn(batch, n + 8, generator=gen) * 3).softmax(-1)[:, :n] for _ in range(steps)]
    origin = torch.arange(n).expand(batch, n).clone()
    probe = "decode_attention" in compressor.site_needs(site)

    def walk(which: slice) -> list[torch.Tensor]:
        state, views = None, []
        for step, attention in enumerate(rows):
            x = DecodeInput(attention[which] if probe else None, origin[which], info.grid, keep, site, step,
                            info.frames)
            view = compressor.decode_view(x, state)
            assert isinstance(view, DecodeView), f"{compressor.name}: decode_view must return a DecodeView"
            try:
                view.check(x)
            except ValueError as exc:
                raise AssertionError(f"{compressor.name} at {site}, step {step}: {exc}") from None
            views.append(view.keep)
            state = view.state
        return views

    first = walk(slice(None))
    assert all(torch.equal(a, b) for a, b in zip(first, walk(slice(None)))), (
        f"{compressor.name} at {site}: decode views differ when the same steps run again from a fresh state")
    for row in range(batch):
        alone = walk(slice(row, row + 1))
        assert all(torch.equal(a[row], b[0]) for a, b in zip(first, alone)), (
            f"{compressor.name} at {site}: row {row}'s decode views depend on the other rows of its batch")


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
                     budgets: Iterable[int] = REFERENCE_BUDGETS,
                     video_budgets: Iterable[int] = REFERENCE_VIDEO_BUDGETS) -> None:
    """Every contract rule for ``cls``: options, schedule, reduce (batch 1 and 3, fp32 and bf16).
    Video models (``frames`` > 1) run ``video_budgets``, image models ``budgets``."""
    budgets, video_budgets = tuple(budgets), tuple(video_budgets)
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
        for budget in (video_budgets if info.frames > 1 else budgets):
            plan = plan_for(compressor, info, budget)
            if plan is None:
                continue
            feasible += 1
            for batch in (1, 3):
                for dtype in (torch.float32, torch.bfloat16):
                    check_plan_reductions(compressor, info, plan, batch=batch, dtype=dtype)
    assert feasible, f"{cls.name}: Infeasible for every reference model and budget"
