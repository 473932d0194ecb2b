"""Stochastic methods run batched: each sample draws from its own generator, seeded from (run seed,
sample key), so its kept tokens and its answer depend neither on its batch position, nor on the batch
size, nor on which samples a resumed run still had to compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from adapter_tools import adapter, image, model_dir
from click.testing import CliRunner
from tokenbench.methods.apet import ApET
from tokenbench.methods.baselines import RandomKeep

from tokenbench import Budget, Site, SiteInput, Stage
from tokenbench.adapters.base import Prompt
from tokenbench.adapters.staged import sample_seed
from tokenbench.cli import cli

TEXTS = ["what color is the circle ?", "how many ?", "is there a square on the left ?"]


def keyed_prompts(family: str, count: int) -> list[Prompt]:
    size = 336 if family == "llava" else 224
    return [Prompt(image(i, size), TEXTS[i % 3], key=f"sample-{i}") for i in range(count)]


def recording(base: type):
    """``base`` that remembers, per call of ``reduce``, each row's kept original-grid indices."""

    class Recording(base):
        def __init__(self, **options) -> None:
            super().__init__(**options)
            self.calls: list[tuple[Site, list[list[int]]]] = []

        def reduce(self, x: SiteInput):
            result = super().reduce(x)
            self.calls.append((x.site, [x.origin[row, result.keep[row]].tolist() for row in range(len(result.keep))]))
            return result

    return Recording


def per_sample(runs: list[tuple[list[Prompt], object, list]]) -> dict[str, tuple]:
    """{key: (answer, ((site, kept), ...))} from generate calls on batches of keyed prompts."""
    out: dict[str, tuple] = {}
    for batch, compressor, generations in runs:
        for row, (prompt, generation) in enumerate(zip(batch, generations)):
            kept = tuple((site, tuple(rows[row])) for site, rows in compressor.calls)
            out[prompt.key] = (generation.text, kept)
    return out


def generate_in(family: str, a, batches: list[list[Prompt]], base: type, seed: int = 5) -> dict[str, tuple]:
    runs = []
    for batch in batches:
        compressor = recording(base)()
        runs.append((batch, compressor, a.generate(batch, compressor=compressor, budget=Budget.parse("22.2%"),
                                                   max_new_tokens=3, seed=seed)))
    return per_sample(runs)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("base", [ApET, RandomKeep], ids=["apet", "random"])
def test_draws_follow_the_sample_not_the_batch(request, family, base):
    a = adapter(family, model_dir(request, family), "sdpa")
    assert a.batchable(base())
    samples = keyed_prompts(family, 4)
    together = generate_in(family, a, [samples], base)
    reversed_order = generate_in(family, a, [samples[::-1]], base)
    one_by_one = generate_in(family, a, [[p] for p in samples], base)
    resumed = generate_in(family, a, [samples[:1], samples[1:]], base)  # a run killed after sample 0
    assert together == reversed_order == one_by_one == resumed
    sites = {site for _, kept in together.values() for site, _ in kept}
    if base is ApET and family == "llava":
        assert {s.stage for s in sites} == {Stage.VISION_OUT, Stage.LLM}  # both stages drew or ran per row
    assert len({kept for _, kept in together.values()}) == 4  # distinct images, distinct selections
    other_seed = generate_in(family, a, [samples], base, seed=6)
    assert other_seed != together  # the run seed still matters


def test_sample_seed_depends_on_seed_and_key_only():
    assert sample_seed(0, "a") == sample_seed(0, "a")
    assert len({sample_seed(0, "a"), sample_seed(1, "a"), sample_seed(0, "b")}) == 3
    assert 0 <= sample_seed(2**32 - 1, "x" * 1000) < 2**63


def test_unkeyed_prompts_draw_from_their_content():
    first, second = Prompt(image(0, 32), "a"), Prompt(image(1, 32), "a")
    assert first.draw_key() == Prompt(image(0, 32), "a").draw_key()
    assert first.draw_key() != second.draw_key() != Prompt(image(1, 32), "b").draw_key()
    assert Prompt(image(0, 32), "a", key="s1").draw_key() == "s1"


def test_row_generators_give_each_row_its_own_stream():
    visual = torch.zeros(3, 10, 4)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    x = SiteInput(visual, torch.arange(10).expand(3, 10), (2, 5), 4, Site(Stage.PROJECTOR), generators=generators)
    kept = RandomKeep().reduce(x).keep
    assert torch.equal(kept[0], kept[2]) and not torch.equal(kept[0], kept[1])
    shared = SiteInput(visual, x.origin, (2, 5), 4, Site(Stage.PROJECTOR), generator=torch.Generator())
    assert shared.row_generators() == [shared.generator] * 3


def test_a_resumed_run_answers_as_an_uninterrupted_one(tmp_path):
    """A run killed part-way and resumed with another batch size gives every sample the answer of the
    uninterrupted run (apet and random run batched; on the trained shapes model, at 16 of 144 tokens,
    answers follow the tokens drawn)."""
    args = ["run", "--tasks", "shapes", "--limit", "6", "--methods", "apet,random", "--budgets", "16",
            "--no-efficiency"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert CliRunner().invoke(cli, [*args, "--batch-size", "6", "--output", str(whole)]).exit_code == 0
    shutil.copytree(whole, killed)
    store = killed / "samples.jsonl"
    store.write_text("".join(store.read_text().splitlines(keepends=True)[:9]))  # the kill: 9 of 18 kept
    resumed = CliRunner().invoke(cli, [*args, "--batch-size", "4", "--output", str(killed)])
    assert resumed.exit_code == 0, resumed.output

    def answers(output: Path) -> dict[str, str]:
        records = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
        return {r["key"]: r["prediction"] for r in records if r["kind"] == "sample"}

    assert answers(killed) == answers(whole) and len(answers(whole)) == 18
