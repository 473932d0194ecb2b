"""Helpers for the adapter tests: images, prompts, the stock HF reference and test compressors."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from PIL import Image

from tokenbench import Budget, ModelInfo, Reduction, Site, SiteInput, Stage, TokenCompressor
from tokenbench.adapters.base import Prompt
from tokenbench.adapters.llava import LlavaAdapter
from tokenbench.adapters.qwen2_vl import Qwen2VLAdapter

ALL = Budget(ratio=1.0)


def image(seed: int, size: int) -> Image.Image:
    """A deterministic noisy picture (distinct per seed), so visual tokens differ from each other."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def prompts(family: str, batch: int) -> list[Prompt]:
    """``batch`` prompts of different text lengths (so batch 2 is left-padded)."""
    size = 336 if family == "llava" else 224
    texts = ["what color is the circle ?", "how many ?"]
    return [Prompt(image(i, size), texts[i % 2]) for i in range(batch)]


def model_dir(request, family: str) -> str:
    """The session fixture's checkpoint directory for ``family``."""
    return str(request.getfixturevalue(f"tiny_{family}_dir"))


@functools.cache
def adapter(family: str, path: str, attn: str):
    cls = LlavaAdapter if family == "llava" else Qwen2VLAdapter
    return cls.load(path, attn=attn)


def stock_generate(a, batch_prompts: list[Prompt], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, T] and logits [B, T, V] from the stock ``model.generate`` on the same inputs."""
    enc = a._encode(batch_prompts)
    kwargs = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **enc.image_inputs)
    if isinstance(a, Qwen2VLAdapter):
        kwargs["mm_token_type_ids"] = (enc.input_ids == enc.image_token_id).int()
    with torch.no_grad():
        out = a.model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    return out.sequences[:, enc.input_ids.shape[1]:], torch.stack(out.logits, dim=1)


@dataclass
class Seen:
    """What a test compressor received at one site."""

    site: Site
    x: SiteInput


class Scripted(TokenCompressor):
    """Acts at one site: keeps every ``stride``-th token (stride 1 = keep all), optionally merging
    neighbours into ``values`` / ``sizes`` and appending ``extra`` tokens; records its inputs."""

    name = "scripted"
    stages = tuple(Stage)

    def __init__(self, site: Site, stride: int = 1, *, needs: frozenset[str] = frozenset(),
                 queries: str = "last", positions: str = "original", merge: bool = False, extra: int = 0,
                 proportional: bool = False, source: str = "previous") -> None:
        super().__init__()
        self.site, self.stride, self.merge, self.extra = site, stride, merge, extra
        self.needs = needs
        self.attention_queries = queries
        self.attention_source = source
        self.positions = positions
        self.proportional_attention = proportional
        self.seen: list[Seen] = []

    def kept(self, n: int) -> int:
        return -(-n // self.stride)

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        return [(self.site, self.kept(n_visual))]

    def reduce(self, x: SiteInput) -> Reduction:
        self.seen.append(Seen(x.site, x))
        b, n, d = x.visual.shape
        keep = torch.arange(0, n, self.stride, device=x.visual.device).expand(b, -1).clone()
        values = sizes = None
        if self.merge and self.stride == 2:  # each kept token absorbs its right neighbour
            pairs = x.visual[:, : 2 * (n // 2)].reshape(b, n // 2, 2, d).mean(dim=2)
            values = x.visual.gather(1, keep.unsqueeze(-1).expand(-1, -1, d)).clone()
            values[:, : n // 2] = pairs
            sizes = x.sizes.gather(1, keep).clone()
            sizes[:, : n // 2] += x.sizes[:, 1: 2 * (n // 2): 2]
        extra = x.visual[:, :self.extra].flip(1) * 0.5 if self.extra else None
        return Reduction(keep, values=values, extra=extra, sizes=sizes)


def counted_flops(run):
    """``run()`` under ``FlopCounterMode`` with the math SDPA backend (which decomposes attention into
    matmuls the counter sees): its result, and ``total(pattern)``, the FLOPs counted in the modules
    whose names fully match the regular expression ``pattern``."""
    import re

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = run()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}

    def total(pattern: str) -> int:
        return sum(v for k, v in counts.items() if re.fullmatch(pattern, k))

    return result, total
