"""Plugin discovery: entry points, loose files, broken plugins and strict mode."""

import json
import subprocess
import sys

import pytest

from tests.plugin_fixtures import sources
from tokenbench.plugins import PluginError, UnknownName, load_registry
from tokenbench.testing import check_compressor


def write_plugin(directory, stem, text):
    directory.mkdir(exist_ok=True)
    (directory / f"{stem}.py").write_text(text)
    return directory


def test_builtin_methods_load_as_entry_points_of_tokenbench():
    registry = load_registry()
    for name in ("none", "random"):
        owner = registry.owner[("compressor", name)]
        assert owner.origin == "entry point" and owner.distribution == "tokenbench"


def test_loose_plugin_file_registers_and_passes_the_contract(tmp_path):
    plugins = write_plugin(tmp_path / "plugins", "normkeep_file", sources.GOOD_METHOD.format(name="normkeep-file"))
    registry = load_registry(plugins)
    cls = registry.compressor("normkeep-file")
    assert registry.owner[("compressor", "normkeep-file")].origin == "plugins dir"
    check_compressor(cls)


def test_plugins_dir_from_environment(tmp_path, monkeypatch):
    plugins = write_plugin(tmp_path / "env", "envplug", sources.GOOD_METHOD.format(name="from-env"))
    monkeypatch.setenv("TOKENBENCH_PLUGINS_DIR", str(plugins))
    assert "from-env" in load_registry().compressors


@pytest.mark.parametrize("text, reason", [
    (sources.IMPORT_ERROR, "failed to import: ModuleNotFoundError"),
    (sources.MISSPELLED_HOOK, "unknown hook 'register_compresors'; did you mean 'register_compressors'?"),
    (sources.INVALID_REGISTRATION, "registered an invalid compressor"),
    (sources.RAISING_HOOK, "register_compressors raised RuntimeError: boom"),
])
def test_broken_plugin_is_reported_by_name_and_skipped(tmp_path, text, reason):
    plugins = write_plugin(tmp_path / "plugins", "broken", text)
    write_plugin(plugins, "good", sources.GOOD_METHOD.format(name="still-works"))
    registry = load_registry(plugins)
    assert "still-works" in registry.compressors
    problems = [p for p in registry.problems if "broken" in p]
    assert len(problems) == 1 and reason in problems[0], registry.problems


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path, monkeypatch):
    plugins = write_plugin(tmp_path / "plugins", "broken", sources.IMPORT_ERROR)
    monkeypatch.setenv("TOKENBENCH_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin broken .*failed to import"):
        load_registry(plugins, entry_points=False)


def test_duplicate_name_names_both_origins(tmp_path):
    plugins = write_plugin(tmp_path / "plugins", "first", sources.GOOD_METHOD.format(name="twin"))
    write_plugin(plugins, "second", sources.GOOD_METHOD.format(name="twin"))
    registry = load_registry(plugins, entry_points=False)
    (problem,) = registry.problems
    assert "method 'twin' is already registered by plugin first" in problem and "second" in problem


def test_unknown_name_suggests_the_closest():
    registry = load_registry()
    with pytest.raises(UnknownName, match=r"unknown method 'randm'; did you mean 'random'\? available: .*none"):
        registry.compressor("randm")


def test_contract_suite_rejects_a_broken_compressor():
    from tokenbench import Reduction, Site, Stage, TokenCompressor

    class Unsorted(TokenCompressor):
        name = "unsorted"
        stages = (Stage.PROJECTOR,)

        def schedule(self, n_visual, budget, info):
            return [(Site(Stage.PROJECTOR), round(budget))]

        def reduce(self, x):
            import torch
            return Reduction(torch.arange(x.keep).flip(0).expand(x.visual.shape[0], -1))

    with pytest.raises(AssertionError, match="sorted ascending"):
        check_compressor(Unsorted)


@pytest.fixture(scope="module")
def installed_plugin_package(tmp_path_factory):
    """Build and pip-install a throwaway third-party package with a `tokenbench` entry point."""
    root = tmp_path_factory.mktemp("normkeep_pkg")
    (root / "pyproject.toml").write_text(sources.PYPROJECT)
    (root / "tokenbench_normkeep.py").write_text(sources.GOOD_METHOD.format(name="normkeep"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", str(root)]
    subprocess.run(pip, check=True, capture_output=True)
    yield "tokenbench-normkeep"
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "tokenbench-normkeep"],
                   check=True, capture_output=True)


def test_installed_third_party_package_shows_up_and_passes_the_contract(installed_plugin_package):
    out = subprocess.run([sys.executable, "-m", "tokenbench.cli", "methods", "normkeep"],
                         check=True, capture_output=True, text=True).stdout
    assert "normkeep" in out and "tokenbench-normkeep 0.3.1" in out
    plugins = json.loads(subprocess.run([sys.executable, "-m", "tokenbench.cli", "plugins"],
                                        check=True, capture_output=True, text=True).stdout)
    (record,) = [p for p in plugins if p["distribution"] == installed_plugin_package]
    assert record["registered"]["compressors"] == ["normkeep"] and record["version"] == "0.3.1"
    registry = load_registry()
    check_compressor(registry.compressor("normkeep"))
