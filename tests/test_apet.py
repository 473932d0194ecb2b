"""ApET: spec §2.12 invariants, agreement with a slow loop implementation, degenerate inputs,
the two-stage schedule and the compressor contract."""

from __future__ import annotations

import pydantic
import pytest
import torch
from apet_slow import slow_apet
from tokenbench.methods.apet import (
    ApET,
    apet_compress,
    approximation_error,
    farthest_point_sampling,
    split_budget,
)

from tokenbench import (
    Architecture,
    Budget,
    Infeasible,
    ModelInfo,
    Reduction,
    Site,
    SiteInput,
    Stage,
    layer_averaged_tokens,
)
from tokenbench.testing import check_compressor

ALL_STAGES = (Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM)


def model_info(layers: int = 32, stages=ALL_STAGES, n_visual: int = 576) -> ModelInfo:
    arch = Architecture(llm_layers=layers, llm_hidden=4096, llm_intermediate=11008, llm_heads=32,
                        llm_kv_heads=32, vocab_size=32000, vision_layers=23, vision_hidden=1024,
                        vision_intermediate=4096, vision_tokens=577, projector_in=1024,
                        projector_hidden=4096)
    return ModelInfo(family="llava", stages=frozenset(stages), grid=(24, 24), n_visual=n_visual, arch=arch)


