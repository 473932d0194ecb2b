"""Pruning through the adapters: planned counts, position ids, cached decode, signals, flash SDPA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from adapter_tools import ALL, Scripted, adapter, model_dir, prompts
from tokenbench.methods.baselines import RandomKeep
from torch.nn.attention import SDPBackend, sdpa_kernel

from tokenbench import Budget, Site, Stage
from tokenbench.adapters.prefill import contiguous_positions
from tokenbench.plugins import load_registry


def _full_positions(a, enc) -> torch.Tensor:
    return enc.positions if enc.positions is not None else contiguous_positions(enc.attention_mask.bool())


def _expected_positions(a, enc, origin: torch.Tensor, n_extra: int, policy: str) -> torch.Tensor:
    """Positions of prefix + kept visual (+ extras at the last visual slot) + suffix, per row."""
    mask = enc.attention_mask.bool()
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    n, s = enc.n_visual, enc.input_ids.shape[1]
    rows = []
    for b in range(enc.input_ids.shape[0]):
        p0 = int(start[b])
        extra = torch.full((n_extra,), p0 + n - 1)
        rows.append(torch.cat([torch.arange(p0), p0 + origin[b], extra, torch.arange(p0 + n, s)]))
    index = torch.stack(rows)
    if policy == "contiguous":
        return contiguous_positions(mask.gather(1, index))
    full = _full_positions(a, enc)
    if full.dim() == 3:
        return full.gather(2, index.expand(3, -1, -1))
    return full.gather(1, index)


PRUNE = [("llava", Site(Stage.VISION, 1), "original"), ("llava", Site(Stage.VISION_OUT), "original"),
         ("llava", Site(Stage.PROJECTOR), "contiguous"), ("llava", Site(Stage.LLM, 2), "original"),
         ("llava", Site(Stage.LLM, 2), "contiguous"), ("qwen2_vl", Site(Stage.PROJECTOR), "original"),
         ("qwen2_vl", Site(Stage.LLM, 2), "original"), ("qwen2_5_vl", Site(Stage.LLM, 1), "contiguous")]


@pytest.mark.parametrize("family,site,policy", PRUNE, ids=lambda v: f"{v.stage}{v.layer}" if isinstance(v, Site)
                         else str(v))
def test_pruning_follows_the_plan_and_position_policy(request, family, site, policy):
    a = adapter(family, model_dir(request, family), "sdpa")
    batch = prompts(family, 2)
    merge = site.stage is Stage.VISION
    extra = 0 if merge else 2
    compressor = Scripted(site, stride=2, positions=policy, merge=merge, proportional=merge, extra=extra)
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=3)
    enc = a._encode(batch)
    n = enc.n_visual
    kept = compressor.kept(n)
    layers = len(a._decoder().layers)
    start = site.layer if site.stage is Stage.LLM else 0
    for g in run.generations:
        assert g.trace.plan == [(str(site.stage), site.layer, kept)]
        assert g.trace.llm_visual == [n] * start + [kept + extra] * (layers - start)
        assert g.trace.realised_tokens == pytest.approx((n * start + (kept + extra) * (layers - start)) / layers)
        if merge:
            assert g.trace.vision == [n + 1] * site.layer + [kept + 1] * (a.vision_blocks - site.layer)
    origin = torch.arange(0, n, 2).expand(2, -1)
    expected = _expected_positions(a, enc, origin, extra, policy if family == "llava" else "original")
    for layer in range(start, layers):
        assert torch.equal(run.layer_positions[layer], expected)
    for layer in range(start):
        assert torch.equal(run.layer_positions[layer], _full_positions(a, enc))
    if merge:
        sizes = compressor.seen[0].x.sizes
        assert torch.equal(sizes, torch.ones_like(sizes))


def _extended(enc, tokens: torch.Tensor):
    """``enc`` with ``tokens`` [B, k] appended (positions continue from each row's last one)."""
    k = tokens.shape[1]
    ids = torch.cat([enc.input_ids, tokens], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(tokens)], dim=1)
    positions = None
    if enc.positions is not None:
        step = torch.arange(1, k + 1)
        positions = torch.cat([enc.positions, enc.positions.max(dim=0).values.max(dim=1).values[None, :, None]
                               .expand(3, -1, k) + step], dim=2)
    return dataclasses.replace(enc, input_ids=ids, attention_mask=mask, positions=positions)


@pytest.mark.parametrize("family,policy,batch", [("llava", "original", 2), ("llava", "contiguous", 1),
                                                 ("qwen2_vl", "original", 2), ("qwen2_5_vl", "original", 1)])
