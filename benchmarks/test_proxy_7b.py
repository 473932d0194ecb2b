"""CPU proxy for LLaVA-1.5-7B prefill: does the prefill time fall as fast as the FLOPs?

A wide-and-shallow model with random weights, built from the shipped ``llava-1.5-7b`` config in fp32:
the real LLM width (4096 hidden, 32 heads, 11008 MLP, 32064 vocabulary) with 2 decoder layers, and
the real CLIP-L/336 tower shape (1024 wide, 16 heads, 14 px patches, 577 tokens) with 8 of its 24
blocks (7 run up to layer -2). Budgets 576 (``none``) and 192/128/64 for ``apet``, ``fastv``,
``sparsevlm`` and ``tome``, on one 336 px image with a 60-word question, batch 1, one token out.

Arms run interleaved (see ``sweep.py``); the table gives, per arm, the paired TTFT speed-up (vision +
LLM prefill) next to its FLOPs bound, and the same for the LLM prefill alone. Depth scaling: FastV's
K and ApET's stage-2 layer land on layer 1 of 2, so FastV runs ``budget_mode=after_k`` and SparseVLM
``schedule=reference`` (their layer averages cannot reach the budgets when layer 0 keeps all 576; the
FLOPs bound is computed from the tokens that actually ran); ToMe merges over 6 block gaps, not 22.

Not part of the normal suite (``testpaths`` is ``tests``). Run it with
``OMP_NUM_THREADS=1 pytest benchmarks/test_proxy_7b.py --benchmark-enable -s``; ``PROXY_ROUNDS``
(default 3) sets the timed rounds, ``PROXY_WARMUP`` (default 1) the untimed rounds before them (0: one
untimed baseline prefill only), ``PROXY_OUT`` a JSON file for the rows.
It needs about 4 GB of memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from sweep import (
    BASELINE,
    QUESTION,
    Prompt,
    arms,
    build_adapter,
    image_for,
    run_once,
    summarise,
    sweep,
    table,
)

from tokenbench.plugins import load_registry

TEXT = {"num_hidden_layers": 2}
VISION = {"num_hidden_layers": 8}
METHODS = ["apet", "fastv", "sparsevlm", "tome"]
BUDGETS = ["192", "128", "64"]
OPTIONS = {"fastv": {"budget_mode": "after_k"}, "sparsevlm": {"schedule": "reference"}}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def proxy(registry):
    return build_adapter("llava-1.5-7b", registry, dtype=torch.float32, device=torch.device("cpu"),
                         text=TEXT, vision=VISION)


@pytest.mark.benchmark(group="llava-1.5-7b proxy: 4096 wide, 2 decoder layers, 8 CLIP-L blocks")
def test_proxy_prefill_speedup_next_to_flops(benchmark, registry, proxy):
    arch = proxy.info().arch
    assert (arch.llm_hidden, arch.llm_heads, arch.llm_intermediate, arch.llm_layers) == (4096, 32, 11008, 2)
    assert (arch.vision_hidden, arch.vision_tokens, arch.vision_layers) == (1024, 577, 7)
    prompt = Prompt(image_for(proxy), QUESTION)
    plan = arms(METHODS, BUDGETS, OPTIONS)
    rounds = int(os.environ.get("PROXY_ROUNDS", "3"))
    warmup = int(os.environ.get("PROXY_WARMUP", "1"))
    if not warmup:
        run_once(proxy, registry, plan[0], prompt)  # one untimed prefill: first-call costs
    results = benchmark.pedantic(sweep, args=(proxy, registry, plan, prompt),
                                 kwargs={"rounds": rounds, "warmup": warmup, "log": print}, rounds=1, iterations=1)
    by_phase = {phase: summarise(results, phase) for phase in ("ttft", "prefill")}
    for phase, rows in by_phase.items():
        print(f"\n{phase} (median of {rounds} interleaved rounds; speed-up = paired ratio to '{BASELINE}')")
        print(table(rows, phase))
    benchmark.extra_info["rows"] = by_phase
    if os.environ.get("PROXY_OUT"):
        raw = {label: {"runs": r.runs, "flops": r.flops} for label, r in results.items()}
        Path(os.environ["PROXY_OUT"]).write_text(json.dumps({"rows": by_phase, "raw": raw}, indent=1))

    assert not [r["arm"] for r in by_phase["ttft"] if r["error"]]
    rows = {r["arm"]: r for r in by_phase["prefill"] if "ms" in r}
    assert rows[BASELINE]["tokens"] == 576 and rows[BASELINE]["speedup"] == 1.0
    for label, row in rows.items():
        if label != BASELINE:
            assert row["flops_bound"] > 1, label  # every compressed arm does less work in the LLM
            assert row["rounds"] == rounds
