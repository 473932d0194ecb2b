"""The harness end to end on a tiny random-weight LLaVA: records, faults, resume, output guard, JSON."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenbench.cli import cli
from tokenbench.results import PUBLIC_FIELDS, SCHEMA_VERSION

PLUGINS = Path(__file__).parent / "test_runner_plugins"


def invoke(args: list[str], env: dict[str, str] | None = None):
    runner = CliRunner()
    return runner.invoke(cli, ["--plugins-dir", str(PLUGINS), *args], env=env or {}, catch_exceptions=False)


def base_args(model: Path, output: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--tasks", "tiny", "--output", str(output), *extra]


def samples(output: Path) -> list[dict]:
    """The accuracy-pass records (the JSONL also holds one efficiency record per arm)."""
    lines = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    return [record for record in lines if record["kind"] == "sample"]


@pytest.fixture(scope="module")
def faulty_run(tiny_llava_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("faulty") / "out"
    result = invoke(base_args(tiny_llava_dir, output, "--methods", "random,flaky", "--budgets", "64,5",
                              "--limit", "6", "--json"),
                    env={"TINY_FAULTS": "1", "TINY_SAMPLES": "3"})
    assert result.exit_code == 0, result.output
    return output, json.loads(result.stdout)


def test_json_stdout_holds_every_public_record(faulty_run):
    _, records = faulty_run
    assert [(r["method"], r["budget"]) for r in records] == [
        ("none", None), ("random", "64"), ("random", "5"), ("flaky", "64"), ("flaky", "5")]
    for record in records:
        assert set(PUBLIC_FIELDS) <= set(record)
        assert record["schema_version"] == SCHEMA_VERSION
        prov = record["provenance"]
        for key in ("tokenbench", "git_sha", "torch", "transformers", "device", "dtype", "attention_backend",
                    "seed", "options", "hardware"):
            assert key in prov
        assert prov["dtype"] == "float32" and prov["attention_backend"] == "sdpa" and prov["seed"] == 0
        assert prov["protocol"] == "llava" and prov["scoring"] == "official"  # a LLaVA checkpoint's defaults


def test_faulty_samples_are_recorded_and_the_run_goes_on(faulty_run):
    output, records = faulty_run
    by_arm = {(r["method"], r["budget"]): r for r in records}
    baseline = by_arm[("none", None)]
    assert baseline["n_samples"] == 6 and baseline["n_errors"] == 2
    assert set(baseline["errors"]) == {"image", "context"}
    errors = {s["sample_id"]: s["error"] for s in samples(output) if s["method"] == "none"}
    assert "cannot identify image" in errors["broken"]
    assert "more than the model's context of 2048" in errors["long"]
    assert errors["s0"] is None and errors["boom"] is None
    flaky = by_arm[("flaky", "64")]
    assert flaky["n_errors"] == 3 and flaky["errors"]["RuntimeError"] == 1
    assert flaky["score"] is not None and flaky["realised_tokens"] == 64.0


def test_infeasible_budget_gives_a_record_with_the_reason(faulty_run):
    _, records = faulty_run
    flaky5 = next(r for r in records if r["method"] == "flaky" and r["budget"] == "5")
    assert flaky5["infeasible"] == "flaky needs at least 10 tokens, asked 5"
    assert flaky5["score"] is None and flaky5["n_samples"] == 0


def test_measurements_and_statistics_in_the_records(faulty_run):
    output, records = faulty_run
    random64 = next(r for r in records if r["method"] == "random" and r["budget"] == "64")
    assert random64["realised_tokens"] == 64.0 and random64["realised_ratio"] == pytest.approx(64 / 576)
    assert random64["flops"]["formula"] == "full_flops" and random64["flops"]["fastv_macs"]["unit"] == "MAC"
    assert 0 < random64["flops"]["prefill"] < records[0]["flops"]["prefill"]
    assert random64["flash_attention"]["class"] == "native"
    assert set(random64["latency_ms"]) >= {"vision", "prefill", "ttft", "decode_per_token", "end_to_end"}
    latency = random64["latency_ms"]  # issue 15: the spread and the number of timed runs, with the CPU load
    assert latency["repeats"] == 9 and latency["ttft_iqr"][0] <= latency["ttft"] <= latency["ttft_iqr"][1]
    assert latency["end_to_end_iqr"][0] <= latency["end_to_end"] <= latency["end_to_end_iqr"][1]
    assert random64["timing_conditions"]["device_type"] == "cpu" and random64["timing_conditions"]["cpus"] >= 1
    assert random64["peak_memory_bytes"] > 0 and random64["kv_cache_bytes"] > 0
    assert random64["n_paired"] == 4 and 0 <= random64["agreement"] <= 1
    if random64["relative"] is not None:
        low, high = random64["relative_ci"]
        assert low <= random64["relative"] <= high
    files = sorted(p.name for p in (output / "runs").glob("*.json"))
    assert len(files) == 5 and all(json.loads((output / "runs" / f).read_text())["schema_version"] == 1
                                   for f in files)


def test_a_results_folder_grows_with_runs_of_other_arguments(faulty_run, tiny_llava_dir, tmp_path):
    """Issue 15: other methods, budgets or limits in the same --output reuse every finished sample
    (the baseline's included), add their own, and never overwrite a record of other settings."""
    output, log = tmp_path / "grown", tmp_path / "scored.log"
    shutil.copytree(faulty_run[0], output)
    before = {p.name: p.read_text() for p in (output / "runs").glob("*.json")}
    env = {"TINY_FAULTS": "1", "TINY_SAMPLES": "3", "TINY_SCORE_LOG": str(log)}
    more = invoke(base_args(tiny_llava_dir, output, "--methods", "random", "--budgets", "32", "--limit", "6",
                            "--no-efficiency", "--json"), env=env)
    assert more.exit_code == 0, more.output
    assert sorted(log.read_text().split()) == ["boom", "s0", "s1", "s2"]  # random@32 only: baseline reused
    assert "tiny: 6 of 12 samples already done" in more.stderr and "skipped" in more.stderr
    log.write_text("")
    fewer = invoke(base_args(tiny_llava_dir, output, "--methods", "random", "--budgets", "64", "--limit", "4",
                             "--no-efficiency", "--json"), env=env)
    assert fewer.exit_code == 0, fewer.output
    assert log.read_text() == ""  # every sample was already there
    limited = json.loads(fewer.stdout)
    assert [r["n_samples"] for r in limited] == [4, 4] and limited[0]["provenance"]["limit"] == 4
    after = {p.name: p.read_text() for p in (output / "runs").glob("*.json")}
    assert {name: after[name] for name in before} == before  # nothing of the first run overwritten
    assert len(after) == len(before) + 3  # random@32, and none and random@64 at limit 4
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    result = invoke(base_args(Path("."), stranger))
    assert result.exit_code != 0


def test_schema_version_mismatch_is_refused(tiny_llava_dir, tmp_path):
    output = tmp_path / "old"
    output.mkdir()
    (output / "manifest.json").write_text(json.dumps({"schema_version": 0, "arguments": {}}))
    result = invoke(base_args(tiny_llava_dir, output, "--methods", "random"))
    assert result.exit_code == 2
    assert "schema version 0" in result.stderr and f"--output {output}-v1" in result.stderr
    assert f"rm -r '{output}'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_model_config_runs_efficiency_only(tiny_llava_dir, tmp_path):
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    path = tmp_path / "tiny-llava.json"
    path.write_text(json.dumps(config | {"_name_or_path": "tiny-llava-shaped"}))
    output = tmp_path / "eff"
    result = invoke(["run", "--model-config", str(path), "--tasks", "tiny", "--methods", "random",
                     "--budgets", "64", "--output", str(output), "--json"], env={"TINY_SAMPLES": "2"})
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["model"] for r in records] == ["tiny-llava-shaped (random weights)"] * 2
    for record in records:
        assert record["score"] is None and record["n_samples"] == 0
        assert record["latency_ms"]["end_to_end"] > 0 and record["flops"]["prefill"] > 0
    assert records[1]["realised_tokens"] == 64.0
    bad = invoke(["run", "--model-config", str(tmp_path / "missing.json"), "--tasks", "tiny"])
    assert bad.exit_code == 2 and "does not exist" in bad.stderr