def test_cached_decode_after_llm_pruning_matches_recompute(request, family, policy, batch):
    """Decoding on the per-layer shortened cache equals re-running the pruned prefill without cache."""
    a = adapter(family, model_dir(request, family), "sdpa")
    enc = a._encode(prompts(family, batch))
    make = lambda: Scripted(Site(Stage.LLM, 2), stride=3, positions=policy,
                            needs=frozenset({"attention"}))
    run = a.run_encoded(enc, compressor=make(), budget=ALL, max_new_tokens=4)
    for k in range(1, run.tokens.shape[1]):
        again = a.run_encoded(_extended(enc, run.tokens[:, :k]), compressor=make(), budget=ALL, max_new_tokens=1)
        assert torch.equal(again.tokens[:, 0], run.tokens[:, k])
        torch.testing.assert_close(again.logits[:, 0], run.logits[:, k], rtol=1e-4, atol=1e-4)


def _stock_attentions(a, enc):
    kwargs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.image_inputs)
    if enc.positions is not None:
        kwargs["mm_token_type_ids"] = (enc.input_ids == enc.image_token_id).int()
    with torch.no_grad():
        return a.model(**kwargs, output_attentions=True).attentions


@pytest.mark.parametrize("family,queries,batch", [("llava", "last", 2), ("llava", "text", 1), ("llava", "all", 1),
                                                  ("qwen2_vl", "last", 2), ("qwen2_vl", "text", 1),
                                                  ("qwen2_5_vl", "last", 2)])
def test_llm_signals_match_the_stock_eager_attention(request, family, queries, batch):
    """The probe's rows equal the head-mean of the stock eager attention map of the layer before."""
    a = adapter(family, model_dir(request, family), "eager")
    batch_prompts = prompts(family, batch)
    needs = frozenset({"attention", "keys"} | ({"text"} if batch == 1 else set()))
    compressor = Scripted(Site(Stage.LLM, 2), needs=needs, queries=queries)
    run = a.run(batch_prompts, compressor=compressor, budget=ALL, max_new_tokens=1)
    enc = a._encode(batch_prompts)
    n, s = enc.n_visual, enc.input_ids.shape[1]
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    visual = start[:, None] + torch.arange(n)
    rows = {"last": torch.full((batch, 1), s - 1), "all": torch.arange(s).expand(batch, s),
            "text": torch.arange(int(start[0]) + n, s).expand(batch, -1)}[queries]
    reference = _stock_attentions(a, enc)[1].mean(dim=1)  # layer 1 runs just before the site
    reference = reference.gather(1, rows[..., None].expand(-1, -1, s)).gather(
        2, visual[:, None].expand(-1, rows.shape[1], -1))
    x = compressor.seen[0].x
    torch.testing.assert_close(x.attention, reference, rtol=1e-4, atol=1e-5)
    head_dim = a.model.config.text_config.hidden_size // a.model.config.text_config.num_attention_heads
    assert x.keys.shape == (batch, n, head_dim)
    trace = run.generations[0].trace
    if queries == "all":
        assert trace.probe_rows == 0 and trace.eager_attention_calls > len(a._decoder().layers)
    else:
        assert trace.probe_rows == rows.shape[1]
    if batch == 1:  # the text entering layer 2: layer 1's output
        hidden = _stock_hidden_states(a, enc)[0][2]
        torch.testing.assert_close(x.text, hidden[:, int(start[0]) + n:], rtol=1e-4, atol=1e-5)


def _stock_hidden_states(a, enc):
    kwargs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.image_inputs)
    if enc.positions is not None:
        kwargs["mm_token_type_ids"] = (enc.input_ids == enc.image_token_id).int()
    else:  # left padding: positions count the valid tokens, as generate() and the adapter do
        kwargs["position_ids"] = contiguous_positions(enc.attention_mask.bool())
    with torch.no_grad():
        out = a.model(**kwargs, output_hidden_states=True, output_attentions=True, use_cache=True)
    return out.hidden_states, out.attentions, out.past_key_values


@pytest.mark.parametrize("family,source", [("llava", "previous"), ("llava", "next"), ("qwen2_vl", "previous"),
                                           ("qwen2_vl", "next")])
