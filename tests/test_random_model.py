"""``--model-config`` builds its random weights in ``--dtype`` (not the config's ``torch_dtype``) and the
run record describes the dtype that ran: provenance and KV-cache bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tokenbench
from tokenbench.cli import cli
from tokenbench.plugins import load_registry
from tokenbench.random_model import random_weight_adapter

PLUGINS = Path(__file__).parent / "test_runner_plugins"


@pytest.fixture(scope="module")
def narrow_llava_7b(tmp_path_factory) -> Path:
    """The shipped LLaVA-1.5-7B config (``torch_dtype`` float16) at tiny widths."""
    raw = json.loads((Path(tokenbench.__file__).parent / "configs" / "llava-1.5-7b.json").read_text())
    raw["text_config"] |= {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 4}
    raw["vision_config"] |= {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2}
    assert raw["torch_dtype"] == raw["text_config"]["torch_dtype"] == "float16"
    path = tmp_path_factory.mktemp("configs") / "llava-1.5-7b-narrow.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_weights_are_built_in_the_requested_dtype(narrow_llava_7b, dtype):
    adapter = random_weight_adapter(narrow_llava_7b, load_registry(), dtype=dtype, attn="sdpa",
                                    device=torch.device("cpu"))
    assert {p.dtype for p in adapter.model.parameters()} == {dtype}
    assert adapter.dtype == dtype


def test_the_record_says_which_dtype_ran_and_counts_its_kv_bytes(narrow_llava_7b, tmp_path):
    records = {}
    for dtype in ("float32", "bfloat16"):
        result = CliRunner().invoke(cli, ["--plugins-dir", str(PLUGINS), "run", "--model-config", str(narrow_llava_7b),
                                          "--tasks", "tiny", "--methods", "random", "--budgets", "64", "--dtype", dtype,
                                          "--output", str(tmp_path / dtype), "--json"],
                                    env={"TINY_SAMPLES": "1"}, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        records[dtype] = {r["method"]: r for r in json.loads(result.stdout)}
    for method in ("none", "random"):
        full, half = records["float32"][method], records["bfloat16"][method]
        assert full["provenance"]["dtype"] == "float32" and half["provenance"]["dtype"] == "bfloat16"
        assert half["kv_cache_bytes"] * 2 == full["kv_cache_bytes"] > 0  # same tokens, 2 bytes a value