# ------------------------------------------------------------------------------------------ resume

def _cli_process(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from tokenbench.cli import main; main()",
                             "--plugins-dir", str(PLUGINS), *args],
                            env=os.environ | {"OMP_NUM_THREADS": "1"} | env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_without_recomputing_or_duplicating(tiny_llava_dir, tmp_path):
    output, log = tmp_path / "resume", tmp_path / "scored.log"
    args = base_args(tiny_llava_dir, output, "--methods", "random", "--budgets", "64", "--batch-size", "1",
                     "--no-efficiency", "--json")
    env = {"TINY_SAMPLES": "8", "TINY_SCORE_LOG": str(log), "TINY_SCORE_SLEEP": "0.15"}
    process = _cli_process(args, env)
    deadline = time.time() + 90
    while time.time() < deadline:
        if (output / "samples.jsonl").exists() and len((output / "samples.jsonl").read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = samples(output)
    assert 4 <= len(done_before) < 16, "the run finished before it could be killed"
    with open(output / "samples.jsonl", "a") as handle:  # a record torn by the kill
        handle.write('{"key": "' + "f" * 20)
    log.write_text("")

    resumed = _cli_process(args, env | {"TINY_SCORE_SLEEP": "0"})
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert "incomplete record(s) dropped" in stderr
    final = samples(output)
    keys = [r["key"] for r in final]
    assert len(keys) == len(set(keys)) == 16
    assert {r["key"] for r in done_before} <= set(keys)
    assert sorted(log.read_text().split()) == sorted(r["sample_id"] for r in final
                                                     if r["key"] not in {d["key"] for d in done_before})

    log.write_text("")
    again = _cli_process(args, env | {"TINY_SCORE_SLEEP": "0"})
    stdout_again, stderr_again = again.communicate(timeout=120)
    assert again.returncode == 0, stderr_again
    assert log.read_text() == "" and len(samples(output)) == 16
    assert json.loads(stdout_again) == json.loads(stdout)

    fresh = invoke(base_args(tiny_llava_dir, tmp_path / "fresh", "--methods", "random", "--budgets", "64",
                             "--no-efficiency", "--json"), env={"TINY_SAMPLES": "8"})
    predictions = {(r["method"], r["sample_id"]): r["prediction"] for r in samples(output)}
    assert predictions == {(r["method"], r["sample_id"]): r["prediction"] for r in samples(tmp_path / "fresh")}
    for resumed_record, fresh_record in zip(json.loads(stdout), json.loads(fresh.stdout)):
        assert resumed_record["metrics"] == fresh_record["metrics"]
        assert resumed_record["flops"] == fresh_record["flops"]


def test_out_of_memory_fails_the_sample_and_a_resumed_run_computes_it_again(tiny_llava_dir, tmp_path):
    output, counter = tmp_path / "oom", tmp_path / "calls"
    args = base_args(tiny_llava_dir, output, "--methods", "oomy", "--budgets", "64", "--no-efficiency", "--json")
    # calls 1 and 2 fail: the batch of 3, then the first sample alone (the others then pass alone)
    env = {"TINY_SAMPLES": "3", "TINY_OOM_COUNTER": str(counter), "TINY_OOM_CALLS": "2"}
    first = invoke(args, env=env)
    assert first.exit_code == 0, first.output
    failed = [r for r in samples(output) if r["error"]]
    assert [(r["sample_id"], r["retry"]) for r in failed] == [("s0", True)]
    assert "OutOfMemoryError: CUDA out of memory" in failed[0]["error"]
    oomy = next(r for r in json.loads(first.stdout) if r["method"] == "oomy")
    assert oomy["n_errors"] == 1
    calls = int(counter.read_text())

    resumed = invoke(args, env=env)
    assert resumed.exit_code == 0, resumed.output
    assert "1 sample(s) that failed for out of memory" in resumed.stderr
    assert int(counter.read_text()) - calls == 1, calls  # only s0 ran again
    oomy = next(r for r in json.loads(resumed.stdout) if r["method"] == "oomy")
    assert oomy["n_errors"] == 0 and oomy["n_samples"] == 3
    latest = {r["key"]: r for r in samples(output)}
    assert not any(r["error"] for r in latest.values())


SHRINK = {
    "llava": lambda raw: raw | {
        "text_config": raw["text_config"] | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "num_key_value_heads": 4},
        "vision_config": raw["vision_config"] | {"hidden_size": 32, "intermediate_size": 64,
                                                 "num_hidden_layers": 2, "num_attention_heads": 2}},
    "qwen2_vl": lambda raw: raw | {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": raw["vision_config"] | {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64}},
}
SHRINK["llava_next"] = SHRINK["llava"]
SHRINK["llava_onevision"] = lambda raw: raw | {
    "text_config": raw["text_config"] | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "num_key_value_heads": 2},
    "vision_config": raw["vision_config"] | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                             "num_attention_heads": 2}}


