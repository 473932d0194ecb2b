"""Leaderboard rendering against golden files, and the build/check commands."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenbench.cli import cli
from tokenbench.leaderboard import render_markdown

GOLDEN = Path(__file__).parent / "golden"


def golden_records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((GOLDEN / "results").glob("*.json"))]


def test_markdown_matches_golden_file():
    rendered = render_markdown(golden_records())
    if os.environ.get("TOKENBENCH_UPDATE_GOLDEN"):
        (GOLDEN / "leaderboard.md").write_text(rendered)
    assert rendered == (GOLDEN / "leaderboard.md").read_text()


def test_rendering_is_independent_of_record_order():
    records = golden_records()
    assert render_markdown(records[::-1]) == render_markdown(records)


def test_table_layout():
    text = render_markdown(golden_records())
    table = text.split("### tiny-llava-shapes · budget 192")[1].split("\n\n")[1].splitlines()
    assert table[0].split("|")[1].strip() == "method"
    assert "tokens ↓" in table[0] and "relative % ↑ [95% CI]" in table[0] and "TFLOPs prefill ↓" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["none", "apet", "fastv"]  # baseline first
    fastv = table[4]
    assert "n/c" in fastv  # measured on another hardware fingerprint than the baseline
    assert "probe (1 row, +0.02 ms)" in fastv
    assert text.index("budget 192") < text.index("budget 64")
    assert "infeasible ¹" in text and "¹ fastv at budget 64: FastV keeps" in text
    for line in text.splitlines():
        assert "UTC" not in line and "2026-" not in line  # nothing time-dependent


def test_runs_with_different_settings_get_separate_sections():
    records = golden_records()
    shapes_runs = [r for r in records if r["model"] == "tiny-llava-shapes"]
    subset = json.loads(json.dumps(shapes_runs[0]))
    subset["provenance"]["limit"] = 50
    text = render_markdown([*records, subset])
    assert "## tiny-llava-shapes (limit None)" in text and "## tiny-llava-shapes (limit 50)" in text
    assert "## llava-1.5-7b\n" in text  # a model whose runs agree keeps its plain heading
    limited = text.split("## tiny-llava-shapes (limit 50)\n", 1)[1].split("\n## ")[0]
    assert limited.count("| " + subset["method"] + " ") == 1  # not merged with the full runs


def invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_build_then_check_and_a_stale_page_fails(tmp_path):
    results, out = tmp_path / "results-in", tmp_path / "board"
    shutil.copytree(GOLDEN / "results", results)
    (results / "manifest.json").write_text('{"schema_version": 1, "arguments": {}}')  # not a run record
    built = invoke(["leaderboard", "build", "--results", str(results), "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert (out / "README.md").read_text() == (GOLDEN / "leaderboard.md").read_text()
    assert sorted(p.name for p in (out / "results").iterdir()) == sorted(p.name for p in (GOLDEN / "results").iterdir())
    plots = sorted(out.glob("*.png"))
    assert [p.name for p in plots] == ["llava-1.5-7b__plot__accuracy__flops.png",
                                       "tiny-llava-shapes__plot__accuracy__flops.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    assert invoke(["leaderboard", "check", "--out", str(out)]).exit_code == 0
    page = out / "README.md"
    page.write_text(page.read_text().replace("97.9 [94.1, 101.6]", "99.9 [94.1, 101.6]"))
    stale = invoke(["leaderboard", "check", "--out", str(out)])
    assert stale.exit_code == 1 and "differs from what" in stale.stderr and "line" in stale.stderr

    record = json.loads((out / "results" / "tiny-llava-shapes__shapes__apet__192.json").read_text())
    record["score"] = 10.0
    (results / "tiny-llava-shapes__shapes__apet__192.json").write_text(json.dumps(record))
    assert invoke(["leaderboard", "build", "--results", str(results), "--out", str(out)]).exit_code == 0
    assert "| 10.0 " in page.read_text()  # the newer run replaced the older copy
    assert invoke(["leaderboard", "check", "--out", str(out)]).exit_code == 0


def test_bad_inputs_are_one_line_errors(tmp_path):
    missing = invoke(["leaderboard", "build", "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert missing.exit_code == 2 and missing.stderr.startswith("tokenbench: error: results")
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = invoke(["leaderboard", "build", "--results", str(empty), "--out", str(tmp_path / "b")])
    assert nothing.exit_code == 2 and "no run records" in nothing.stderr
    unchecked = invoke(["leaderboard", "check", "--out", str(tmp_path / "none")])
    assert unchecked.exit_code == 2 and "no run records" in unchecked.stderr


def test_committed_leaderboard_matches_its_json():
    from tokenbench.leaderboard import check

    committed = Path(__file__).resolve().parent.parent / "leaderboard"
    if not (committed / "results").is_dir():
        pytest.skip("no leaderboard/ next to the tests (an installed copy)")
    assert check(committed) is None
