"""The decode stage (spec wave 2 §20 E10) and DyCoke's dynamic KV pruning on it (§18.3).

The hook is checked against a plain loop of §18.3's steps; the adapters' decode loop against the
stock HF model run over the same tokens with the dropped visual entries masked by hand."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from adapter_tools import ALL, image
from tokenbench.methods.dycoke import DyCoke

from tokenbench import Budget, DecodeInput, DecodeView, Infeasible, ModelInfo, Site, Stage
from tokenbench.adapters.base import Prompt, TokenTrace
from tokenbench.adapters.llava import LlavaAdapter
from tokenbench.adapters.llava_next import LlavaNextAdapter
from tokenbench.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenbench.adapters.prefill import contiguous_positions
from tokenbench.adapters.qwen2_vl import Qwen2VLAdapter
from tokenbench.adapters.video_llava import VideoLlavaAdapter
from tokenbench.compressor import check_signals, layer_averaged_tokens
from tokenbench.measure import full_flops
from tokenbench.testing import VIDEO_LLAVA

STEPS = 5
SITE = Site(Stage.DECODE, 1)


def video_prompts(batch: int, frames: int = 4) -> list[Prompt]:
    """Videos of 224 px noise frames with questions of different lengths (batch 2 is left-padded)."""
    texts = ["what color is the circle ?", "how many ?"]
    return [Prompt(None, texts[i % 2], video=[image(100 * i + t, 224) for t in range(frames)]) for i in range(batch)]


# ------------------------------------------------------------------------- the hook, on hand-made rows

def slow_dycoke(rows: list[list[float]], p: float, threshold: float = 0.9) -> list[list[int]]:
    """§18.3 for one generation, step by step: the cosine with the previous step's row (0 at the first
    step), the previous row replaced by this one, and below the threshold the top int(V·(1-p))
    positions by attention; otherwise the previous set."""
    previous, kept, out = None, None, []
    for row in rows:
        if previous is None:
            similarity = 0.0
        else:
            dot = sum(a * b for a, b in zip(row, previous))
            similarity = dot / (math.sqrt(sum(a * a for a in row)) * math.sqrt(sum(b * b for b in previous)))
        previous = row
        if similarity < threshold:
            count = int(len(row) * (1 - p))
            kept = sorted(sorted(range(len(row)), key=lambda i: -row[i])[:count])
        out.append(kept)
    return out


def hand_rows() -> torch.Tensor:
    """[steps, B=2, V=10] attention rows: row 0 shifts at step 2 (cosine < 0.9) and then drifts slightly;
    row 1 drifts slightly at every step, so it keeps its first set throughout."""
    base0 = torch.tensor([9, 1, 8, 2, 7, 3, 6, 4, 5, 0.5])
    shift = torch.tensor([0.5, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    base1 = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10.0])
    drift = torch.tensor([0.3, -0.2, 0.1, 0.25, -0.3, 0.2, -0.1, 0.15, -0.25, 0.05])
    row0 = [base0, base0 + drift, shift, shift - drift, shift + 2 * drift]
    row1 = [base1 + k * drift for k in range(5)]
    return torch.stack([torch.stack([a, b]) for a, b in zip(row0, row1)]) / 50


@pytest.mark.parametrize("p", [0.0, 0.5, 0.7])
def test_hook_matches_the_slow_loop_of_the_spec(p):
    rows = hand_rows()
    expected = [slow_dycoke(rows[:, b].tolist(), p) for b in range(2)]
    assert expected[0][2] != expected[0][1] or p == 0.0  # the shift re-selects
    assert all(step == expected[1][0] for step in expected[1])  # small drift keeps the set
    method, state = DyCoke(decode_prune=p), None
    keep = int(10 * (1 - p))
    for step, attention in enumerate(rows):
        view = method.decode_view(DecodeInput(attention, torch.arange(10).expand(2, 10), (2, 5), keep, SITE, step),
                                  state)
        assert isinstance(view, DecodeView)
        assert view.keep.tolist() == [expected[0][step], expected[1][step]]
        state = view.state


def test_the_previous_row_is_replaced_at_every_step():
    """A slow drift re-selects once it has moved far from the row of the last *selection* only if the
    comparison were with that row; the reference compares with the last step's row, so it never does."""
    start = torch.tensor([[8.0, 6, 4, 2, 1, 0.5]])
    end = start.flip(1)
    rows = [start + (end - start) * k / 12 for k in range(13)]
    expected = slow_dycoke([r[0].tolist() for r in rows], 0.5)
    method, state, got = DyCoke(decode_prune=0.5), None, []
    for step, attention in enumerate(rows):
        view = method.decode_view(DecodeInput(attention, torch.arange(6)[None], (2, 3), 3, SITE, step), state)
        got.append(view.keep[0].tolist())
        state = view.state
    assert got == expected
    assert got[-1] == got[0] == [0, 1, 2]  # never re-selected, though the end ranks the other half first


