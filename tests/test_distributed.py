"""Data-parallel runs on accelerate and ``--device-map`` loading (issue 20).

The launched tests are the slowest kind (two processes on shared cores), so one single-process run
is the reference for all of them: a 2-process ``accelerate launch`` must give the same run records
field by field (apart from provenance and timings), and a launch killed with SIGKILL part-way and
finished by one process must too, without recomputing or duplicating a finished sample.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from adapter_tools import ALL, Scripted, adapter, model_dir, prompts, stock_generate
from click.testing import CliRunner

from tokenbench import Site, Stage
from tokenbench.adapters.placement import Placement, device_placement, parse_max_memory
from tokenbench.cli import cli
from tokenbench.distributed import Processes, ShardedSampleStore

RUN = ["run", "--methods", "apet,fastv", "--budgets", "11.1%", "--limit", "40", "--no-efficiency", "--json"]
TIMINGS = ("latency_ms",)  # and flash_attention.probe_ms: measured, never equal between two runs


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(processes: int, output: Path) -> list[str]:
    """``python -m tokenbench run ...``, or the same under ``accelerate launch`` with 2 processes
    (``--multi_gpu`` is accelerate's torchrun launcher; on a machine without CUDA its processes
    talk over gloo. ``--cpu`` would start a single process unless an mpirun hostfile is given)."""
    if processes == 1:
        launcher = [sys.executable, "-m", "tokenbench"]
    else:
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
                    "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "tokenbench"]
    return launcher + RUN + ["--output", str(output)]


def _run(processes: int, output: Path) -> list[dict]:
    done = subprocess.run(_command(processes, output), env=_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _comparable(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in TIMINGS and k != "provenance"}
    if out.get("flash_attention"):
        out["flash_attention"] = {k: v for k, v in out["flash_attention"].items() if k != "probe_ms"}
    return out


def _keys(path: Path) -> list[str]:
    """Keys of the complete lines of a sample file."""
    data = path.read_bytes()
    return [json.loads(line)["key"] for line in data[:data.rfind(b"\n") + 1].decode().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(1, tmp_path_factory.mktemp("single") / "out")


def test_two_processes_give_the_single_process_records(single, tmp_path):
    output = tmp_path / "out"
    records = _run(2, output)
    assert [(r["method"], r["budget"]) for r in records] == [(r["method"], r["budget"]) for r in single]
    for parallel, reference in zip(records, single):
        assert _comparable(parallel) == _comparable(reference)
        assert parallel["n_samples"] == 40 and parallel["score"] is not None
        assert (parallel["provenance"]["processes"], reference["provenance"]["processes"]) == (2, 1)
    shards = sorted(p.name for p in output.glob("samples*.jsonl"))
    assert shards == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    keys = [k for p in output.glob("samples*.jsonl") for k in _keys(p)]
    assert len(keys) == len(set(keys)) == 3 * 40 + 3  # 3 arms x 40 samples + 3 flash probes
    assert len(_keys(output / "samples.rank1.jsonl")) >= 40  # rank 1 did its share of the batches


def test_killed_launch_is_finished_by_one_process(single, tmp_path):
    output = tmp_path / "out"
    launch = subprocess.Popen(_command(2, output), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launch.poll() is None:
        if sum(len(_keys(p)) for p in output.glob("samples.rank*.jsonl")) >= 30:
            break
        time.sleep(0.1)
    os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both workers, as a scheduler's kill does
    launch.wait()
    before = {p.name: _keys(p) for p in output.glob("samples.rank*.jsonl")}
    finished = {k for keys in before.values() for k in keys}
    assert 30 <= len(finished) < 3 * 40, "the kill must come mid-run"
    assert not (output / "runs").exists()

    records = _run(1, output)
    assert [_comparable(r) for r in records] == [_comparable(r) for r in single]
    assert {p.name: _keys(p)[:len(keys)] for p, keys in
            ((output / name, keys) for name, keys in before.items())} == before  # intact
    resumed = _keys(output / "samples.jsonl")
    assert not finished & set(resumed), "a finished sample was computed again"
    everything = [k for p in output.glob("samples*.jsonl") for k in _keys(p)]
    assert len(everything) == len(set(everything)) == 3 * 40 + 3


# ------------------------------------------------------------------------------------ units

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_batch_once(world):
    batches = list(range(11))
    shards = [Processes(rank, world).shard(batches) for rank in range(world)]
    assert sorted(b for s in shards for b in s) == batches
    assert shards == [Processes(rank, world).shard(batches) for rank in range(world)]  # deterministic


def test_store_reads_every_shard_and_writes_its_own(tmp_path):
    (tmp_path / "samples.rank0.jsonl").write_text(
        json.dumps({"key": "a", "v": 1}) + "\n" + json.dumps({"key": "r", "retry": True}) + "\n")
    torn = json.dumps({"key": "b", "v": 2}) + "\n" + '{"key": "c", "v'
    (tmp_path / "samples.rank3.jsonl").write_text(torn)
    with ShardedSampleStore(tmp_path, Processes()) as store:
        assert "a" in store and "b" in store
        assert "c" not in store and "r" not in store  # torn line and machine failure: computed again
        store.append({"key": "c", "v": 3})
    assert (tmp_path / "samples.rank3.jsonl").read_text() == torn  # another process's file: untouched
    assert _keys(tmp_path / "samples.jsonl") == ["c"]
    with ShardedSampleStore(tmp_path, Processes(1, 2)) as store:
        assert {"a", "b", "c"} <= set(store.records)
        assert store.path.name == "samples.rank1.jsonl"


def test_process_device_and_max_memory():
    assert Processes(1, 2, 1).device("cuda") == "cuda:1"
    assert Processes(1, 2, 1).device("cpu") == "cpu"
    assert Processes().device("cuda") == "cuda"
    assert parse_max_memory("0=40GiB, 1=40GiB,cpu=64GiB") == {0: "40GiB", 1: "40GiB", "cpu": "64GiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("gpu0=40GiB")


@pytest.mark.parametrize("args,message", [
    (["--max-memory", "cpu=1GB"], "--max-memory only applies with --device-map"),
    (["--device-map", "auto", "--max-memory", "x"], "--max-memory entry 'x'"),
])
def test_device_map_usage_errors(args, message):
    result = CliRunner().invoke(cli, ["run", "--limit", "1", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------- device map

SPLITS = [pytest.param(("cpu", "disk"), id="cpu+disk"),
          pytest.param((0, "cpu"), id="cuda+cpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
              not torch.cuda.is_available(), reason="needs CUDA: hidden states really cross devices")])]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("family,site", [("llava", None), ("llava", Site(Stage.VISION_OUT)),
                                         ("llava", Site(Stage.LLM, 2)), ("qwen2_vl", Site(Stage.LLM, 2))])
def test_keep_all_holds_with_the_decoder_split_over_two_devices(request, tmp_path, family, site, split):
    """The first device holds the vision side and about the first decoder layer, the second the rest
    (on CPU only: the CPU and disk offload, whose hooks load each layer's weights when it runs)."""
    reference = adapter(family, model_dir(request, family), "sdpa")
    model = reference.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = sum(p.numel() * p.element_size() for p in model.model.language_model.layers[0].parameters())
    first, second = split
    placement = Placement("auto", {first: total - 2 * layer, second: 10 * total}, tmp_path / "offload")
    placed = type(reference).load(model_dir(request, family), device=placement)
    where = {name: device for name, device in placed.model.hf_device_map.items() if ".layers." in name}
    assert set(split) <= set(where.values()), where  # the decoder is split
    batch = prompts(family, 2)
    compressor = None
    if site is not None:
        compressor = Scripted(site, stride=1, needs=frozenset({"keys", "cls_attention"} if
                                                             site.stage is Stage.VISION_OUT else
                                                             {"attention", "keys"}))
    run = placed.run(batch, compressor=compressor, budget=ALL, max_new_tokens=4)
    tokens, logits = stock_generate(reference, batch, 4)
    assert torch.equal(run.tokens.cpu(), tokens[:, :run.tokens.shape[1]])
    torch.testing.assert_close(run.logits.cpu(), logits[:, :run.logits.shape[1]], rtol=1e-4, atol=1e-4)
    assert compressor is None or compressor.seen
    memory = device_placement(placed.model)["device_map_bytes"]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert set(memory) == {f"cuda:{d}" if isinstance(d, int) else d for d in split}
    assert sum(memory.values()) == total + buffers


def test_run_with_device_map_records_memory_per_device(tiny_llava_dir, tmp_path):
    result = CliRunner().invoke(cli, ["run", "--model", str(tiny_llava_dir), "--methods", "fastv", "--budgets",
                                      "50%", "--limit", "2", "--no-efficiency", "--json", "--device-map", "auto",
                                      "--max-memory", "cpu=400KB", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output[-2000:]
    records = json.loads(result.stdout)
    placed = records[0]["provenance"]["device_map_bytes"]
    assert placed["cpu"] > 0 and placed["disk"] > 0
    assert all(r["score"] is not None and r["n_errors"] == 0 for r in records)
