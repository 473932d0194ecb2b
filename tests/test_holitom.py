"""HoliTom's outer part (spec methods-wave2.md §17.3, tests §17.8) against a slow re-implementation."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from tokenbench.methods.holitom import HoliTom, segment_frames, window_savings

from tokenbench import Infeasible, ModelInfo, Site, SiteInput, Stage, layer_averaged_tokens
from tokenbench.compressor import check_signals
from tokenbench.testing import LLAVA_15, QWEN2_VL, VIDEO_LLAVA, check_compressor

LLAVA_OV = ModelInfo(family="llava_onevision", stages=frozenset({Stage.PROJECTOR, Stage.LLM}), grid=(14, 14),
                     n_visual=8 * 196, arch=VIDEO_LLAVA.arch, frames=8,
                     signals={Stage.PROJECTOR: frozenset({"attention_received"})})


def scene_video(batch: int, n: int, width: int = 32, seed: int = 0, cuts=(0, 5, 8)) -> torch.Tensor:
    """Frames in scenes (frames cuts[j]..cuts[j+1]-1): in each scene ~60% of the positions are static
    (a shared token plus small noise), the others change every frame."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for start, end in itertools.pairwise(cuts):
        base = torch.randn(batch, n, width, generator=gen)
        static = (torch.rand(batch, n, 1, generator=gen) < 0.6).float()
        for _ in range(start, end):
            fresh = torch.randn(batch, n, width, generator=gen)
            frames.append(static * (base + 0.2 * torch.randn(batch, n, width, generator=gen)) + (1 - static) * fresh)
    return torch.stack(frames, dim=1).reshape(batch, -1, width)


def site_input(x: torch.Tensor, keep: int, frames: int, grid, seed: int = 0) -> SiteInput:
    batch, n, _ = x.shape
    attention = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed + 7))
    return SiteInput(visual=x, origin=torch.arange(n).expand(batch, n).clone(), grid=grid, keep=keep,
                     site=Site(Stage.PROJECTOR), frames=frames, attention_received=attention)


# ---- the slow re-implementation, one numbered step of §17.3 at a time, Python loops, float64 ----

def _cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def _dpc_merge(tokens, clusters, k_neighbors, beta, no_beta):
    """Step 7: DPC-kNN (density ties: lower index is denser), nearest-centre assignment, beta merge."""
    m, dims = len(tokens), tokens[0].numel()
    dist = [[float((tokens[i] - tokens[j]).norm()) / math.sqrt(dims) for j in range(m)] for i in range(m)]
    k = min(k_neighbors, clusters)
    density = [math.exp(-sum(d * d for d in sorted(row)[:k]) / k) for row in dist]
    largest = max(max(row) for row in dist)
    delta = []
    for i in range(m):
        denser = [dist[i][j] for j in range(m)
                  if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else largest)
    score = [delta[i] * density[i] for i in range(m)]
    centres = sorted(sorted(range(m), key=lambda i: -score[i])[:clusters])
    members = {c: [] for c in centres}
    for i in range(m):
        if i not in members:
            members[min(centres, key=lambda c: (dist[i][c], centres.index(c)))].append(i)
    merged = []
    for c in centres:
        if not members[c]:
            merged.append(tokens[c])
        elif no_beta:
            merged.append(sum([tokens[c]] + [tokens[i] for i in members[c]]) / (1 + len(members[c])))
        else:
            merged.append(beta * tokens[c] + (1 - beta) * sum(tokens[i] for i in members[c]) / len(members[c]))
    return centres, merged


