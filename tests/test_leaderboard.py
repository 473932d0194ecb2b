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
    assert "tokens ↓" in table[0] and "relative % ↑ [95% CI]" in table[0] and "GFLOPs prefill ↓" in table[0]
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


@pytest.mark.parametrize("field,value", [("scoring", "lenient"), ("protocol", "llava")])
def test_runs_under_another_scoring_or_protocol_get_separate_sections(field, value):
    """--scoring and --protocol change what a score means (and the settings hash), as --limit does."""
    records = golden_records()
    other = json.loads(json.dumps(next(r for r in records if r["model"] == "tiny-llava-shapes")))
    other["provenance"][field] = value
    text = render_markdown([*records, other])
    assert f"## tiny-llava-shapes ({field} {value})" in text


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


# ------------------------------------------------------------------------------- issue 15: honest tables

def _shapes(records: list[dict], method: str, budget: str | None) -> dict:
    return next(r for r in records if r["model"] == "tiny-llava-shapes" and r["method"] == method
                and r["budget"] == budget)


def _table_rows(text: str, heading: str) -> list[list[str]]:
    table = text.split(heading)[1].split("\n\n")[1].splitlines()
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in table]


def test_over_budget_results_are_marked_listed_last_and_off_the_plot_line():
    from tokenbench.leaderboard import over_budget, plot_points

    records = golden_records()
    apet = _shapes(records, "apet", "192")
    apet["realised_tokens"], apet["realised_ratio"] = 260.0, 260 / 576  # 35% over the budget of 192
    assert over_budget(apet) and not over_budget(_shapes(records, "fastv", "192"))
    text = render_markdown(records)
    rows = _table_rows(text, "### tiny-llava-shapes · budget 192")
    assert [r[0] for r in rows[2:]] == ["none", "fastv", "apet"]  # out of the comparison, after the others
    assert "⚠ over budget" in rows[4][2] and "⚠" not in rows[3][2]
    assert "⚠ over budget: the method processed more visual tokens than the budget allows" in text
    points = plot_points([r for r in records if r["model"] == "tiny-llava-shapes"])["apet"]
    assert [(p["budget"], p["over_budget"]) for p in points] == [("64", False), ("192", True)]
    within = dict(apet, realised_tokens=195.0)  # 1.6% over: within the 2% tolerance
    assert not over_budget(within | {"over_budget": None})
    assert over_budget(within | {"over_budget": True})  # the run record's verdict wins


def test_flops_unit_is_chosen_per_table():
    text = render_markdown(golden_records())
    tiny = _table_rows(text, "### tiny-llava-shapes · budget 192")
    assert "GFLOPs prefill ↓" in tiny[0] and tiny[2][tiny[0].index("GFLOPs prefill ↓")] == "0.638"
    big = _table_rows(text, "### llava-1.5-7b · budget 11.1%")
    assert "TFLOPs prefill ↓" in big[0] and big[2][big[0].index("TFLOPs prefill ↓")] == "9.315"


def test_latencies_show_their_spread_and_count_and_cpu_latencies_carry_a_note():
    records = golden_records()
    baseline = _shapes(records, "none", None)
    baseline["latency_ms"] |= {"ttft_iqr": [28.0, 33.25], "end_to_end_iqr": [41.0, 52.5], "repeats": 9}
    baseline["timing_conditions"] = {"load_average": 3.4, "cpus": 2, "threads": 2, "device_type": "cpu"}
    text = render_markdown(records)
    rows = _table_rows(text, "### tiny-llava-shapes · budget 192")
    header = rows[0]
    assert rows[2][header.index("TTFT ms ↓ [IQR]")] == "30.50 [28.00–33.25]"
    assert rows[2][header.index("end-to-end ms ↓ [IQR] n")] == "45.25 [41.00–52.50] n=9"
    assert ("Latencies measured on a CPU (2 threads), with a 1-minute load average of 3.4–3.4 on 2 cores "
            "while timing: not comparable between runs or machines.") in text


def test_plot_labels_budgets_shows_ci_error_bars_and_one_colour_per_method():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from tokenbench.leaderboard import draw_plot

    runs = [r for r in golden_records() if r["model"] == "tiny-llava-shapes"]
    fig, ax = plt.subplots()
    draw_plot(ax, runs, "tiny")
    assert sorted(t.get_text() for t in ax.texts) == ["192", "192", "64"]  # apet 192/64, fastv 192
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    by_label = {c.get_label(): c for c in bars}
    assert set(by_label) == {"uncompressed", "apet", "fastv"}
    apet = by_label["apet"]
    segments = apet.lines[2][0].get_segments()  # one vertical bar per point: the 95% CI
    assert sorted((round(s[0][1], 1), round(s[1][1], 1)) for s in segments) == [(80.2, 94.0), (94.1, 101.6)]
    colours = {label: c.lines[0].get_color() for label, c in by_label.items()}
    assert len(set(colours.values())) == 3
    assert ax.get_xlabel().startswith("prefill GFLOPs")
    plt.close(fig)