def test_llm_state_signals_carry_the_states_of_the_right_layer(request, family, source):
    """At a site before layer 3, on a left-padded batch of two text lengths: ``text`` holds layer 2's
    output at the text rows, ``final_norm`` those rows and the visual ones through the final norm,
    ``input_states`` the decoder's input embeddings, ``key_l1`` the L1 norm of the cached keys of
    layer 2 (``previous``) or 3 (``next``), and ``attention`` that same layer's row; text rows are
    right-aligned with ``text_valid`` marking each row's own text."""
    site_layer = 3
    a = adapter(family, model_dir(request, family), "eager")
    batch_prompts = prompts(family, 2)
    needs = frozenset({"attention", "text", "key_l1", "final_norm", "input_states"})
    compressor = Scripted(Site(Stage.LLM, site_layer), needs=needs, source=source)
    a.run(batch_prompts, compressor=compressor, budget=ALL, max_new_tokens=1)
    x = compressor.seen[0].x
    enc = a._encode(batch_prompts)
    hidden, attentions, cache = _stock_hidden_states(a, enc)
    n, s = enc.n_visual, enc.input_ids.shape[1]
    start = (enc.input_ids == enc.image_token_id).int().argmax(dim=1)
    visual = start[:, None] + torch.arange(n)
    text_length = s - int((start + n).min())
    text = torch.arange(s - text_length, s).expand(2, -1)
    valid = text >= (start + n)[:, None]
    assert torch.equal(x.text_valid, valid) and not bool(valid.all())

    def rows(tensor, index):
        return tensor.gather(1, index.reshape(*index.shape, *[1] * (tensor.dim() - 2)).expand(
            *index.shape, *tensor.shape[2:]))

    def close(signal, reference, mask=None):
        if mask is not None:
            signal, reference = signal[mask], reference[mask]
        torch.testing.assert_close(signal, reference, rtol=1e-4, atol=1e-5)

    entering = hidden[site_layer]  # the output of layer site_layer - 1
    norm = a._decoder().norm
    close(x.text, rows(entering, text), valid)
    close(x.normed_text, norm(rows(entering, text)), valid)
    close(x.normed_visual, norm(rows(entering, visual)))
    close(x.input_text, rows(hidden[0], text), valid)
    close(x.input_visual, rows(hidden[0], visual))
    source_layer = site_layer - 1 if source == "previous" else site_layer
    l1 = cache.layers[source_layer].keys.abs().sum(dim=(1, 3))  # post-RoPE, heads concatenated
    close(x.key_l1, rows(l1, visual))
    close(x.text_key_l1, rows(l1, text), valid)
    row = attentions[source_layer].mean(dim=1)[:, -1]
    close(x.attention[:, 0], rows(row, visual))