def slow_holitom(x, attention, frames, keep, tau=0.8, beta=0.6, contextual=0.0, k_neighbors=7,
                 no_beta=False, max_window=1024):
    n = x.shape[0] // frames
    video = [[x[t * n + i].double() for i in range(n)] for t in range(frames)]
    attn = [[float(attention[t * n + i]) for i in range(n)] for t in range(frames)]
    # 1. consecutive-frame similarity
    sim = [[_cos(video[f][i], video[f + 1][i]) for i in range(n)] for f in range(frames - 1)]

    # 2. window value
    def static_positions(s, e):
        return [i for i in range(n) if all(sim[f][i] > tau for f in range(s, e))]

    def value(s, e):
        return len(static_positions(s, e)) * (e - s)

    # 3. dynamic programme and backtracking
    dp, prev = [], []
    for i in range(frames):
        best, start = (dp[i - 1] if i else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            cand = (dp[j] if j >= 0 else 0) + value(j + 1, i)
            if cand > best:
                best, start = cand, j + 1
        dp.append(best)
        prev.append(start)
    segments, i = [], frames - 1
    while i >= 0:
        segments.insert(0, (prev[i], i))
        i = prev[i] - 1
    saved = dp[-1]
    # 4./5. groups: a segment's static positions (mean over its frames), then each frame's dynamic ones
    groups = []
    for s, e in segments:
        static = static_positions(s, e) if e > s else []
        if static:
            groups.append(("static", s, static, [sum(video[t][i] for t in range(s, e + 1)) / (e - s + 1)
                                                 for i in static]))
        dynamic = [i for i in range(n) if i not in static]
        groups += [("dynamic", t, dynamic, None) for t in range(s, e + 1)]
    # shares of ρ' = keep / (F·n − R), capped at 1, by largest remainders (earlier groups on ties)
    remaining = frames * n - saved
    if keep >= remaining:
        shares = [len(g[2]) for g in groups]
    else:
        exact = [Fraction(len(g[2]) * keep, remaining) for g in groups]
        shares = [math.floor(q) for q in exact]
        for g in sorted(range(len(groups)), key=lambda g: -(exact[g] - shares[g]))[: keep - sum(shares)]:
            shares[g] += 1
    # 6./7. per group
    out = {}
    for (kind, t, positions, static_tokens), share in zip(groups, shares):
        if not share:
            continue
        if kind == "static":
            centres, merged = _dpc_merge(static_tokens, share, k_neighbors, beta, no_beta)
            out.update({t * n + positions[c]: v for c, v in zip(centres, merged)})
            continue
        dominant = round(share * (1 - contextual))
        ranked = sorted(positions, key=lambda i: -attn[t][i])
        out.update({t * n + i: video[t][i] for i in ranked[:dominant]})
        if share - dominant:
            rest = sorted(ranked[dominant:])
            centres, merged = _dpc_merge([video[t][i] for i in rest], share - dominant, k_neighbors, beta, no_beta)
            out.update({t * n + rest[c]: v for c, v in zip(centres, merged)})
    kept = sorted(out)
    return kept, torch.stack([out[i] for i in kept]), segments


# ---- tests ----

@pytest.mark.parametrize("batch", [1, 3])
def test_matches_the_slow_reference_on_video_llava_shapes(batch):
    x = scene_video(batch, 256)
    inp = site_input(x, 256, 8, (16, 16))
    out = HoliTom().reduce(inp)
    for b in range(batch):
        kept, values, segments = slow_holitom(x[b], inp.attention_received[b], 8, 256)
        assert segments == [(0, 4), (5, 7)]
        assert out.keep[b].tolist() == kept
        torch.testing.assert_close(out.values[b].double(), values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{"contextual": 0.5}, {"no_beta": True, "tau": 0.9, "k_neighbors": 3},
                                     {"max_window": 2}])
def test_matches_the_slow_reference_on_llava_onevision_shapes(options):
    x = scene_video(1, 196, cuts=(0, 2, 3, 8), seed=4)
    inp = site_input(x, 196, 8, (14, 14), seed=4)
    out = HoliTom(**options).reduce(inp)
    kept, values, _ = slow_holitom(x[0], inp.attention_received[0], 8, 196, **options)
    assert out.keep[0].tolist() == kept
    torch.testing.assert_close(out.values[0].double(), values, rtol=1e-5, atol=1e-5)