# -------------------------------------------------------------------- issue 15: several --results inputs

def _two_results(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(GOLDEN / "results", first)
    shutil.copytree(GOLDEN / "results", second)
    return first, second


def test_the_same_computation_from_two_results_is_kept_once(tmp_path):
    first, second = _two_results(tmp_path)
    for path in second.glob("*.json"):  # timed again elsewhere: other latencies, same results
        record = json.loads(path.read_text())
        record["latency_ms"] = {"ttft": 1.0, "end_to_end": 2.0}
        path.write_text(json.dumps(record))
    out = tmp_path / "board"
    built = invoke(["leaderboard", "build", "--results", str(first), "--results", str(second), "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert len(list((out / "results").glob("*.json"))) == len(list(first.glob("*.json")))
    assert (out / "README.md").read_text() == (GOLDEN / "leaderboard.md").read_text()


def test_colliding_records_of_other_settings_get_their_own_section(tmp_path):
    first, second = _two_results(tmp_path)
    for path in second.glob("*.json"):
        record = json.loads(path.read_text())
        record["provenance"]["limit"] = 8
        record["score"] = (record["score"] or 0) + 1
        path.write_text(json.dumps(record))
    out = tmp_path / "board"
    built = invoke(["leaderboard", "build", "--results", str(first), "--results", str(second), "--out", str(out)])
    assert built.exit_code == 0, built.output
    files = list((out / "results").glob("*.json"))
    assert len(files) == 2 * len(list(first.glob("*.json")))  # nothing dropped
    text = (out / "README.md").read_text()
    assert "## tiny-llava-shapes (limit None)" in text and "## tiny-llava-shapes (limit 8)" in text


def test_colliding_records_that_cannot_be_told_apart_fail_naming_both_files(tmp_path):
    first, second = _two_results(tmp_path)
    path = second / "tiny-llava-shapes__shapes__apet__192.json"
    record = json.loads(path.read_text())
    record["score"] = 12.5  # same settings, other result
    path.write_text(json.dumps(record))
    out = tmp_path / "board"
    failed = invoke(["leaderboard", "build", "--results", str(first), "--results", str(second), "--out", str(out)])
    assert failed.exit_code == 2
    assert str(first / path.name) in failed.stderr and str(path) in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


def test_tables_show_the_paired_speed_up_with_its_range():
    """Issue 22: the speed-up over the baseline as a paired ratio, beside the milliseconds."""
    records = golden_records()
    _shapes(records, "apet", "192")["speedup"] = {"ttft": 1.5, "ttft_range": [1.25, 1.75], "pairs": 9,
                                                  "end_to_end": 1.4, "end_to_end_range": [1.2, 1.6]}
    rows = _table_rows(render_markdown(records), "### tiny-llava-shapes · budget 192")
    column = rows[0].index("TTFT speed-up ↑ [range]")
    assert [row[column] for row in rows[2:]] == ["—", "1.50× [1.25–1.75]", "n/c"]  # fastv: other hardware


def test_tasks_with_families_get_a_table_of_scores_per_family():
    records = json.loads(json.dumps(golden_records()))
    shapes = [r for r in records if r["model"] == "tiny-llava-shapes"]
    for k, record in enumerate(shapes):
        record["metrics"] = {"accuracy": record["score"], "accuracy/colour": 90.0 + k, "accuracy/counting": 10.0 * k}
    text = render_markdown(records)
    section = text.split("## tiny-llava-shapes\n", 1)[1].split("\n## ")[0]
    table = section.split("by part (accuracy per colour / counting)\n\n", 1)[1].split("\n\n")[0].splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == ["method", "budget", "colour", "counting", "all"]
    body = [[c.strip() for c in row.split("|")[1:-1]] for row in table[2:]]
    assert body[0][:2] == ["none", "—"] and [row[0] for row in body].count("none") == 1
    feasible = [r for r in shapes if not r.get("infeasible") and r["method"] != "none"]
    assert len(body) == 1 + len(feasible)
    by_row = {(r["method"], r["budget"] or "—"): r for r in shapes}
    for row in body:
        record = by_row[(row[0], row[1])]
        assert row[2:4] == [f"{record['metrics']['accuracy/colour']:.1f}", f"{record['metrics']['accuracy/counting']:.1f}"]
    assert "by part" not in render_markdown(golden_records())  # records without parts: no table
