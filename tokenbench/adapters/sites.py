"""Running one compressor site: build the :class:`SiteInput`, call ``reduce``, apply the result.

These helpers are model-agnostic tensor bookkeeping shared by every stage of every adapter:
the visual block of a site is ``[B, N, D]`` with each token's ``origin`` (index in the original
grid, ``-1`` for tokens a method appended) and ``sizes`` (original tokens it stands for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenbench.adapters.base import AdapterError
from tokenbench.compressor import Reduction, Site, SiteInput, TokenCompressor


@dataclass
class VisualBlock:
    """The visual tokens alive at a site, with their bookkeeping."""

    tokens: torch.Tensor  # [B, N, D]
    origin: torch.Tensor  # [B, N] long, -1 for appended tokens
    sizes: torch.Tensor  # [B, N] float

    @classmethod
    def fresh(cls, tokens: torch.Tensor) -> VisualBlock:
        b, n, _ = tokens.shape
        origin = torch.arange(n, device=tokens.device).expand(b, n).clone()
        return cls(tokens, origin, torch.ones(b, n, device=tokens.device, dtype=torch.float32))


@dataclass
class Applied:
    """A reduction applied to a block: the new block and, per new token, its index in the old one."""

    block: VisualBlock
    source: torch.Tensor  # [B, K+E] index into the old block, -1 for the E appended tokens
    n_extra: int


def run_site(compressor: TokenCompressor, site: Site, keep: int, block: VisualBlock, grid: tuple[int, int],
             generator: torch.Generator | None, *, generators: list[torch.Generator] | None = None,
             **signals: torch.Tensor | None) -> Applied:
    """Call ``compressor.reduce`` on ``block`` with the given signals and apply its reduction."""
    wanted = {name: value for name, value in signals.items() if name in compressor.needs}
    missing = sorted(set(compressor.needs) - {k for k, v in wanted.items() if v is not None})
    if missing:
        raise AdapterError(f"method '{compressor.name}' needs {', '.join(missing)} at site "
                           f"{site.stage}:{site.layer}, which this adapter cannot provide there; "
                           "schedule it at another stage")
    x = SiteInput(visual=block.tokens, origin=block.origin, grid=grid, keep=keep, site=site,
                  generator=generator, sizes=block.sizes, generators=generators, **wanted)
    reduction = compressor.reduce(x)
    try:
        reduction.check(x)
    except ValueError as exc:
        raise AdapterError(f"method '{compressor.name}' returned an invalid reduction at "
                           f"{site.stage}:{site.layer}: {exc}") from exc
    return apply_reduction(block, reduction)


def apply_reduction(block: VisualBlock, reduction: Reduction) -> Applied:
    """Gather the kept tokens (or their merged ``values``) and append ``extra`` tokens."""
    keep = reduction.keep.to(block.tokens.device, torch.long)
    b = keep.shape[0]
    tokens = reduction.values if reduction.values is not None else _take(block.tokens, keep)
    origin = block.origin.gather(1, keep)
    sizes = (reduction.sizes.to(block.sizes) if reduction.sizes is not None
             else block.sizes.gather(1, keep))
    source = keep
    n_extra = 0
    if reduction.extra is not None and reduction.extra.shape[1]:
        n_extra = reduction.extra.shape[1]
        tokens = torch.cat([tokens, reduction.extra.to(tokens)], dim=1)
        minus = torch.full((b, n_extra), -1, dtype=torch.long, device=keep.device)
        origin = torch.cat([origin, minus], dim=1)
        sizes = torch.cat([sizes, torch.ones(b, n_extra, dtype=sizes.dtype, device=sizes.device)], dim=1)
        source = torch.cat([keep, minus], dim=1)
    return Applied(VisualBlock(tokens.to(block.tokens.dtype), origin, sizes), source, n_extra)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x`` [B, N, D] and ``index`` [B, K]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
