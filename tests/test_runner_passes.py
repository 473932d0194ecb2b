"""Issue 22, the runner's side: images decoded once per run, one interleaved efficiency pass with
paired speed-ups, one fsync per written batch, ``--threads``, and the vectorised bootstrap."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tokenbench.results
import tokenbench.runner
from tokenbench.cli import cli
from tokenbench.measure import Timer
from tokenbench.results import SampleStore
from tokenbench.speedup import paired_speedup
from tokenbench.stats import bootstrap_relative, compare

PLUGINS = Path(__file__).parent / "test_runner_plugins"


# ------------------------------------------------------------------------------------- bootstrap

def _records(scores: list[float], groups: list[str] | None = None) -> list[dict]:
    return [{"sample_id": f"s{i}", "prediction": str(s), "scores": {"correct": s},
             "meta": {"group": groups[i]} if groups else {}} for i, s in enumerate(scores)]


def _mean_percent(records):
    return {"accuracy": 100.0 * sum(r["scores"]["correct"] for r in records) / len(records)}


def test_the_vectorised_bootstrap_gives_the_per_replicate_interval():
    """Same seed, same resample indices: the interval of the vectorised path equals the one from
    calling the task's aggregation per replicate (exactly for 0/1 scores)."""
    rng = random.Random(3)
    baseline = _records([float(rng.random() < 0.8) for _ in range(60)])
    method = _records([float(rng.random() < 0.6) for _ in range(60)])
    for seed in (0, 7):
        slow = bootstrap_relative(method, baseline, _mean_percent, "accuracy", seed=seed)
        fast = bootstrap_relative(method, baseline, _mean_percent, "accuracy", seed=seed,
                                  per_sample_score="correct")
        assert slow is not None and fast == slow
    fractional_base = _records([rng.random() for _ in range(40)], [f"g{i // 2}" for i in range(40)])
    fractional = _records([rng.random() for _ in range(40)], [f"g{i // 2}" for i in range(40)])
    slow = bootstrap_relative(fractional, fractional_base, _mean_percent, "accuracy", seed=1, unit=("group",))
    fast = bootstrap_relative(fractional, fractional_base, _mean_percent, "accuracy", seed=1, unit=("group",),
                              per_sample_score="correct")
    assert fast == pytest.approx(slow, rel=1e-12, abs=0)


def test_the_vectorised_bootstrap_never_calls_the_aggregation_per_replicate():
    calls = []

    def counting(records):
        calls.append(len(records))
        return _mean_percent(records)

    baseline, method = _records([1.0, 1.0, 0.0, 1.0] * 10), _records([1.0, 0.0, 0.0, 1.0] * 10)
    fast = compare(method, baseline, counting, "accuracy", seed=0, per_sample_score="correct")
    assert len(calls) == 2  # the relative score itself, once per run
    calls.clear()
    slow = compare(method, baseline, counting, "accuracy", seed=0)
    assert len(calls) > 1000 and slow == fast  # the fallback for metrics that are not a mean


def test_tasks_declare_the_score_their_metric_averages_and_only_those():
    from tokenbench.tasks.benchmarks import GQA, MME, MMBench, Pope, ScienceQAImg, SEEDBench, TextVQA, VizWiz
    from tokenbench.tasks.shapes import ShapesTask

    rng = random.Random(0)
    for cls in (ShapesTask, GQA, TextVQA, VizWiz, ScienceQAImg, SEEDBench):
        key = cls.per_sample_score
        records = [{"sample_id": f"s{i}", "scores": {key: rng.choice([0.0, 1.0, 0.3])},
                    "meta": {"family": "colour", "unanswerable": i % 2 == 0}} for i in range(20)]
        mean = 100.0 * sum(r["scores"][key] for r in records) / len(records)
        assert cls().aggregate(records)[cls.primary_metric] == pytest.approx(mean), cls.name
    assert Pope.per_sample_score is MME.per_sample_score is MMBench.per_sample_score is None


def test_paired_speedup_pairs_runs_of_the_same_sample_and_round():
    baseline = [{"sample": s, "repeat": r, "vision": 1.0, "prefill": 9.0 * (r + 1), "end_to_end": 20.0}
                for r in range(2) for s in range(2)]
    arm = [{"sample": s, "repeat": r, "vision": 1.0, "prefill": 4.0 * (r + 1), "end_to_end": 10.0}
           for r in range(2) for s in range(2)][::-1]  # order does not matter, the pairing does
    result = paired_speedup(baseline, arm)
    assert result["pairs"] == 4 and result["end_to_end"] == 2.0 and result["end_to_end_range"] == [2.0, 2.0]
    assert result["ttft_range"] == [10 / 5, 19 / 9] and result["ttft"] == pytest.approx((2 + 19 / 9) / 2)
    assert paired_speedup(baseline, [{"sample": 5, "repeat": 0, "end_to_end": 1.0}]) is None


# --------------------------------------------------------------------------------------- fsync

