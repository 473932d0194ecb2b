"""The CLI: listings, and every bad input ending in one line on stderr with exit status 2."""

import json

import pytest
from click.testing import CliRunner

from tests.plugin_fixtures import sources
from tokenbench.cli import cli


def invoke(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_methods_lists_builtins_with_their_plugin():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert "native" in lines["random"] and "baselines (tokenbench" in lines["random"]
    assert "vision_out" in lines["none"]


def test_methods_pattern_filters():
    result = invoke("methods", "rand*")
    names = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert names == ["random"]


def test_plugins_prints_json_with_what_each_registered():
    result = invoke("plugins")
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["baselines"]["registered"]["compressors"] == ["none", "random"]
    assert plugins["baselines"]["version"]


def test_loose_plugin_shows_in_methods(tmp_path):
    (tmp_path / "normkeep.py").write_text(sources.GOOD_METHOD.format(name="normkeep-cli"))
    result = invoke("--plugins-dir", str(tmp_path), "methods")
    assert "normkeep-cli" in result.stdout and str(tmp_path) in result.stdout


BAD_INPUTS = [
    (["run", "--methods", "randm"], "unknown method 'randm'; did you mean 'random'? available: "),
    (["run", "--methods", "random,random"], "method 'random' is given twice in --methods"),
    (["run", "--methods", "random", "--budgets", "0"], "budget '0' must be a positive token count"),
    (["run", "--methods", "random", "--budgets", "-5"], "neither a positive integer"),
    (["run", "--methods", "random", "--budgets", "150%"], "must be a percentage in (0, 100]"),
    (["run", "--methods", "random", "--budgets", "0%"], "must be a percentage in (0, 100]"),
    (["run", "--methods", "random", "--budgets", "lots"], "neither a positive integer"),
    (["run", "--methods", "random", "--budgets", "64,64"], "budget 64 is given twice"),
    (["run", "--methods", "random", "-o", "randm.seed=1"], "unknown method 'randm'; did you mean 'random'?"),
    (["run", "--methods", "random", "-o", "random.nope=1"], "unknown option 'nope' for method 'random'"),
    (["run", "--methods", "random", "-o", "none.x=1"], "sets an option of 'none', which is not in --methods"),
    (["run", "--methods", "random", "-o", "random"], "must look like METHOD.KEY=VALUE"),
    (["run", "--methods", "random", "--tasks", "shapez"], "unknown task 'shapez'"),
    (["run", "--methods", "random", "--model", "tiny-lava"], "unknown model 'tiny-lava'"),
    (["run", "--methods", "random", "--limit", "0"], "Invalid value for '--limit'"),
    (["--plugins-dir", "/no/such/dir", "methods"], "plugins dir '/no/such/dir' does not exist"),
    (["run", "--no-such-flag"], "No such option '--no-such-flag'"),
    (["methods", "zzz*"], "unknown method 'zzz*'"),
    (["run", "--methods", "random", "--budgets", "12.3450%,12.345%"], "budget 12.345% is given twice"),
    (["run", "--methods", "random", "--seed", "-1"], "Invalid value for '--seed'"),
    (["run", "--methods", "random", "--device", "toaster"], "--device 'toaster' is not a torch device"),
    (["run", "--methods", "random", "--output", "/proc/no/such/dir"], "cannot be created"),
    (["leaderboard", "build", "--bogus"], "leaderboard build --help')"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("tokenbench: warning:")]
    assert len(lines) == 1 and lines[0].startswith("tokenbench: error: ") and message in lines[0], lines
    assert "Traceback" not in result.output


def test_option_of_the_wrong_type_is_rejected(tmp_path):
    (tmp_path / "normkeep.py").write_text(sources.GOOD_METHOD.format(name="normkeep-typed"))
    result = invoke("--plugins-dir", str(tmp_path), "run", "--methods", "normkeep-typed",
                    "-o", "normkeep-typed.largest=maybe")
    assert result.exit_code == 2
    assert "tokenbench: error: -o normkeep-typed.largest=maybe: Input should be a valid boolean" in result.stderr


def test_valid_option_passes_validation(tmp_path):
    from tokenbench.config import parse_option_assignments
    from tokenbench.plugins import load_registry

    (tmp_path / "normkeep.py").write_text(sources.GOOD_METHOD.format(name="normkeep-ok"))
    registry = load_registry(tmp_path)
    options = parse_option_assignments(("normkeep-ok.largest=false",), ["normkeep-ok"], registry)
    assert options == {"normkeep-ok": {"largest": False}}


def test_flash_attention_2_without_flash_attn_is_a_one_line_error(tiny_llava_dir, tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and CUDA are available here")
    result = invoke("run", "--model", str(tiny_llava_dir), "--methods", "random", "--limit", "1",
                    "--attn", "flash_attention_2", "--output", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "needs the flash-attn package" in result.stderr and "Traceback" not in result.output
