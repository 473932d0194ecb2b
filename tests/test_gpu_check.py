"""The GPU check script's code path, on CPU at tiny widths (``--dry-run``): it runs every arm, says
so in its exit status, reports a crashed arm with status 1 and refuses without CUDA with status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check
import sweep

TINY_CPU = ["--device", "cpu", "--dry-run", "--model-config", "llava-1.5-7b", "--dtype", "float32"]
DRY = [*TINY_CPU, "--methods", "apet,fastv", "--budgets", "576,64"]


def test_dry_run_times_every_arm(tmp_path, capsys):
    assert gpu_check.main([*DRY, "--json", str(tmp_path / "rows.json")]) == 0
    rows = next(iter(json.loads((tmp_path / "rows.json").read_text()).values()))
    assert [r["arm"] for r in rows] == ["none", "apet@64", "fastv@64"]
    for row in rows:
        assert row["error"] is None and row["skipped"] is None and row["rounds"] == 1
        assert row["kv_bytes"] > 0 and row["peak_memory_bytes"] > 0
    assert rows[0]["flops_bound"] == 1 and all(r["flops_bound"] > 1 for r in rows[1:])
    assert rows[1]["tokens"] == pytest.approx(64, abs=1) and rows[1]["reduce_share"] > 0
    assert "every arm ran" in capsys.readouterr().out


def test_a_crashed_arm_fails_the_check(monkeypatch, capsys):
    real = sweep.run_once

    def crash_apet(adapter, registry, arm, prompt, **kwargs):
        if arm.method == "apet":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(adapter, registry, arm, prompt, **kwargs)

    monkeypatch.setattr(sweep, "run_once", crash_apet)
    assert gpu_check.main([*TINY_CPU, "--methods", "apet", "--budgets", "64"]) == 1
    assert "apet@64: RuntimeError: CUDA error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_without_cuda_it_says_so_and_exits_2(capsys):
    assert gpu_check.main(["--methods", "apet"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_video_part_dry_run_and_refusal_without_cuda(tmp_path):
    """``gpu_video.sh --dry-run`` runs its tokenbench command on a tiny Video-LLaVA on the CPU and
    leaves the records; without --dry-run and without CUDA it exits 2 with one line."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_video.sh"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script), "--dry-run"], check=False, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "tiny-video-llava-sdpa" / "runs").glob("*.json")]
    ran = {(r["method"], r["budget"]) for r in records if not r.get("infeasible")}
    assert {("none", None), ("apet", "25%"), ("apet", "12.5%"), ("dycoke", "25%")} <= ran
    assert all(r["latency_ms"]["ttft"] is not None for r in records if not r.get("infeasible"))
    if not torch.cuda.is_available():
        refused = subprocess.run(["bash", str(script)], check=False, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 2 and "CUDA is not available" in refused.stderr
