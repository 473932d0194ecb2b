"""Running one compressor site: build the :class:`SiteInput`, call ``reduce``, apply the result.

These helpers are model-agnostic tensor bookkeeping shared by every stage of every adapter:
the visual block of a site is ``[B, N, D]`` with each token's ``origin`` (index in the original
grid, ``-1`` for tokens a method appended) and ``sizes`` (original tokens it stands for).

Multi-crop families (LLaVA-NeXT) put layout tokens (``image_newline``) inside the visual span. A
span block marks them with origin :data:`NEWLINE` and gives every token its layout ``line``; a
compressor only ever sees the visual tokens (:func:`visual_positions`), and :func:`with_newlines`
puts each newline back after the surviving tokens of its line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenbench.adapters.base import AdapterError
from tokenbench.compressor import SIGNAL_FIELDS, Reduction, Site, SiteInput, TokenCompressor

NEWLINE = -2  # origin of a layout (newline) token inside a span block; never shown to a compressor
AFTER_ALL_LINES = 2 ** 40  # layout line of appended tokens: they follow the last newline
BEFORE_ALL_LINES = -(2 ** 40)  # layout line of prefix tokens (``Reduction.prefix``): they lead the span


def _around(marked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``marked`` [B, N] (bool): the index of the last marked token at or before each token (-1
    when none) and whether a marked token comes at or after it."""
    index = torch.arange(marked.shape[1], device=marked.device).expand_as(marked)
    before = torch.where(marked, index, -1).cummax(dim=1).values
    after = marked.flip(1).long().cumsum(dim=1).flip(1) > 0
    return before, after