@pytest.mark.parametrize("name, n_visual", [("llava-1.5-7b", 576), ("qwen2-vl-2b", 144), ("llava-next-7b", 1152),
                                            ("llava-onevision-7b", 729 + 729)])
def test_shipped_configs_build_random_weight_models(tmp_path, name, n_visual):
    """The shipped configs, narrowed to tiny widths (same model types, image sizes and token
    placeholders), build a random-weight adapter with an offline processor that generates."""
    import torch
    from PIL import Image

    import tokenbench
    from tokenbench.adapters.base import Prompt
    from tokenbench.plugins import load_registry
    from tokenbench.random_model import config_model_ref, random_weight_adapter

    raw = json.loads((Path(tokenbench.__file__).parent / "configs" / f"{name}.json").read_text())
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(SHRINK[raw["model_type"]](raw)))
    registry = load_registry()
    assert config_model_ref(path, registry).name.endswith("(random weights)")
    assert config_model_ref(name, registry).location.endswith(f"configs/{name}.json")  # shipped by name
    adapter = random_weight_adapter(path, registry, dtype=torch.float32, attn="sdpa", device=torch.device("cpu"))
    trace = adapter.generate([Prompt(Image.new("RGB", (336, 336)), "what color ?")], max_new_tokens=2)[0].trace
    assert trace.n_visual == n_visual and trace.llm_visual == [n_visual, n_visual]