def slow_dycoke_code(rows: list[list[float]], p: float, threshold: float = 0.9) -> list[list[int] | None]:
    """The reference code's loop for one sample: the index list is cleared before every step and set
    again only at the first step or on a shift (top int(V·(1-p)) by attention); None: the step
    attends the whole cache. The previous row is replaced at every step."""
    previous, out = None, []
    for row in rows:
        kept = None
        if previous is None or sum(a * b for a, b in zip(row, previous)) / (
                math.sqrt(sum(a * a for a in row)) * math.sqrt(sum(b * b for b in previous))) < threshold:
            count = int(len(row) * (1 - p))
            kept = sorted(sorted(range(len(row)), key=lambda i: -row[i])[:count])
        previous = row
        out.append(kept)
    return out


@pytest.mark.parametrize("row", [0, 1])
def test_reference_code_mode_attends_everything_at_steady_steps(row):
    rows = hand_rows()[:, row:row + 1]
    expected = slow_dycoke_code(rows[:, 0].tolist(), 0.7)
    assert None in expected and any(e is not None for e in expected[1:]) == (row == 0)
    method, state = DyCoke(decode_prune=0.7, decode_steady="all"), None
    assert method.adaptive_count  # views differ in length between samples: one sample at a time
    for step, attention in enumerate(rows):
        x = DecodeInput(attention, torch.arange(10)[None], (2, 5), 10, SITE, step)
        view = method.decode_view(x, state)
        view.check(x)
        assert view.keep[0].tolist() == (expected[step] if expected[step] is not None else list(range(10)))
        state = view.state
    with pytest.raises(ValueError, match="one sample at a time"):
        method.decode_view(DecodeInput(hand_rows()[1], torch.arange(10).expand(2, 10), (2, 5), 10, SITE, 1),
                           method.decode_view(DecodeInput(hand_rows()[0], torch.arange(10).expand(2, 10), (2, 5),
                                                          10, SITE, 0), None).state)


# ------------------------------------------------------------------------------- planning

def test_plan_and_budget_convention():
    plan = DyCoke().schedule(2048, 1024, VIDEO_LLAVA)
    assert plan == [(Site(Stage.PROJECTOR), 1024), (Site(Stage.DECODE, 3), int(1024 * 0.3))]
    assert layer_averaged_tokens(2048, plan, 32) == 1024  # the decode view is outside the prefill budget
    assert DyCoke().schedule(2048, 2048, VIDEO_LLAVA) == [(Site(Stage.DECODE, 3), int(2048 * 0.3))]
    assert DyCoke(decode=False).schedule(2048, 2048, VIDEO_LLAVA) == []
    assert DyCoke().needs == {"decode_attention"} and DyCoke(decode=False).needs == frozenset()


def test_refused_where_no_decode_stage_or_signal_is_offered():
    no_stage = ModelInfo("toy", frozenset({Stage.PROJECTOR, Stage.LLM}), (16, 16), 2048, VIDEO_LLAVA.arch,
                         frames=8)
    with pytest.raises(Infeasible, match="decode stage.*toy adapter.*decode=false"):
        DyCoke().schedule(2048, 1024, no_stage)
    no_signal = ModelInfo("toy", VIDEO_LLAVA.stages, (16, 16), 2048, VIDEO_LLAVA.arch, frames=8,
                          signals={Stage.PROJECTOR: frozenset(), Stage.DECODE: frozenset()})
    method = DyCoke()
    plan = method.schedule(2048, 1024, no_signal)
    with pytest.raises(Infeasible, match="decode_attention at decode, which the toy adapter"):
        check_signals(method.name, method.needs, plan, no_signal, site_needs=method.site_needs)
    check_signals(method.name, method.needs, plan[:1], no_signal, site_needs=method.site_needs)  # TTM alone is fine


# ----------------------------------------------------------------------------- on the tiny models

@functools.cache
def _video_llava(path: str, attn: str) -> VideoLlavaAdapter:
    return VideoLlavaAdapter.load(path, attn=attn)


