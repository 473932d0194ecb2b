"""visionzip, fastervlm and vispruner end to end through the tiny LLaVA and Qwen2-VL adapters at the
default budgets: realised tokens, the signals each adapter served, the FlashAttention class."""

from __future__ import annotations

import pytest
from adapter_tools import adapter, model_dir, prompts
from torch.nn.attention import SDPBackend, sdpa_kernel

from tokenbench import Budget, Infeasible
from tokenbench.measure import classify_flash_attention
from tokenbench.plugins import load_registry

REGISTRY = load_registry()
CASES = [("visionzip", {}), ("visionzip", {"cls": "first"}), ("fastervlm", {}), ("vispruner", {}),
         ("vispruner", {"important_ratio": 0.75})]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method,options", CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_realised_tokens_meet_the_budget(request, family, method, options):
    a = adapter(family, model_dir(request, family), "sdpa")
    batch = prompts(family, 2)
    for text in ("33.3%", "22.2%", "11.1%"):
        budget = Budget.parse(text)
        compressor = REGISTRY.compressor(method)(**options)
        if family != "llava" and options.get("cls") == "first":
            with pytest.raises(Infeasible, match=f"cls_token.*{a.name}"):
                a.generate(batch, compressor=compressor, budget=budget, max_new_tokens=2)
            continue
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # runs under the fused kernel only
            out = a.generate(batch, compressor=compressor, budget=budget, max_new_tokens=2)
        for g in out:
            target = budget.target(g.trace.n_visual)
            assert abs(g.trace.realised_tokens - target) <= 0.02 * target
            assert len(set(g.trace.llm_visual)) == 1  # pre-LLM: every decoder layer sees the same count
            assert classify_flash_attention(g.trace) == compressor.flash_attention == "probe"
        expected = {"cls_attention"} if family == "llava" else {"attention_received"}
        assert expected <= compressor.needs