def test_a_model_that_cannot_load_is_a_one_line_error(tmp_path):
    model = tmp_path / "empty-llava"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    result = invoke(base_args(model, tmp_path / "out", "--methods", "random"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"tokenbench: error: cannot load model '{model}'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_without_json_prints_the_tables(faulty_run, tiny_llava_dir):
    """A rerun of a finished run recomputes nothing and prints the per-budget tables on stdout."""
    output, _ = faulty_run
    result = invoke(base_args(tiny_llava_dir, output, "--methods", "random,flaky", "--budgets", "64,5",
                              "--limit", "6"), env={"TINY_FAULTS": "1", "TINY_SAMPLES": "3"})
    assert result.exit_code == 0, result.output
    assert "· budget 64" in result.stdout and "| random" in result.stdout
    assert "tokenbench leaderboard" not in result.stdout.splitlines()[0]
    assert f"results: {output}/" in result.stderr



# ------------------------------------------------------------------------------------------ issue 15

PLUGIN_FILE = PLUGINS / "tiny_runner_plugin.py"


def _messages(stderr: str) -> list[str]:
    """stderr without transformers' weight-loading progress bar."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("Loading weights")]


def _line_of(marker: str) -> int:
    return next(n for n, line in enumerate(PLUGIN_FILE.read_text().splitlines(), start=1) if marker in line)


@pytest.fixture(scope="module")
def mixed_run(tiny_llava_dir, tmp_path_factory):
    """A method over budget, one that fails every sample and one that reads an undeclared signal,
    beside one that works."""
    output = tmp_path_factory.mktemp("mixed") / "out"
    result = invoke(base_args(tiny_llava_dir, output, "--methods", "random,greedy,doomed,sneaky",
                              "--budgets", "64", "--no-efficiency"), env={"TINY_SAMPLES": "3"})
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
               for p in (output / "runs").glob("*.json")}
    return result, records


def test_an_arm_failing_every_sample_fails_the_run_after_the_others_with_its_first_error(mixed_run):
    result, records = mixed_run
    assert result.exit_code == 1
    assert set(records) == {"none", "random", "greedy", "doomed", "sneaky"}  # the other arms finished
    assert records["random"]["n_errors"] == 0 and records["doomed"]["n_errors"] == 3
    assert "| random" in result.stdout  # the tables still print
    errors = [line for line in result.stderr.splitlines() if line.startswith("tokenbench: error:")]
    doomed = next(line for line in errors if "doomed@64" in line)
    assert "failed on all 3 samples" in doomed and "ValueError: doomed never keeps anything" in doomed
    assert doomed.endswith(f"(raised at {PLUGIN_FILE}:{_line_of('DOOMED-LINE')})")
    assert records["doomed"]["first_error"]["at"] == f"{PLUGIN_FILE}:{_line_of('DOOMED-LINE')}"


def test_reading_an_undeclared_signal_names_the_missing_declaration(mixed_run):
    result, records = mixed_run
    error = records["sneaky"]["first_error"]
    assert error["error"].startswith("UndeclaredSignal: method 'sneaky' reads x.text but does not declare it: "
                                     "add 'text' to its needs")
    assert error["at"] == f"{PLUGIN_FILE}:{_line_of('SNEAKY-LINE')}"
    assert "sneaky@64 on tiny failed on all 3 samples" in result.stderr


def test_over_budget_results_are_counted_and_marked_in_the_run_tables(mixed_run):
    result, records = mixed_run
    greedy, random64 = records["greedy"], records["random"]
    assert greedy["realised_tokens"] == 128.0 and greedy["budget_tokens"] == 64.0
    assert greedy["over_budget"] is True and greedy["n_over_budget"] == 3
    assert random64["over_budget"] is False and random64["n_over_budget"] == 0
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    methods = [row.split("|")[1].strip() for row in rows[1:]]
    assert methods[-1] == "greedy" and "⚠ over budget" in rows[-1]
    assert "⚠" not in next(row for row in rows if row.startswith("| random"))


def test_a_site_outside_the_model_is_refused_before_the_run(tiny_llava_dir, tmp_path):
    output = tmp_path / "deep"
    result = invoke(base_args(tiny_llava_dir, output, "--methods", "deep", "--budgets", "64"),
                    env={"TINY_SAMPLES": "2"})
    assert result.exit_code == 2
    assert _messages(result.stderr) == [("tokenbench: error: method 'deep' at budget 64 schedules a site at "
                                         "llm:40, outside this model's 4 llm layers (0..3)")]
    assert not (output / "samples.jsonl").exists()


def test_a_budget_above_the_image_tokens_is_refused(tiny_llava_dir, tmp_path):
    result = invoke(base_args(tiny_llava_dir, tmp_path / "big", "--methods", "random", "--budgets", "64,1000"),
                    env={"TINY_SAMPLES": "2"})
    assert result.exit_code == 2
    assert "--budgets 1000: the model's images have 576 visual tokens" in result.stderr
    assert len(_messages(result.stderr)) == 1


def test_a_corrupt_checkpoint_is_one_line(tiny_llava_dir, tmp_path):
    model = tmp_path / "corrupt"
    shutil.copytree(tiny_llava_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # truncated copy
    result = invoke(base_args(model, tmp_path / "out", "--methods", "random"), env={"TINY_SAMPLES": "2"})
    assert result.exit_code == 2
    assert _messages(result.stderr)[0].startswith(f"tokenbench: error: cannot load model '{model}' from {model}:")
    assert _messages(result.stderr)[0].endswith("truncated or corrupt: copy or save the checkpoint again")
    assert len(_messages(result.stderr)) == 1


def test_unreadable_task_data_are_one_line(tmp_path):
    data = tmp_path / "data"
    (data / "POPE" / "data").mkdir(parents=True)
    (data / "POPE" / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    result = invoke(["run", "--tasks", "pope", "--data-dir", str(data), "--methods", "random",
                     "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("tokenbench: error:") and "pope" in result.stderr
    assert len(_messages(result.stderr)) == 1


@pytest.mark.parametrize("env, says", [
    ({"HF_HUB_OFFLINE": "1"}, "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hugging Face hub (http://127.0.0.1:9) is unreachable"),
])
def test_a_hub_id_without_network_says_how_to_use_a_local_copy(tmp_path, env, says):
    result = invoke(["run", "--model", "llava-hf/llava-1.5-7b-hf", "--tasks", "tiny", "--methods", "random",
                     "--output", str(tmp_path / "out")], env=env | {"HF_HOME": str(tmp_path / "hf")})
    assert result.exit_code == 2
    assert says in result.stderr and "give --model DIR" in result.stderr
    assert len(_messages(result.stderr)) == 1


def test_generation_raises_no_deprecation_warning(tiny_llava_dir):
    """transformers 5.24 renamed the decoder layers' past_key_values argument to cache."""
    import warnings

    import torch
    from PIL import Image

    from tokenbench.adapters.base import Prompt
    from tokenbench.plugins import load_registry
    from tokenbench.runner import DTYPES

    registry = load_registry()
    adapter = registry.adapter_for("llava").load(str(tiny_llava_dir), dtype=DTYPES["float32"], attn="sdpa",
                                                 device=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter.generate([Prompt(Image.new("RGB", (64, 64)), "what color ?")], max_new_tokens=3)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
