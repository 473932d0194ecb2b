"""A video task through the harness: the checks before the run see the video's frames."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tokenbench.cli import cli
from tokenbench.leaderboard import render_markdown


def test_video_methods_are_planned_on_the_videos_frames(tmp_path):
    """DyCoke needs frames to merge across: planned on the default image it would be infeasible at
    every budget below 100%; planned on the task's first video it runs at 25% (its floor)."""
    result = CliRunner().invoke(cli, ["run", "--model", "tiny-video-llava-shapes", "--tasks", "shapes-video",
                                      "--methods", "dycoke", "--budgets", "25%", "--limit", "2",
                                      "--no-efficiency", "--output", str(tmp_path / "out"), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    dycoke = next(r for r in json.loads(result.stdout) if r["method"] == "dycoke")
    assert dycoke["infeasible"] is None
    assert dycoke["n_visual"] == 512 and abs(dycoke["realised_ratio"] - 0.25) < 0.02
    # its decode stage (on by default) is reported apart from the prefill budget: 12 layers scale DyCoke's
    # layer 3 of 28 to 1; the view holds int(128 · (1 − 0.7)) = 38 of the 128 visual entries TTM left
    assert dycoke["decode_samples"] == 2 and dycoke["decode_visual_tokens"] == 38
    assert dycoke["decode_kv_retention"] == 38 / 128
    assert "decode KV 29.7% ²" in render_markdown(json.loads(result.stdout))


def test_image_methods_on_next_block_signals_run_on_videos(tmp_path):
    """Issue #19: PruMerge+ reads the next CLIP block's CLS attention and keys, which Video-LLaVA serves
    per frame; at 25% of the 8 × 64 patch tokens it realises 128, its adaptive variant what its IQR
    count gives (flat attention in this model's untrained last CLIP block: one top token, four
    samples and the extra token)."""
    result = CliRunner().invoke(cli, ["run", "--model", "tiny-video-llava-shapes", "--tasks", "shapes-video",
                                      "--methods", "prumerge-plus,prumerge-plus-adaptive", "--budgets", "25%",
                                      "--limit", "2", "--no-efficiency", "--output", str(tmp_path / "out"),
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.stdout)}
    for method in ("prumerge-plus", "prumerge-plus-adaptive"):
        assert rows[method]["infeasible"] is None and rows[method]["n_errors"] == 0
        assert rows[method]["n_visual"] == 512
    assert rows["prumerge-plus"]["realised_tokens"] == 128 and rows["prumerge-plus"]["realised_ratio"] == 0.25
    assert rows["prumerge-plus-adaptive"]["realised_tokens"] < 16  # 6 here: it ignores the 128 budget