def video_llava(request, attn: str = "sdpa") -> VideoLlavaAdapter:
    return _video_llava(str(request.getfixturevalue("tiny_video_llava_dir")), attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keeping_every_visual_entry_changes_nothing(request, attn):
    """p = 0: the view holds every entry, so tokens and logits equal the run without the decode stage
    (TTM at 50% in both; batch 2, left-padded)."""
    a = video_llava(request, attn)
    prompts = video_prompts(2)
    half = Budget(ratio=0.5)
    without = a.run(prompts, compressor=DyCoke(decode=False), budget=half, max_new_tokens=STEPS)
    every = a.run(prompts, compressor=DyCoke(decode_prune=0.0), budget=half, max_new_tokens=STEPS)
    assert torch.equal(every.tokens, without.tokens)
    assert torch.equal(every.logits, without.logits)
    for g in every.generations:
        assert g.trace.decode_layer == 1 and g.trace.decode_cached_visual == 512
        assert g.trace.decode_visual == [512] * (g.trace.generated_tokens - 1)
        assert g.trace.decode_kv_retention == (1.0 if g.trace.generated_tokens > 1 else None)
    assert all(g.trace.decode_layer is None and not g.trace.decode_visual for g in without.generations)


def stock_with_dropped_entries(a: VideoLlavaAdapter, prompts: list[Prompt], tokens: torch.Tensor, layer: int,
                               p: float, threshold: float) -> torch.Tensor:
    """Logits [B, T, V] of the stock HF model (eager) over the prompt plus ``tokens`` but the last, where
    at the row of decode step t the layers from ``layer`` on cannot see the visual entries that §18.3's
    rule (``slow_dycoke``, on layer ``layer - 1``'s attention of that row) leaves out."""
    enc = a._encode(prompts)
    batch, prompt_len = enc.input_ids.shape
    ids = torch.cat([enc.input_ids, tokens[:, :-1]], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(tokens[:, :-1])], dim=1)
    per_frame = enc.grid[0] * enc.grid[1] + 1
    video = (enc.input_ids == enc.image_token_id).nonzero()[:, 1].view(batch, enc.frames, per_frame)
    patches = video[:, :, 1:].reshape(batch, -1)  # each frame's CLS is a layout entry, always seen
    steps = tokens.shape[1] - 1
    dropped: dict[int, list[list[int]]] = {}

    def capture(module, args, output):
        weights = output[1].mean(dim=1)  # [B, S, S]
        for b in range(batch):
            rows = [weights[b, prompt_len + t, patches[b]].tolist() for t in range(steps)]
            kept = slow_dycoke(rows, p, threshold)
            dropped[b] = [sorted(set(patches[b].tolist()) - {int(patches[b][i]) for i in step}) for step in kept]

    def hide(module, args, kwargs):
        allowed = kwargs["attention_mask"].clone()
        hidden = False if allowed.dtype == torch.bool else torch.finfo(allowed.dtype).min
        for b in range(batch):
            for t in range(steps):
                allowed[b, 0, prompt_len + t, dropped[b][t]] = hidden
        kwargs["attention_mask"] = allowed
        return args, kwargs

    layers = a.model.model.language_model.layers
    hooks = [layers[layer - 1].self_attn.register_forward_hook(capture)]
    hooks += [block.register_forward_pre_hook(hide, with_kwargs=True) for block in layers[layer:]]
    try:
        with torch.no_grad():
            out = a.model(input_ids=ids, attention_mask=mask, position_ids=contiguous_positions(mask.bool()),
                          **enc.image_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return out.logits[:, prompt_len - 1:]


@pytest.mark.parametrize("p,threshold", [(0.7, 0.9), (0.5, 2.0)])  # 2.0: re-select at every step
def test_dropped_entries_equal_a_hand_masked_stock_decode(request, p, threshold):
    a = video_llava(request, "eager")
    prompts = video_prompts(2)
    method = DyCoke(decode_prune=p, decode_similarity=threshold)
    run = a.run(prompts, compressor=method, budget=ALL, max_new_tokens=STEPS)  # decode stage only
    assert run.generations[0].trace.plan == [("decode", 1, int(1024 * (1 - p)))]
    reference = stock_with_dropped_entries(a, prompts, run.tokens, 1, p, threshold)
    torch.testing.assert_close(run.logits, reference, rtol=1e-4, atol=1e-4)
    plain = a.run(prompts, max_new_tokens=STEPS)
    assert not torch.allclose(run.logits[:, 1:], plain.logits[:, 1:], atol=1e-3)  # the view mattered


class Recording(DyCoke):
    """DyCoke that records, per decode step, the step and whether it got a state."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.calls: list[tuple[int, bool]] = []

    def decode_view(self, x: DecodeInput, state) -> DecodeView:
        self.calls.append((x.step, state is None))
        return super().decode_view(x, state)


def test_state_starts_empty_for_every_generation(request):
    """The reference keeps the last attention row across samples (§18.6 quirk 3); here every generation
    starts without state, so a sample decodes the same after another sample as alone."""
    a = video_llava(request)
    first, second = video_prompts(2)
    method = Recording(decode_similarity=0.999)
    a.run([first], compressor=method, budget=ALL, max_new_tokens=STEPS)
    after = a.run([second], compressor=method, budget=ALL, max_new_tokens=STEPS)
    assert [fresh for _, fresh in method.calls] == [step == 0 for step, _ in method.calls]
    assert sum(fresh for _, fresh in method.calls) == 2
    alone = a.run([second], compressor=Recording(decode_similarity=0.999), budget=ALL, max_new_tokens=STEPS)
    assert torch.equal(after.logits, alone.logits)


def test_reference_code_mode_decodes_one_sample_at_a_time_with_whole_steady_steps(request):
    """``decode_steady=all``: the adapter runs one sample per batch, and each step's view is either a
    fresh top 30% (the first step, a shift) or every visual entry; the retention counts those whole."""
    a = video_llava(request)
    method = Recording(decode_steady="all", decode_similarity=0.999)
    assert not a.batchable(method) and a.batchable(DyCoke())
    trace = a.run(video_prompts(1), compressor=method, budget=ALL, max_new_tokens=STEPS).generations[0].trace
    top = int(1024 * 0.3)
    assert trace.decode_visual[0] == top and set(trace.decode_visual) <= {top, 1024}
    steady = a.run(video_prompts(1), compressor=DyCoke(decode_steady="all", decode_similarity=-1.0), budget=ALL,
                   max_new_tokens=STEPS).generations[0].trace  # no step counts as a shift after the first
    assert steady.decode_visual[0] == top and set(steady.decode_visual[1:]) == {1024}
    default = a.run(video_prompts(1), compressor=DyCoke(decode_similarity=-1.0), budget=ALL,
                    max_new_tokens=STEPS).generations[0].trace  # the paper's rule keeps the first view
    assert set(default.decode_visual) == {top} and steady.decode_kv_retention > default.decode_kv_retention


def test_decode_flops_count_the_view(request):
    a = video_llava(request)
    run = a.run(video_prompts(1), compressor=DyCoke(), budget=ALL, max_new_tokens=STEPS)
    trace = run.generations[0].trace
    steps = trace.generated_tokens - 1
    assert steps >= 1 and trace.probe_rows == steps
    arch = a.info().arch
    full = TokenTrace(**{k: getattr(trace, k) for k in ("n_visual", "vision", "llm_visual", "llm_total", "plan",
                                                         "prompt_tokens", "generated_tokens", "vision_frames",
                                                         "projector_tokens")})
    saved = full_flops(arch, full)["decode"] - full_flops(arch, trace)["decode"]
    dropped = 1024 - int(1024 * 0.3)
    assert saved == 2 * 2 * arch.llm_hidden * dropped * steps * (arch.llm_layers - 1)


IMAGE_FAMILIES = {"llava": (LlavaAdapter, (336, 336)), "qwen2_vl": (Qwen2VLAdapter, (224, 224)),
                  "llava_next": (LlavaNextAdapter, (150, 100)), "llava_onevision": (LlavaOnevisionAdapter, (150, 100))}


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_image_families_decode_through_the_view(request, family):
    """Every adapter with a decode loop serves the stage: p = 0 changes nothing, p = 0.7 attends 30% of
    the visual entries (LLaVA-NeXT's and -OneVision's newline tokens are layout, always attended)."""
    cls, size = IMAGE_FAMILIES[family]
    a = cls.load(str(request.getfixturevalue(f"tiny_{family}_dir")))
    texts = ["what color is the circle ?", "how many ?"]
    prompts = [Prompt(image(i, max(size)).resize(size), text) for i, text in enumerate(texts)]
    plain = a.run(prompts, max_new_tokens=4)
    every = a.run(prompts, compressor=DyCoke(decode_prune=0.0), budget=ALL, max_new_tokens=4)
    assert torch.equal(every.tokens, plain.tokens)
    torch.testing.assert_close(every.logits, plain.logits, rtol=1e-5, atol=1e-5)
    pruned = a.run(prompts, compressor=DyCoke(), budget=ALL, max_new_tokens=4)
    n = pruned.generations[0].trace.n_visual
    for g in pruned.generations:
        assert g.trace.decode_cached_visual == n
        assert all(kept == int(n * 0.3) for kept in g.trace.decode_visual)
