"""What a person reads from the CLI: help texts, listings that fit a terminal, duplicate names."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from tokenbench.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, terminal_width=80)


def test_top_level_help_shows_whole_command_descriptions():
    result = invoke("--help")
    assert result.exit_code == 0
    commands = result.stdout.split("Commands:")[1]
    assert "..." not in commands
    for name in ("leaderboard", "methods", "models", "plugins", "run", "tasks"):
        assert re.search(rf"^  {name} ", commands, re.MULTILINE), name
    assert "Run methods x budgets x tasks on a model (plus the uncompressed baseline)." in " ".join(commands.split())


@pytest.mark.parametrize("option", ["--output", "--seed", "--dtype", "--attn", "--device"])
def test_every_run_option_has_a_help_text(option):
    text = invoke("run", "--help").stdout
    entry = text.split(f"  {option}")[1].split("\n  -")[0]
    described = re.sub(r"\[[^\]]*\]", "", entry)  # without [default: ...] and [choice|choice]
    assert re.search(r"\b[a-z]{3,}\b", described), entry  # metavars are upper case; help is prose


def test_tasks_table_fits_a_wide_terminal():
    result = invoke("tasks")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("pope") for line in lines)
    assert max(map(len, lines)) <= 110, max(lines, key=len)


def test_a_task_given_twice_is_rejected():
    result = invoke("run", "--methods", "random", "--tasks", "shapes,shapes")
    assert result.exit_code == 2
    assert result.stderr.strip() == "tokenbench: error: --tasks names shapes twice; give each task once"