def test_dynamic_programme_matches_brute_force_on_random_savings():
    """The DP finds the best split (checked against every split of 7 frames)."""
    gen = torch.Generator().manual_seed(0)
    similarity = torch.rand(6, 40, generator=gen) * 0.3 + 0.7
    savings = window_savings(similarity, 0.8)
    segments, saved = segment_frames(savings, 1024)

    def best(start):
        if start == 7:
            return 0
        return max(savings[start, end].item() + best(end + 1) for end in range(start, 7))
    assert saved == best(0)
    assert segments[0][0] == 0 and segments[-1][1] == 6
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(segments))
    assert saved == sum(savings[s, e].item() for s, e in segments)


def test_identical_frames_form_one_static_segment():
    """§17.8 (a): one segment, every position static, ≈ ρ·F·n tokens, all in the first frame."""
    x = torch.randn(1, 1, 256, 32).expand(1, 8, 256, 32).reshape(1, 2048, 32)
    out = HoliTom().reduce(site_input(x, 128, 8, (16, 16)))
    assert out.keep.shape[1] == 128 and int(out.keep.max()) < 256
    capped = HoliTom().reduce(site_input(x, 512, 8, (16, 16)))  # more than the collapse leaves: keep all 256
    assert capped.keep[0].tolist() == list(range(256))
    torch.testing.assert_close(capped.values, x[:, :256])


def test_independent_frames_are_single_frame_segments():
    """§17.8 (b): F segments; each frame keeps its most-attended tokens."""
    x = torch.randn(1, 2048, 32, generator=torch.Generator().manual_seed(2))
    inp = site_input(x, 256, 8, (16, 16))
    out = HoliTom().reduce(inp)
    expected = torch.cat([inp.attention_received[0, t * 256:(t + 1) * 256].topk(32).indices.sort().values + t * 256
                          for t in range(8)])
    assert out.keep[0].tolist() == expected.tolist()
    torch.testing.assert_close(out.values, x[:, expected])


def test_an_image_is_a_top_k_on_received_attention():
    x = torch.randn(2, 576, 32)
    inp = site_input(x, 64, 1, (24, 24))
    out = HoliTom().reduce(inp)
    assert out.keep.tolist() == inp.attention_received.topk(64, dim=1).indices.sort(dim=1).values.tolist()


def test_plan_site_follows_the_served_signal_and_meets_the_budget():
    assert HoliTom().schedule(1568, 196, LLAVA_OV) == [(Site(Stage.PROJECTOR), 196)]
    llava_video = ModelInfo(family="video_llava", stages=VIDEO_LLAVA.stages, grid=(16, 16), n_visual=2048,
                            arch=VIDEO_LLAVA.arch, frames=8,
                            signals={Stage.VISION_OUT: frozenset({"attention_received"})})
    for budget in (512, 256, 204.8):
        plan = HoliTom().schedule(2048, budget, llava_video)
        assert plan[0][0] == Site(Stage.VISION_OUT) and abs(plan[0][1] - budget) <= 0.02 * budget
    assert HoliTom().schedule(2048, 2048, VIDEO_LLAVA) == []


def test_degenerate_inputs():
    x = scene_video(2, 64, cuts=(0, 4, 8))
    assert torch.equal(HoliTom().reduce(site_input(x, 512, 8, (8, 8))).keep, torch.arange(512).expand(2, 512))
    assert HoliTom().reduce(site_input(x, 1, 8, (8, 8))).keep.shape == (2, 1)
    bad = x.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        HoliTom().reduce(site_input(bad, 64, 8, (8, 8)))
    ragged = torch.cat([torch.randn(1, 1, 64, 32).expand(1, 8, 64, 32).reshape(1, 512, 32),
                        torch.randn(1, 512, 32)])
    with pytest.raises(ValueError, match="one video at a time"):
        HoliTom().reduce(site_input(ragged, 128, 8, (8, 8)))
    inp = site_input(x, 64, 8, (8, 8))
    inp.attention_received = None
    with pytest.raises(ValueError, match="attention_received"):
        HoliTom().reduce(inp)


