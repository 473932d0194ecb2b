"""The lmms-eval bridge, both ways, offline on a local POPE-schema task and the embedded model.

One lmms-eval run (``lmms-eval --model tokenbench``, its real command line) and one tokenbench run
(``--tasks lmms:<task>``) on the same eight documents, method and budget; the tests compare their
answers, their scores with tokenbench's own POPE scoring, and the tokenbench record lmms-eval's run
leaves beside its results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from lmms_fixture import CATEGORY, MAX_NEW_TOKENS, TASK, write_pope_task
from tokenbench.tasks.pope import pope_metrics, read_yes_no

from tokenbench.cli import cli
from tokenbench.integrations.lmms_requests import Decoding, RequestError, single_image

LIMIT = 8
METHOD, BUDGET = "apet", "11.1%"
N_VISUAL = 144  # the embedded default model's visual tokens
# lmms-eval's POPE metric names -> tokenbench's (same definitions, fractions vs percent). The yes-ratio
# is left out: lmms-eval's counts ground-truth "yes", tokenbench's (the official one) predicted "yes".
SAME_METRICS = {"pope_accuracy": "accuracy", "pope_precision": "precision", "pope_recall": "recall",
                "pope_f1_score": "f1"}


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    folder = write_pope_task(root, n=LIMIT)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "TOKENBENCH_LMMS_INCLUDE_PATH": str(folder), "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root, folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def lmms_run(offline_env):
    """``lmms-eval --model tokenbench ... --limit 8 --log_samples``: (results, logged samples, out dir)."""
    root, folder = offline_env
    out = root / "lmms-out"
    executable = shutil.which("lmms-eval", path=str(Path(sys.executable).parent)) or "lmms-eval"
    proc = subprocess.run(
        [executable, "--model", "tokenbench", "--model_args",
         f"pretrained=tiny-llava-shapes,method={METHOD},budget={BUDGET}", "--tasks", TASK,
         "--include_path", str(folder), "--limit", str(LIMIT), "--output_path", str(out), "--log_samples"],
        check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model_dir = out / "tiny-llava-shapes"
    results = json.loads(next(model_dir.glob("*_results.json")).read_text())["results"][TASK]
    samples = [json.loads(line) for line in next(model_dir.glob(f"*_samples_{TASK}.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"]), model_dir


@pytest.fixture(scope="module")
def tokenbench_run(offline_env):
    """``tokenbench run --tasks lmms:<task>`` with the same method, budget and limit."""
    root, _ = offline_env
    out = root / "tb-out"
    args = ["run", "--methods", METHOD, "--budgets", BUDGET, "--tasks", f"lmms:{TASK}",
            "--limit", str(LIMIT), "--no-efficiency", "--output", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return out, args, records


def test_lmms_eval_finds_tokenbench_through_its_entry_point():
    from lmms_eval.models import get_model

    from tokenbench.integrations.lmms_model import TokenbenchLMM

    assert get_model("tokenbench") is TokenbenchLMM


def test_lmms_eval_run_scores_equal_tokenbench_pope_scoring(lmms_run):
    results, samples, _ = lmms_run
    assert len(samples) == LIMIT
    answers = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
               for s in samples]
    ours = pope_metrics((CATEGORY, read_yes_no(a), s["target"]) for a, s in zip(answers, samples))
    for theirs, name in SAME_METRICS.items():
        assert 100 * results[f"{theirs},none"] == pytest.approx(ours[name]), name
    assert 0 < ours["accuracy"]  # the model answers: a broken bridge would not score


def test_lmms_eval_run_leaves_a_tokenbench_record(lmms_run):
    _, samples, model_dir = lmms_run
    record = json.loads((model_dir / f"tokenbench_{TASK}_{METHOD}_11.1pct.json").read_text())
    assert record["method"] == METHOD and record["budget"] == BUDGET and record["n_samples"] == LIMIT
    assert record["n_visual"] == N_VISUAL
    assert record["realised_tokens"] == pytest.approx(0.111 * N_VISUAL, abs=0.5)
    assert record["flops"]["prefill"] > 0
    assert [s["prediction"] for s in record["samples"]] == \
        [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]


def test_tokenbench_run_on_lmms_task_gives_the_lmms_eval_answers(lmms_run, tokenbench_run):
    _, samples, _ = lmms_run
    _, _, records = tokenbench_run
    ours = {r["sample_id"]: r for r in records if r.get("kind") == "sample" and r["method"] == METHOD}
    assert len(ours) == LIMIT and not any(r["error"] for r in ours.values())
    decoding = Decoding(MAX_NEW_TOKENS)
    for sample in samples:
        answer = sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else \
            sample["filtered_resps"]
        mine = ours[str(sample["doc_id"])]
        assert decoding.cut(mine["prediction"]).strip().lower() == answer
        assert mine["scores"]["pope_accuracy"]["score"] == sample["pope_accuracy"]["score"]
        assert mine["trace"]["realised_tokens"] == pytest.approx(0.111 * N_VISUAL, abs=0.5)


def test_tokenbench_run_record_has_the_task_metrics_and_statistics(lmms_run, tokenbench_run):
    results, _, _ = lmms_run
    out, _, _ = tokenbench_run
    record = json.loads(next((out / "runs").glob(f"*{TASK}__{METHOD}__*.json")).read_text())
    assert record["task"] == f"lmms:{TASK}" and record["primary_metric"] == "pope_accuracy"
    for metric in SAME_METRICS:
        assert record["metrics"][metric] == pytest.approx(results[f"{metric},none"])
    assert record["agreement"] is not None and record["relative_ci"] is not None


def test_tokenbench_run_on_lmms_task_resumes(tokenbench_run):
    out, args, _ = tokenbench_run
    before = (out / "samples.jsonl").read_text()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (out / "samples.jsonl").read_text() == before  # every sample came from the store


def _write_task(folder: Path, name: str, body: str, utils: str = "") -> None:
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: parquet\n{body}")
    if utils:
        (folder / f"{name}_utils.py").write_text(utils)


def test_logprob_and_judge_tasks_are_refused_with_the_reason(offline_env):
    _, folder = offline_env
    _write_task(folder, "tb_logprob", "output_type: loglikelihood\nmetric_list:\n  - metric: acc\n")
    _write_task(folder, "tb_judged", "output_type: generate_until\nprocess_results: !function "
                "tb_judged_utils.score\nmetric_list:\n  - metric: judged\n",
                "from lmms_eval.llm_judge import get_server  # noqa: F401\n\n\ndef score(doc, results):\n"
                "    return {'judged': 1.0}\n")
    from tokenbench.integrations import lmms_tasks

    lmms_tasks._task_manager.cache_clear()  # the folder has new tasks
    runner = CliRunner()
    for name, reason in (("tb_logprob", "log-probabilities"), ("tb_judged", "judge model")):
        result = runner.invoke(cli, ["run", "--tasks", f"lmms:{name}", "--methods", METHOD, "--limit", "1"])
        assert result.exit_code == 2, result.output
        assert reason in result.output and name in result.output


def test_tasks_command_says_where_lmms_tasks_come_from(offline_env):
    result = CliRunner().invoke(cli, ["tasks"])
    assert result.exit_code == 0, result.output
    assert "lmms:<task>" in result.output and "TOKENBENCH_LMMS_INCLUDE_PATH" in result.output
    result = CliRunner().invoke(cli, ["tasks", f"lmms:{TASK}"])
    assert result.exit_code == 0 and "pope_accuracy" in result.output


def test_unsupported_requests_and_bad_model_args_fail_clearly(offline_env):
    from tokenbench.config import ConfigError
    from tokenbench.integrations.lmms_model import TokenbenchLMM, parse_options

    model = TokenbenchLMM(pretrained="tiny-llava-shapes", method="fastv", budget="64", options="k_layer=2")
    assert model.options == {"k_layer": 2}
    with pytest.raises(NotImplementedError, match="Loglikelihood"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="Multi-round"):
        model.generate_until_multi_round([])
    with pytest.raises(ConfigError, match="needs a budget"):
        TokenbenchLMM(method="apet")
    with pytest.raises(ConfigError, match="unknown model_args"):
        TokenbenchLMM(method="none", temperature=1)
    assert parse_options('{"basis": 10}') == {"basis": "10"}
    assert parse_options("basis=10;mode=x") == {"basis": "10", "mode": "x"}


def test_generation_kwargs_and_visuals_map_onto_one_greedy_prompt():
    from PIL import Image

    decoding = Decoding.from_generation_kwargs({"max_new_tokens": 5, "until": ["\n\n", "ASSISTANT:"],
                                                "temperature": 0.2, "do_sample": False})
    assert decoding == Decoding(5, ("\n\n", "ASSISTANT:"))
    assert decoding.cut("yes\n\nASSISTANT: no") == "yes"
    with pytest.raises(RequestError, match="greedily"):
        Decoding.from_generation_kwargs({"do_sample": True, "temperature": 0.7})
    image = Image.new("RGB", (4, 4))
    assert single_image([image]) is not None and single_image([[image]]) is not None
    assert single_image([]) is None
    with pytest.raises(RequestError, match="2 visuals"):
        single_image([image, image])
