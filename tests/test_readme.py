"""The README stays true: its example plugin works and CI runs its commands."""

import re
import subprocess
from pathlib import Path

from tokenbench.plugins import load_registry
from tokenbench.testing import check_compressor

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no fenced block after <!-- {marker} -->"
    return match.group(1)


def test_example_plugin_loads_and_passes_the_contract(tmp_path):
    (tmp_path / "outliers.py").write_text(block_after("example-plugin"))
    registry = load_registry(tmp_path, entry_points=False)
    assert not registry.problems
    cls = registry.compressor("outliers")
    check_compressor(cls)
    check_compressor(cls, {"reference": "median"})
    assert len(block_after("example-plugin").strip().splitlines()) <= 40


def test_ci_runs_the_readme_quickstart_commands():
    script = ROOT / ".ci" / "run"
    for marker in ("quickstart:install", "quickstart:test"):
        command = block_after(marker).strip()
        extracted = subprocess.run(
            ["bash", "-c", (f"source <(sed -n '/^readme_command()/,/^}}/p' {script}); "
                            f"cd {ROOT} && readme_command {marker}")],
            capture_output=True, text=True, check=True).stdout.strip()
        assert extracted == command


def test_example_plugin_types_its_option_so_a_typo_is_rejected(tmp_path):
    import pytest

    from tokenbench.config import ConfigError, parse_option_assignments

    (tmp_path / "outliers.py").write_text(block_after("example-plugin"))
    registry = load_registry(tmp_path, entry_points=False)
    with pytest.raises(ConfigError, match=r"outliers\.reference=medain: .*'mean' or 'median'"):
        parse_option_assignments(("outliers.reference=medain",), ["outliers"], registry)
    assert "`Literal`" in README  # and the README says options should be typed that way


def test_readme_installs_from_the_repository_not_from_an_index():
    prose = " ".join(README.split())
    assert not re.search(r"pip install \"?tokenbench\b", prose)
    assert "not published on a package index" in prose and "pip wheel . --no-deps -w dist" in prose