def test_contract_and_class():
    assert HoliTom().flash_attention == "probe" and HoliTom.needs == {"attention_received"}
    check_compressor(HoliTom, models=[VIDEO_LLAVA, LLAVA_OV, LLAVA_15, QWEN2_VL])


# ---- the inner-LLM merge (§17.4) ----

def slow_inner_merge(hidden, attention, keep):
    """§17.4 step 2 literally: top-``keep`` by the last row's attention; each dropped token, in index
    order, halves itself into its most cosine-similar survivor (similarities taken before merging)."""
    rows = [h.double().clone() for h in hidden]
    ranked = sorted(range(len(rows)), key=lambda i: -float(attention[i]))
    kept = sorted(ranked[:keep])
    nearest = {u: max(kept, key=lambda t: (_cos(rows[u], rows[t]), -kept.index(t))) for u in ranked[keep:]}
    for u in sorted(ranked[keep:]):
        rows[nearest[u]] = (rows[nearest[u]] + rows[u]) / 2
    return kept, torch.stack([rows[t] for t in kept])


@pytest.mark.parametrize("batch", [1, 3])
def test_inner_merge_matches_the_sequential_reference(batch):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, 300, 48, generator=gen)
    attention = torch.rand(batch, 1, 300, generator=gen)
    x = SiteInput(visual=hidden, origin=torch.arange(300).expand(batch, 300).clone(), grid=(16, 16), keep=150,
                  site=Site(Stage.LLM, 18), attention=attention)
    out = HoliTom(inner_merge=True).reduce(x)
    for b in range(batch):
        kept, values = slow_inner_merge(hidden[b], attention[b, 0], 150)
        assert out.keep[b].tolist() == kept
        torch.testing.assert_close(out.values[b].double(), values, rtol=1e-5, atol=1e-6)


def test_inner_merge_plan_meets_the_budget_and_keeps_positions():
    qwen2_7b = ModelInfo(family="llava_onevision", stages=LLAVA_OV.stages, grid=(14, 14), n_visual=32 * 196,
                         arch=QWEN2_VL.arch.__class__(**{**QWEN2_VL.arch.__dict__, "llm_layers": 28}), frames=32,
                         signals={Stage.PROJECTOR: frozenset({"attention_received"}),
                                  Stage.LLM: frozenset({"attention"})})
    method = HoliTom(inner_merge=True)
    assert method.positions == "original" and method.flash_attention == "probe"
    for fraction in (0.25, 0.15, 0.10):
        budget = fraction * qwen2_7b.n_visual
        plan = method.schedule(qwen2_7b.n_visual, budget, qwen2_7b)
        (outer_site, outer), (inner_site, inner) = plan
        assert outer_site == Site(Stage.PROJECTOR) and inner_site == Site(Stage.LLM, 18)
        assert inner == round(outer / 2)
        assert abs(layer_averaged_tokens(qwen2_7b.n_visual, plan, 28) - budget) <= 0.02 * budget
        check_signals("holitom", method.needs, plan, qwen2_7b, site_needs=method.site_needs)
    with pytest.raises(Infeasible, match="attention"):  # without site_needs every site would be asked for both
        check_signals("holitom", method.needs, plan, qwen2_7b)
    with pytest.raises(Infeasible, match="inner_merge=false"):
        method.schedule(qwen2_7b.n_visual, 0.9 * qwen2_7b.n_visual, qwen2_7b)
    assert HoliTom(inner_merge=True, inner_ratio=0.0).reduce(SiteInput(
        visual=torch.randn(1, 10, 4), origin=torch.arange(10).unsqueeze(0), grid=(4, 4), keep=10,
        site=Site(Stage.LLM, 18), attention=torch.rand(1, 1, 10))).values is None  # r = 0: a no-op (§17.8c)


def test_inner_merge_contract():
    check_compressor(HoliTom, {"inner_merge": True}, models=[VIDEO_LLAVA, QWEN2_VL])