def tokens(b: int = 2, n: int = 40, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def site_input(x: torch.Tensor, keep: int, stage: Stage = Stage.VISION_OUT, seed: int = 0) -> SiteInput:
    b, n, _ = x.shape
    layer = 16 if stage is Stage.LLM else 0
    return SiteInput(visual=x, origin=torch.arange(n).repeat(b, 1), grid=(1, n), keep=keep,
                     site=Site(stage, layer), generator=torch.Generator().manual_seed(seed),
                     sizes=torch.ones(b, n))


# --- spec §2.12 invariants ---------------------------------------------------------------------

def test_basis_rows_have_near_zero_error():
    x = tokens(n=60, d=32)
    picks = farthest_point_sampling(x, 6, start="first")
    errors = approximation_error(x, x.gather(1, picks.unsqueeze(2).expand(-1, -1, 32)))
    at_basis = errors.gather(1, picks)
    assert errors.dtype == torch.float32
    assert (at_basis < 1e-3 * errors.median(dim=1, keepdim=True).values).all()


def test_approximation_error_is_the_projection_residual_in_fp32_for_bf16_input():
    x = tokens(n=30, d=16)
    basis = x[:, :5]
    q, _ = torch.linalg.qr(basis.double().transpose(1, 2))  # orthonormal basis of span(S) [B, D, k]
    residual = x.double() - (x.double() @ q) @ q.transpose(1, 2)
    expected = residual.norm(dim=2)
    assert torch.allclose(approximation_error(x, basis).double(), expected, atol=1e-4)
    half = approximation_error(x.bfloat16(), basis.bfloat16())
    assert half.dtype == torch.float32
    assert torch.allclose(half.double(), expected, rtol=0.05, atol=0.05)


def test_farthest_point_sampling_picks_the_farthest_token_first():
    x = torch.zeros(1, 5, 2)
    x[0, 3] = torch.tensor([10.0, 0.0])
    x[0, 1] = torch.tensor([0.0, 4.0])
    assert farthest_point_sampling(x, 3, start="first").tolist() == [[0, 3, 1]]
    assert farthest_point_sampling(x, 1, start="max_norm").tolist() == [[3]]


@pytest.mark.parametrize("mode", ["replace", "blend", "append"])
def test_output_length_equals_keep_in_ascending_order(mode):
    x = tokens(b=3, n=50)
    out = apet_compress(x, 17, 5, basis_mode=mode, start="first")
    extra = 0 if out.extra is None else out.extra.shape[1]
    assert out.keep.shape[1] + extra == 17
    assert out.values.shape == (3, out.keep.shape[1], 12)
    assert (out.keep[:, 1:] > out.keep[:, :-1]).all()
    assert (mode == "append") == (extra == 5)


def test_merged_targets_are_exact_means_of_target_and_sources():
    x, keep, k, scaling = tokens(b=2, n=40, d=10, seed=3), 14, 4, 2.0
    out = apet_compress(x, keep, k, merge_scaling=scaling, start="first")
    picks = farthest_point_sampling(x, k, start="first")
    for b in range(2):
        basis_rows = x[b, picks[b]]
        kept = out.keep[b].tolist()
        slots = [p for p, v in zip(kept, out.values[b]) if (v == basis_rows).all(dim=1).any()]
        targets = [p for p in kept if p not in slots]
        sources = [u for u in range(40) if u not in kept]
        assert len(slots) == k and len(targets) == keep - k
        unit = torch.nn.functional.normalize(x[b], dim=1)
        owner = {u: targets[int((unit[targets] @ unit[u]).argmax())] for u in sources}
        for t in targets:
            mine = [u for u in sources if owner[u] == t]
            expected = (scaling * x[b, t] + x[b, mine].sum(dim=0)) / (scaling + len(mine))
            assert torch.allclose(out.values[b, kept.index(t)], expected, atol=1e-5)


def test_replace_puts_the_basis_tokens_on_the_lowest_error_kept_positions():
    x = tokens(n=40, d=10, seed=5)
    out = apet_compress(x, 12, 3, start="first")
    picks = farthest_point_sampling(x, 3, start="first")
    errors = approximation_error(x, x.gather(1, picks.unsqueeze(2).expand(-1, -1, 10)))
    for b in range(2):
        weakest = errors[b, out.keep[b]].argsort()[:3].sort().values  # in ascending position order
        assert torch.equal(out.values[b, weakest], x[b, picks[b]])  # slot j holds basis token j


def test_deterministic_for_a_fixed_start_and_seeded_generator():
    x = tokens(b=3, n=50)
    a = apet_compress(x, 20, start="random", generator=torch.Generator().manual_seed(7))
    b = apet_compress(x, 20, start="random", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.values, b.values)
    c = apet_compress(x, 20, start=torch.tensor([4, 0, 9]))
    d = apet_compress(x, 20, start=torch.tensor([4, 0, 9]))
    assert torch.equal(c.keep, d.keep) and torch.equal(c.values, d.values)


# --- against the slow loop implementation --------------------------------------------------------

@pytest.mark.parametrize("mode", ["replace", "blend", "append"])
@pytest.mark.parametrize("slot_order", ["ascending", "error"])
@pytest.mark.parametrize("keep, basis, scaling", [(15, 4, 1.0), (9, 3, 1.5), (3, 5, 1.0), (1, 10, 1.0)])
def test_matches_slow_implementation(mode, slot_order, keep, basis, scaling):
    x = tokens(b=3, n=36, d=10, seed=keep)
    starts = [2, 0, 35]
    fast = apet_compress(x, keep, basis, merge_scaling=scaling, basis_mode=mode,
                         start=torch.tensor(starts), slot_order=slot_order)
    kept, values, extra = slow_apet(x, keep, basis, starts, merge_scaling=scaling, basis_mode=mode,
                                    slot_order=slot_order)
    assert fast.keep.tolist() == kept
    assert torch.allclose(fast.values.double(), values, atol=1e-5)
    if extra is None:
        assert fast.extra is None
    else:
        assert torch.allclose(fast.extra.double(), extra, atol=1e-6)


def test_matches_slow_implementation_on_clustered_tokens():
    g = torch.Generator().manual_seed(11)
    centres = 5 * torch.randn(2, 6, 16, generator=g)
    x = centres.repeat_interleave(8, dim=1) + 0.1 * torch.randn(2, 48, 16, generator=g)
    fast = apet_compress(x, 12, 4, start="first")
    kept, values, _ = slow_apet(x, 12, 4, [0, 0])
    assert fast.keep.tolist() == kept
    assert torch.allclose(fast.values.double(), values, atol=1e-4)


# --- degenerate inputs ---------------------------------------------------------------------------

def test_keep_at_least_n_is_a_no_op():
    x = tokens(n=10)
    out = apet_compress(x, 10)
    assert out.keep.tolist() == [list(range(10))] * 2 and out.values is x and out.extra is None
    reduction = ApET().reduce(site_input(x, keep=25))
    reduction.check(site_input(x, keep=25))
    assert reduction.values is None and reduction.keep.shape == (2, 10)


def test_keep_not_above_basis_shrinks_the_basis():
    x = tokens(n=30)
    out = apet_compress(x, 5, 10, start="first")
    assert out.keep.shape == (2, 5)
    picks = farthest_point_sampling(x, 4, start="first")  # keep - 1 basis tokens survive
    for b in range(2):
        assert all((out.values[b] == row).all(dim=1).any() for row in x[b, picks[b]])


def test_keep_one_is_the_mean_of_all_tokens_at_the_largest_norm_token():
    x = tokens(n=30)
    out = apet_compress(x, 1, 10)
    assert out.keep.squeeze(1).tolist() == x.norm(dim=2).argmax(dim=1).tolist()
    assert torch.allclose(out.values.squeeze(1), x.mean(dim=1), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_tokens(dtype):
    row = torch.randn(16)
    x = row.expand(2, 30, 16).to(dtype).clone()
    out = apet_compress(x, 8, 4, start="first")
    assert out.keep.shape == (2, 8) and (out.keep[:, 1:] > out.keep[:, :-1]).all()
    assert torch.allclose(out.values.float(), x[:, :8].float(), rtol=1e-2)


def test_all_zero_tokens():
    out = apet_compress(torch.zeros(2, 30, 8), 8, 4)
    assert out.keep.shape == (2, 8) and (out.values == 0).all()


def test_single_token():
    x = tokens(n=1)
    out = apet_compress(x, 1)
    assert out.keep.tolist() == [[0], [0]] and torch.equal(out.values, x)


def test_huge_bf16_magnitudes_behave_like_the_rescaled_input():
    x = tokens(n=40, d=16).bfloat16()
    small = apet_compress(x, 12, 4, start="first")
    for exponent in (60, 100, 124):  # randn·2^124 stays below the bf16 maximum (~2^128)
        huge = apet_compress(x * 2.0**exponent, 12, 4, start="first")
        assert torch.isfinite(huge.values.float()).all()
        assert torch.equal(huge.keep, small.keep)
        assert torch.equal(huge.values, small.values * 2.0**exponent)  # power-of-two scaling is exact


def test_fp16_hidden_states_with_large_distances_are_sampled_like_fp32():
    x = 300 * tokens(n=40, d=64)  # squared distances far beyond the fp16 range (65504)
    assert torch.equal(farthest_point_sampling(x.half(), 8, start="first"),
                       farthest_point_sampling(x.half().float(), 8, start="first"))


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_non_finite_input_is_a_clear_error(bad, word):
    x = tokens()
    x[1, 3, 2] = bad
    with pytest.raises(ValueError, match=f"apet: input contains {word}"):
        apet_compress(x, 10)
    with pytest.raises(ValueError, match="apet: input contains"):
        ApET().reduce(site_input(x, 10))


# --- schedule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, v1, v2", [(192, 288, 96), (128, 192, 64), (64, 96, 32)])
def test_reference_split_on_32_layers(budget, v1, v2):
    plan = ApET().schedule(576, budget, model_info())
    assert plan == [(Site(Stage.VISION_OUT), v1), (Site(Stage.LLM, 16), v2)]
    assert layer_averaged_tokens(576, plan, 32) == budget


def test_stage1_falls_back_to_the_projector():
    plan = ApET().schedule(576, 192, model_info(stages=(Stage.PROJECTOR, Stage.LLM)))
    assert plan[0] == (Site(Stage.PROJECTOR), 288)


def test_single_stage_keeps_the_budget_before_the_llm():
    assert ApET(stage2=False).schedule(576, 191.6, model_info()) == [(Site(Stage.VISION_OUT), 192)]
    assert ApET(stage2=False).schedule(576, 64, model_info(stages=(Stage.PROJECTOR,))) == [
        (Site(Stage.PROJECTOR), 64)]


@pytest.mark.parametrize("layers", [2, 3, 4, 7, 12, 24, 28, 32, 40, 80])
@pytest.mark.parametrize("budget", [1, 5.5, 64, 128, 192, 300, 383.9, 400, 575])
def test_scaled_depths_meet_the_budget_within_one_token(layers, budget):
    info = model_info(layers)
    plan = ApET().schedule(576, budget, info)
    assert abs(layer_averaged_tokens(576, plan, layers) - budget) <= 1
    counts = [keep for _, keep in plan]
    assert counts == sorted(counts, reverse=True) and all(1 <= c < 576 for c in counts)
    assert [site.layer for site, _ in plan if site.stage is Stage.LLM] in ([], [info.scale_layer(16)])


def test_split_keeps_the_three_to_one_ratio_at_an_off_middle_layer():
    v1, v2 = split_budget(576, 192, 7, 4)  # layers 0-3 see V1, 4-6 see V2
    assert abs(v1 / v2 - 3) < 0.05
    assert abs((4 * v1 + 3 * v2) / 7 - 192) <= 0.5


def test_large_budget_keeps_everything_before_stage_two():
    plan = ApET().schedule(576, 500, model_info())
    assert plan == [(Site(Stage.LLM, 16), 424)]


def test_explicit_stage2_layer():
    plan = ApET(stage2_layer=8).schedule(576, 192, model_info())
    assert plan[1][0] == Site(Stage.LLM, 8)
    assert abs(layer_averaged_tokens(576, plan, 32) - 192) <= 1


def test_budget_keeping_every_token_is_an_empty_plan():
    assert ApET().schedule(576, 576, model_info()) == []
    assert ApET(stage2=False).schedule(576, 575.8, model_info()) == []


@pytest.mark.parametrize("options, info, budget, reason", [
    ({}, model_info(), 0.5, "less than one"),
    ({}, model_info(stages=(Stage.VISION_OUT,)), 192, "stage2=false"),
    ({"stage2_layer": 32}, model_info(), 192, "stage2_layer=32"),
    ({}, model_info(layers=1), 192, "stage2_layer"),
    ({"stage2": False}, model_info(stages=(Stage.LLM,)), 192, "neither vision_out nor projector"),
])
def test_infeasible_budgets_say_why(options, info, budget, reason):
    with pytest.raises(Infeasible, match=reason):
        ApET(**options).schedule(576, budget, info)


# --- compressor contract -------------------------------------------------------------------------

def test_class_contract_and_options():
    method = ApET()
    assert method.name == "apet" and method.needs == frozenset() and method.flash_attention == "native"
    assert method.stages == (Stage.VISION_OUT, Stage.PROJECTOR, Stage.LLM)
    assert method.positions == "contiguous" and ApET(positions="original").positions == "original"
    assert method.options.basis == 10 and method.options.ridge == 1e-5
    with pytest.raises(pydantic.ValidationError):
        ApET(bases=5)
    with pytest.raises(pydantic.ValidationError):
        ApET(basis_mode="sum")


def test_registered_as_apet():
    from tokenbench.plugins import load_registry

    assert load_registry().compressor("apet") is ApET


@pytest.mark.parametrize("stage", ALL_STAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["replace", "append"])
def test_reduce_obeys_the_contract(stage, dtype, batch, mode):
    x = tokens(b=batch, n=48, d=16).to(dtype)
    method = ApET(basis_mode=mode)
    first = method.reduce(site_input(x, 20, stage, seed=1))
    again = method.reduce(site_input(x, 20, stage, seed=1))
    first.check(site_input(x, 20, stage))
    assert isinstance(first, Reduction) and first.values.dtype == dtype
    assert torch.equal(first.keep, again.keep) and torch.equal(first.values, again.values)
    extra = 0 if first.extra is None else first.extra.shape[1]
    assert first.keep.shape[1] + extra == 20


def test_reference_slot_order_applies_at_the_llm_stage_only():
    x = tokens(n=48, d=16)
    method = ApET(basis_slots="reference", fps_start="first")
    at_llm = method.reduce(site_input(x, 20, Stage.LLM))
    at_vision = method.reduce(site_input(x, 20, Stage.VISION_OUT))
    assert torch.equal(at_llm.values, apet_compress(x, 20, start="first", slot_order="error").values)
    assert torch.equal(at_vision.values, apet_compress(x, 20, start="first").values)


def test_two_stage_plan_runs_end_to_end():
    method, info = ApET(), model_info()
    x = tokens(b=2, n=576, d=32)
    survivors = x
    for site, keep in method.schedule(576, 64, info):
        reduction = method.reduce(site_input(survivors, keep, site.stage))
        reduction.check(site_input(survivors, keep, site.stage))
        survivors = reduction.values
    assert survivors.shape == (2, 32, 32)


@pytest.mark.parametrize("options", [{"basis_mode": "blend"}, {"basis_mode": "append"}, {"stage2": False},
                                     {"basis_slots": "reference", "fps_start": "max_norm"}])
def test_contract_suite_with_options(options):
    check_compressor(ApET, options)


@pytest.mark.parametrize("options", [{}, {"basis_mode": "append", "positions": "original"}])
def test_through_the_tiny_llava_adapter(options):
    """The plan runs in a real prefill and the token trace realises the budget exactly."""
    from tiny_vlm import llava_adapter, prompts

    adapter = llava_adapter()
    for text, v1, v2 in [("192", 288, 96), ("64", 96, 32)]:
        out = adapter.generate(prompts(2), compressor=ApET(**options), budget=Budget.parse(text),
                               max_new_tokens=2)
        for generation in out:
            assert generation.trace.plan == [("vision_out", 0, v1), ("llm", 16, v2)]
            assert generation.trace.realised_tokens == pytest.approx(float(text))