def test_cls_attention_matches_the_stock_vision_tower(request):
    a = adapter("llava", model_dir(request, "llava"), "eager")
    batch = prompts("llava", 2)
    compressor = Scripted(Site(Stage.VISION_OUT), needs=frozenset({"cls_attention", "keys"}))
    a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    pixels = a._encode(batch).image_inputs["pixel_values"]
    with torch.no_grad():
        maps = a.model.model.vision_tower(pixels, output_attentions=True).attentions
    reference = maps[a.vision_blocks - 1].mean(dim=1)[:, 0, 1:]
    x = compressor.seen[0].x
    torch.testing.assert_close(x.cls_attention, reference, rtol=1e-4, atol=1e-6)
    assert x.keys.shape == (2, 576, a.model.config.vision_config.hidden_size // 2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_flash_sdpa_backend_native_and_probe(request, family):
    """Under the flash SDPA backend only, a native method runs with no eager attention anywhere and a
    probe method runs too, its probe rows in the trace."""
    a = adapter(family, model_dir(request, family), "sdpa")
    batch = prompts(family, 1)
    probe = Scripted(Site(Stage.LLM, 2), stride=2, needs=frozenset({"attention"}))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        native = a.generate(batch, compressor=RandomKeep(), budget=Budget.parse("22.2%"), max_new_tokens=3)
        probed = a.generate(batch, compressor=probe, budget=ALL, max_new_tokens=3)
    assert RandomKeep().flash_attention == "native" and probe.flash_attention == "probe"
    assert native[0].trace.eager_attention_calls == 0 and native[0].trace.probe_rows == 0
    assert native[0].trace.llm_visual[0] == round(0.222 * native[0].trace.n_visual)
    assert probed[0].trace.eager_attention_calls == 0 and probed[0].trace.probe_rows == 1


def test_unsupported_stage_is_a_clear_error(request):
    from tokenbench.adapters.base import AdapterError

    a = adapter("qwen2_vl", model_dir(request, "qwen2_vl"), "sdpa")
    with pytest.raises(AdapterError, match="does not offer"):
        a.generate(prompts("qwen2_vl", 1), compressor=Scripted(Site(Stage.VISION, 1)), budget=ALL)


BUDGETS = {"llava": ["192", "128", "64"], "qwen2_vl": ["33.3%", "22.2%", "11.1%"]}


@pytest.mark.parametrize("method", ["random", "apet"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_end_to_end_methods_at_paper_budgets(request, family, method):
    registry = load_registry()
    if method not in registry.compressors:
        pytest.skip(f"method '{method}' is not registered yet (its plugin: {registry.problems})")
    a = adapter(family, model_dir(request, family), "sdpa")
    batch = prompts(family, 2)
    for text in BUDGETS[family]:
        budget = Budget.parse(text)
        compressor = registry.compressor(method)()
        out = a.generate(batch, compressor=compressor, budget=budget, max_new_tokens=3)
        assert len(out) == 2
        for g in out:
            target = budget.target(g.trace.n_visual)
            assert g.trace.plan, "a compressing method must plan at least one site"
            assert g.trace.realised_tokens <= target + 1.0 + 1e-6
            assert g.trace.realised_tokens >= 0.5 * target
            assert 1 <= g.trace.generated_tokens <= 3
            assert set(g.timings_ms) == {"vision", "prefill", "decode"}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_site_before_layer_zero_reads_layer_zero(request, family):
    """An llm site at layer 0 has no layer before it: its attention is layer 0's on the input."""
    a = adapter(family, model_dir(request, family), "eager")
    batch = prompts(family, 1)
    compressor = Scripted(Site(Stage.LLM, 0), stride=2, needs=frozenset({"attention", "keys"}))
    run = a.run(batch, compressor=compressor, budget=ALL, max_new_tokens=1)
    enc = a._encode(batch)
    start = int((enc.input_ids == enc.image_token_id).int().argmax())
    reference = _stock_attentions(a, enc)[0].mean(dim=1)[:, -1:, start:start + enc.n_visual]
    torch.testing.assert_close(compressor.seen[0].x.attention, reference, rtol=1e-4, atol=1e-5)
    assert run.generations[0].trace.llm_visual[0] == compressor.kept(enc.n_visual)


def test_infeasible_propagates_to_the_caller(request):
    from tokenbench import Infeasible

    a = adapter("llava", model_dir(request, "llava"), "sdpa")
    with pytest.raises(Infeasible):
        a.generate(prompts("llava", 1), compressor=RandomKeep(), budget=Budget(ratio=0.0001))


def test_unbatchable_methods_run_one_sample_at_a_time(request):
    """``text`` signals differ in length between padded rows: generate() splits the batch, and the
    answers equal those of single-sample calls."""
    a = adapter("llava", model_dir(request, "llava"), "sdpa")
    make = lambda: Scripted(Site(Stage.LLM, 2), stride=2, needs=frozenset({"attention", "text"}),
                            queries="text")
    assert not a.batchable(make()) and a.batchable(Scripted(Site(Stage.LLM, 2), needs=frozenset({"attention"})))
    batch = prompts("llava", 2)
    together = a.generate(batch, compressor=make(), budget=ALL, max_new_tokens=3)
    alone = [a.generate([p], compressor=make(), budget=ALL, max_new_tokens=3)[0] for p in batch]
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.trace.probe_rows for g in together] == [g.trace.probe_rows for g in alone]
    assert together[0].trace.probe_rows != together[1].trace.probe_rows  # different text lengths


def test_bfloat16_generation_runs(request):
    from tokenbench.adapters.llava import LlavaAdapter

    a = LlavaAdapter.load(model_dir(request, "llava"), dtype=torch.bfloat16, attn="sdpa")
    compressor = Scripted(Site(Stage.LLM, 2), stride=2, needs=frozenset({"attention", "keys"}))
    out = a.generate(prompts("llava", 2), compressor=compressor, budget=ALL, max_new_tokens=2)
    assert a.dtype == torch.bfloat16 and compressor.seen[0].x.visual.dtype == torch.bfloat16
    assert all(g.trace.llm_visual[-1] == 288 for g in out)


class RecordingRandom(RandomKeep):
    """RandomKeep that remembers, per image, which original tokens it kept."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.kept: list[tuple[float, list[int]]] = []

    def reduce(self, x):
        result = super().reduce(x)
        for row in range(x.visual.shape[0]):
            fingerprint = float(x.visual[row].float().sum())
            self.kept.append((fingerprint, x.origin[row, result.keep[row]].tolist()))
        return result


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_stochastic_draws_do_not_depend_on_batch_position(request, family):
    a = adapter(family, model_dir(request, family), "sdpa")
    batch = prompts(family, 2)
    forward, backward = RecordingRandom(), RecordingRandom()
    a.generate(batch, compressor=forward, budget=Budget.parse("22.2%"), max_new_tokens=1, seed=3)
    a.generate(batch[::-1], compressor=backward, budget=Budget.parse("22.2%"), max_new_tokens=1, seed=3)
    assert sorted(forward.kept) == sorted(backward.kept)