def block_lines(origin: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` layout line of every token of a block whose visual tokens (origin >= 0) lie on
    ``line`` [B, N] (read only there). Appended tokens (origin < 0): the leading ones are a
    ``prefix`` (``apply_reduction`` puts it first) and go before every layout token, the trailing
    ones follow the last one, and one between visual tokens (``Reduction.extra_after``) shares
    the line of the visual token before it, so it stays in that token's line (or frame)."""
    found = origin >= 0
    before, visual_after = _around(found)
    appended = torch.where(before < 0, BEFORE_ALL_LINES,
                           torch.where(visual_after, line.gather(1, before.clamp(min=0)), AFTER_ALL_LINES))
    return torch.where(found, line, appended)


def anchored_source(source: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """``source`` [B, K] (index into the old span, -1 for appended tokens) of a span whose tokens
    have ``origin`` [B, K], with every appended token (origin -1) that a visual token (origin >= 0)
    follows (``Reduction.extra_after``) mapped to the token before it, so it takes that token's
    position id; leading appended tokens, and those after the last visual token, stay -1."""
    appended = origin == -1
    before, _ = _around(~appended)
    _, visual_after = _around(origin >= 0)
    interior = appended & (before >= 0) & visual_after
    return torch.where(interior, source.gather(1, before.clamp(min=0)), source)


@dataclass(frozen=True)
class CropLayout:
    """Where each original visual token of a multi-crop image lies: ``table`` [N, 3] holds its
    (crop, y, x), y and x counted inside the crop's surviving ``grids[crop]`` (h, w)."""

    grids: tuple[tuple[int, int], ...]
    table: torch.Tensor

    def of(self, origin: torch.Tensor) -> torch.Tensor:
        """``[B, N, 3]`` (crop, y, x) of ``origin`` [B, N]; -1 for appended tokens (origin < 0)."""
        table = self.table.to(origin.device)
        found = table[origin.clamp(min=0)]
        return found.masked_fill((origin < 0)[..., None], -1)


@dataclass
class VisualBlock:
    """The visual tokens alive at a site, with their bookkeeping."""

    tokens: torch.Tensor  # [B, N, D]
    origin: torch.Tensor  # [B, N] long, -1 for appended tokens, NEWLINE for layout tokens
    sizes: torch.Tensor  # [B, N] float
    line: torch.Tensor | None = None  # [B, N] long: layout line of each token in a span with newlines

    @classmethod
    def fresh(cls, tokens: torch.Tensor) -> VisualBlock:
        b, n, _ = tokens.shape
        origin = torch.arange(n, device=tokens.device).expand(b, n).clone()
        return cls(tokens, origin, torch.ones(b, n, device=tokens.device, dtype=torch.float32))

    def to(self, device: torch.device) -> VisualBlock:
        """The block on ``device`` (a device map may run the vision tower elsewhere than the decoder)."""
        return VisualBlock(self.tokens.to(device), self.origin.to(device), self.sizes.to(device))


@dataclass
class Applied:
    """A reduction applied to a block: the new block and, per new token, its index in the old one."""

    block: VisualBlock
    source: torch.Tensor  # [B, K+E] index into the old block, -1 for the E appended tokens
    n_extra: int


def run_site(compressor: TokenCompressor, site: Site, keep: int, block: VisualBlock, grid: tuple[int, int],
             generator: torch.Generator | None, crops: CropLayout | None = None, frames: int = 1, *,
             generators: list[torch.Generator] | None = None,
             **signals: torch.Tensor | None) -> Applied:
    """Call ``compressor.reduce`` on ``block`` with the given signals and apply its reduction;
    ``crops`` fills the per-crop fields of the :class:`SiteInput` for multi-crop images, ``frames``
    the frame count of a video (``grid`` is then one frame's)."""
    fields = {field: need for need in compressor.site_needs(site) for field in SIGNAL_FIELDS.get(need, (need,))}
    wanted = {name: value for name, value in signals.items() if name in fields}
    missing = sorted({need for field, need in fields.items() if wanted.get(field) is None})
    if signals.get("text_valid") is not None:
        wanted["text_valid"] = signals["text_valid"]
    if missing:
        raise AdapterError(f"method '{compressor.name}' needs {', '.join(missing)} at site "
                           f"{site.stage}:{site.layer}, which this adapter cannot provide there; "
                           "schedule it at another stage")
    geometry = {} if crops is None else {"crops": crops.grids, "crop_origin": crops.of(block.origin)}
    x = SiteInput(visual=block.tokens, origin=block.origin, grid=grid, keep=keep, site=site,
                  generator=generator, sizes=block.sizes, frames=frames, generators=generators, **wanted,
                  **geometry)
    reduction = compressor.reduce(x)
    try:
        reduction.check(x)
    except ValueError as exc:
        raise AdapterError(f"method '{compressor.name}' returned an invalid reduction at "
                           f"{site.stage}:{site.layer}: {exc}") from exc
    return apply_reduction(block, reduction)


def apply_reduction(block: VisualBlock, reduction: Reduction) -> Applied:
    """Gather the kept tokens (or their merged ``values``), add ``extra`` tokens (after them all, or
    each at its ``extra_after`` place) and put ``prefix`` tokens first (both with origin -1)."""
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
        if reduction.extra_after is not None:  # each extra right after its place, kept tokens in order
            place = reduction.extra_after.to(keep.device, torch.long)
            order = torch.cat([2 * keep, 2 * place + 1], dim=1).argsort(dim=1, stable=True)
            tokens, origin, sizes, source = (_take(tokens, order), origin.gather(1, order),
                                             sizes.gather(1, order), source.gather(1, order))
    if reduction.prefix is not None and reduction.prefix.shape[1]:
        n_prefix = reduction.prefix.shape[1]
        tokens = torch.cat([reduction.prefix.to(tokens), tokens], dim=1)
        minus = torch.full((b, n_prefix), -1, dtype=torch.long, device=keep.device)
        origin = torch.cat([minus, origin], dim=1)
        sizes = torch.cat([torch.ones(b, n_prefix, dtype=sizes.dtype, device=sizes.device), sizes], dim=1)
        source = torch.cat([minus, source], dim=1)
    return Applied(VisualBlock(tokens.to(block.tokens.dtype), origin, sizes), source, n_extra)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x`` [B, N, D] and ``index`` [B, K]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def visual_positions(span: VisualBlock) -> torch.Tensor:
    """``[B, Nv]`` positions of the visual (non-newline) tokens of ``span``, in span order."""
    is_visual = span.origin != NEWLINE
    n_visual = int(is_visual[0].sum())
    return (~is_visual).int().argsort(dim=1, stable=True)[:, :n_visual]


def newline_positions(span: VisualBlock) -> torch.Tensor:
    """``[B, Nn]`` positions of the newline tokens of ``span``, in span order."""
    is_newline = span.origin == NEWLINE
    n_newlines = int(is_newline[0].sum())
    return (~is_newline).int().argsort(dim=1, stable=True)[:, :n_newlines]


def interleave(visual: Applied, visual_line: torch.Tensor, visual_source: torch.Tensor,
               newlines: torch.Tensor, newline_line: torch.Tensor, newline_source: torch.Tensor) -> Applied:
    """A span from reduced visual tokens and newline tokens: each newline follows the surviving
    tokens of its line (``*_line`` [B, ·]; appended tokens carry :data:`AFTER_ALL_LINES`), and
    ``*_source`` [B, ·] give each token's index in the span it replaces (-1: appended)."""
    block = visual.block
    b, n_newlines = newline_line.shape
    keys = torch.cat([2 * visual_line, 2 * newline_line + 1], dim=1)
    order = keys.argsort(dim=1, stable=True)
    tokens = torch.cat([block.tokens, newlines.to(block.tokens)], dim=1)
    origin = torch.cat([block.origin, torch.full((b, n_newlines), NEWLINE, dtype=torch.long,
                                                 device=order.device)], dim=1)
    sizes = torch.cat([block.sizes, torch.ones(b, n_newlines, dtype=block.sizes.dtype,
                                               device=order.device)], dim=1)
    line = torch.cat([visual_line, newline_line], dim=1)
    source = torch.cat([visual_source, newline_source], dim=1)
    span = VisualBlock(_take(tokens, order), origin.gather(1, order), sizes.gather(1, order), line.gather(1, order))
    return Applied(span, source.gather(1, order), visual.n_extra)


def with_newlines(applied: Applied, span: VisualBlock, visual_at: torch.Tensor) -> Applied:
    """Put ``span``'s newline tokens back after ``applied``, a reduction of the visual tokens at span
    positions ``visual_at`` [B, Nv]; the result's ``source`` indexes ``span``."""
    assert span.line is not None, "a span with newline tokens carries their lines"
    source = applied.source
    span_source = torch.where(source >= 0, visual_at.gather(1, source.clamp(min=0)), -1)
    line = block_lines(source, span.line.gather(1, span_source.clamp(min=0)))
    at = newline_positions(span)
    return interleave(applied, line, span_source, _take(span.tokens, at), span.line.gather(1, at), at)