def test_a_batch_is_written_with_one_fsync_and_reads_back_whole(tmp_path, monkeypatch):
    synced = []
    real_fsync = tokenbench.results.os.fsync
    monkeypatch.setattr(tokenbench.results.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "samples.jsonl"
    with SampleStore(path) as store:
        store.extend({"key": f"k{i}", "kind": "sample"} for i in range(5))
        store.extend([])
        assert len(synced) == 1
        store.append({"key": "k5", "kind": "sample"})
        assert len(synced) == 2
    with SampleStore(path) as store:
        assert sorted(store.records) == [f"k{i}" for i in range(6)]


# ---------------------------------------------------------------------------------- the harness

class _Spy:
    """Which arms the efficiency pass timed, in order, and how often the store fsync'ed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.timed: list[str] = []
        self.fsyncs = 0
        self.fail_at: tuple[str, int] | None = None  # (arm label, timed call): raise there
        self._timing = False
        spy = self
        generate = tokenbench.runner.Harness._generate

        class LoggingTimer(Timer):
            @contextlib.contextmanager
            def measure(self):
                spy._timing = True
                try:
                    with super().measure():
                        yield
                finally:
                    spy._timing = False

        def logging_generate(harness, prompts, compressor, arm, task):
            if spy._timing:
                spy.timed.append(arm.label)
                if spy.fail_at == (arm.label, spy.timed.count(arm.label)):
                    raise RuntimeError("timing broke")
            return generate(harness, prompts, compressor, arm, task)

        real_fsync = tokenbench.results.os.fsync

        def counting_fsync(fd):
            spy.fsyncs += 1
            real_fsync(fd)

        monkeypatch.setattr(tokenbench.runner, "Timer", LoggingTimer)
        monkeypatch.setattr(tokenbench.runner.Harness, "_generate", logging_generate)
        monkeypatch.setattr(tokenbench.results.os, "fsync", counting_fsync)

    def reset(self) -> None:
        self.timed, self.fsyncs = [], 0


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(model: Path, output: Path, budgets: str, env: dict[str, str]) -> list[dict]:
    result = CliRunner().invoke(cli, ["--plugins-dir", str(PLUGINS), "run", "--model", str(model), "--tasks", "tiny",
                                      "--methods", "oomy", "--budgets", budgets, "--limit", "4", "--batch-size", "4",
                                      "--threads", "1", "--output", str(output), "--json"],
                                env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _lines(path: Path) -> list[str]:
    lines = path.read_text().split() if path.exists() else []
    path.write_text("")
    return sorted(lines)


def test_one_interleaved_efficiency_pass_over_images_decoded_once(tiny_llava_dir, tmp_path, monkeypatch,
                                                                  restore_threads):
    spy = _Spy(monkeypatch)
    decoded, scored, output = tmp_path / "decoded.log", tmp_path / "scored.log", tmp_path / "out"
    env = {"TINY_SAMPLES": "4", "TINY_DECODE_LOG": str(decoded), "TINY_SCORE_LOG": str(scored)}
    records = _run(tiny_llava_dir, output, "64,32", env)
    assert _lines(decoded) == ["s0", "s1", "s2", "s3"]  # once per run: accuracy and efficiency share them
    assert spy.timed == ["none", "oomy@64", "oomy@32"] * (1 + 9)  # interleaved: a warm-up, 3 rounds × 3 samples
    assert spy.fsyncs == 3 + 1  # one batch of 4 samples per arm, then the efficiency results together
    baseline, first64, _ = records
    assert baseline["speedup"] is None and len(baseline["timed_runs"]) == 9
    speedup = first64["speedup"]
    assert speedup["pairs"] == 9 and speedup["ttft_range"][0] <= speedup["ttft"] <= speedup["ttft_range"][1]
    assert sorted((r["repeat"], r["sample"]) for r in first64["timed_runs"]) == [(r, s) for r in range(3)
                                                                                   for s in range(3)]
    assert first64["latency_ms"]["repeats"] == 9
    assert first64["timing_conditions"]["threads"] == 1 and first64["timing_conditions"]["interleaved_arms"] == 3
    assert first64["provenance"]["threads"] == 1

    _lines(scored)
    spy.reset()
    grown = _run(tiny_llava_dir, output, "64,32,16", env)
    assert _lines(scored) == ["s0", "s1", "s2", "s3"]  # oomy@16 only
    assert _lines(decoded) == ["s0", "s1", "s2", "s3"]
    assert spy.timed == ["none", "oomy@16"] * (1 + 9)  # finished arms are not timed again; the baseline is the reference
    assert [r["speedup"] for r in grown[1:3]] == [r["speedup"] for r in records[1:]]
    assert grown[3]["speedup"]["pairs"] == 9

    spy.reset()
    again = _run(tiny_llava_dir, output, "64,32,16", env)
    assert spy.timed == [] and _lines(scored) == [] and _lines(decoded) == []
    assert [r["latency_ms"] for r in again] == [r["latency_ms"] for r in grown]


def test_threads_must_be_positive(tiny_llava_dir, tmp_path):
    result = CliRunner().invoke(cli, ["run", "--model", str(tiny_llava_dir), "--threads", "0",
                                      "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--threads" in result.output


def test_a_method_run_one_sample_at_a_time_is_still_written_once_per_batch(tiny_llava_dir, tmp_path, monkeypatch):
    """``random`` is not batched (its draws must not depend on batch position), yet its chunk of
    ``--batch-size`` samples is stored with one fsync; a rerun finds all of them."""
    spy = _Spy(monkeypatch)
    scored, output = tmp_path / "scored.log", tmp_path / "out"
    args = ["--plugins-dir", str(PLUGINS), "run", "--model", str(tiny_llava_dir), "--tasks", "tiny", "--methods",
            "random", "--budgets", "64", "--batch-size", "4", "--no-efficiency", "--output", str(output)]
    env = {"TINY_SAMPLES": "8", "TINY_SCORE_LOG": str(scored)}
    assert CliRunner().invoke(cli, args, env=env, catch_exceptions=False).exit_code == 0
    assert len(_lines(scored)) == 16 and spy.fsyncs == 2 * 2 + 1  # 2 arms × 2 chunks, the flash probes
    spy.reset()
    assert CliRunner().invoke(cli, args, env=env, catch_exceptions=False).exit_code == 0
    assert _lines(scored) == [] and spy.fsyncs == 0


def test_an_arm_failing_while_timed_drops_out_and_the_others_are_timed(tiny_llava_dir, tmp_path, monkeypatch,
                                                                       restore_threads):
    spy = _Spy(monkeypatch)
    spy.fail_at = ("oomy@32", 3)  # the warm-up and one timed run went through
    baseline, first64, broken = _run(tiny_llava_dir, tmp_path / "out", "64,32", {"TINY_SAMPLES": "4"})
    assert spy.timed.count("oomy@32") == 3 and spy.timed.count("none") == spy.timed.count("oomy@64") == 10
    assert broken["latency_ms"] is None and broken["speedup"] is None and broken["score"] is not None
    assert first64["speedup"]["pairs"] == 9 and len(baseline["timed_runs"]) == 9
    stored = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["error"] for r in stored if r["kind"] == "efficiency" and r["budget"] == "32"] == [
        "RuntimeError: timing broke"]


def test_the_baseline_timed_last_wins_whichever_samples_file_holds_it(tiny_llava_dir, tmp_path, monkeypatch,
                                                                     restore_threads):
    """A folder run by launches of different sizes holds the baseline's timings in several samples files:
    the pass that timed an added arm replaced them, and a later run (whose own file holds the older
    ones, as process 0 of a launch after a single-process run) reports the replacement."""
    _Spy(monkeypatch)
    output = tmp_path / "out"
    env = {"TINY_SAMPLES": "4"}
    _run(tiny_llava_dir, output, "64", env)
    (output / "samples.jsonl").rename(output / "samples.rank0.jsonl")  # as a launch's process 0 wrote it
    grown = _run(tiny_llava_dir, output, "64,32", env)  # the baseline timed again, with oomy@32
    (output / "samples.jsonl").rename(output / "samples.rank1.jsonl")
    (output / "samples.rank0.jsonl").rename(output / "samples.jsonl")  # the older timings in this run's own file
    again = _run(tiny_llava_dir, output, "64,32", env)
    assert again[0]["timed_runs"] == grown[0]["timed_runs"]
    assert again[2]["speedup"] == grown[2]["speedup"]


def test_the_flash_attention_2_probe_runs_the_protocol_of_the_run(tiny_llava_dir, tmp_path, monkeypatch):
    """The probe's second copy of the model (loaded under flash_attention_2) prompts as the run does."""
    from PIL import Image

    from tokenbench.adapters.base import Prompt
    from tokenbench.adapters.llava import LlavaAdapter
    from tokenbench.config import MethodSpec, RunConfig
    from tokenbench.models import resolve_model
    from tokenbench.plugins import load_registry

    registry = load_registry()
    config = RunConfig(model=resolve_model(str(tiny_llava_dir), registry), methods=[], budgets=[], tasks=[],
                       output=tmp_path)  # a LLaVA checkpoint: the llava protocol by default
    harness = tokenbench.runner.Harness(config, registry, tokenbench.runner.load_adapter(config, registry))
    load, protocols = LlavaAdapter.load.__func__, []
    monkeypatch.setattr(LlavaAdapter, "load", classmethod(lambda cls, *a, **k: load(cls, *a, **k | {"attn": "sdpa"})))
    generate = LlavaAdapter.generate
    monkeypatch.setattr(LlavaAdapter, "generate",
                        lambda self, *a, **k: protocols.append(self.protocol) or generate(self, *a, **k))
    task = type("T", (), {"max_new_tokens": 2})()
    arm = tokenbench.runner.Arm(MethodSpec("none"), None)
    result = harness._flash_attention_2(Prompt(Image.new("RGB", (64, 64)), "hi"), None, arm, task)
    assert "error" not in result and harness.adapter.protocol == "llava" and protocols == ["llava"]
