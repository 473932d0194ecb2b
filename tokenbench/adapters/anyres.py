"""The token layout of an anyres (multi-crop) image: LLaVA-NeXT and LLaVA-OneVision.

The image is encoded as a base crop (the whole image at the encoder's size) plus sub-crops tiled
from one of ``image_grid_pinpoints``. The model packs the crops' tokens as: the base crop in raster
order, then the sub-crops as one combined grid, unpadded to the image's aspect ratio, row by row,
each row followed by one ``image_newline`` token. The layout is read off the model's own
``pack_image_features`` run on index tensors instead of features, so it is the stock arrangement by
construction, whatever the unpadding (and, for OneVision, the pooling) does.

:class:`AnyresImages` is what the two adapters share around the layout: batches of one image size,
one cached layout per size, the newlines put back into the span and the crops in ``ModelInfo``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from tokenbench.adapters.base import AdapterError, Prompt
from tokenbench.adapters.sites import (
    Applied,
    CropLayout,
    VisualBlock,
    block_lines,
    interleave,
)
from tokenbench.adapters.staged import Encoded
from tokenbench.compressor import ModelInfo

#: ``pack(features [C, P, K], image_size [2], newline [K]) -> [n_span, K]``: the model's packing.
Pack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AnyresLayout:
    """One image's visual span: which crop feature each visual token is and where newlines go.

    - ``visual_source`` [Nv]: index of each visual token (model order) in the crop features
      flattened crop-major (``crop · P + patch``); ``None`` when pooling mixes patches (OneVision).
    - ``visual_span`` / ``visual_line`` [Nv]: its position in the span and its layout line.
    - ``newline_span`` / ``newline_line`` [Nn]: the same for the newline tokens.
    - ``crops``: per-crop grids and each visual token's (crop, y, x).
    """

    n_span: int
    visual_source: torch.Tensor | None
    visual_span: torch.Tensor
    visual_line: torch.Tensor
    newline_span: torch.Tensor
    newline_line: torch.Tensor
    crops: CropLayout

    @property
    def n_visual(self) -> int:
        return self.visual_span.shape[0]

    def span(self, block: VisualBlock, newline: torch.Tensor) -> Applied:
        """The span replacing the placeholders, from the surviving visual tokens ``block`` (origin =
        index among this layout's visual tokens, -1 for appended) and the ``newline`` embedding [D]."""
        origin = block.origin
        b, device = origin.shape[0], origin.device
        found = origin >= 0
        at = origin.clamp(min=0)
        line = block_lines(origin, self.visual_line.to(device)[at])
        source = torch.where(found, self.visual_span.to(device)[at], -1)
        n_newlines = self.newline_span.shape[0]
        newlines = newline.to(block.tokens)[None, None].expand(b, n_newlines, -1)
        expand = (b, n_newlines)
        return interleave(Applied(block, source, 0), line, source, newlines,
                          self.newline_line.to(device).expand(*expand), self.newline_span.to(device).expand(*expand))


class AnyresImages:
    """Mixin of the anyres adapters (before their ``StagedAdapter`` base): they define
    ``_layout(image_size) -> AnyresLayout`` from the model's own packing and ``info(n_visual, grid,
    crops)``; this caches one layout per image size and serves the ``StagedAdapter`` hooks from it."""

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        self._layouts = lru_cache(maxsize=64)(self._layout)

    def _layout(self, image_size: tuple[int, int]) -> AnyresLayout:
        raise NotImplementedError

    def _info_of(self, encoded: Encoded) -> ModelInfo:
        return self.info(encoded.n_visual, grid=encoded.grid, crops=encoded.crops.grids)

    def _batch_key(self, prompt: Prompt) -> Any:
        return prompt.image.size if prompt.image is not None else None

    def _batch_layout(self, image_sizes: torch.Tensor) -> AnyresLayout:
        """The layout of a batch's images from the processor's ``image_sizes`` [B, 2] (one size)."""
        sizes = [tuple(s) for s in image_sizes.tolist()]
        if len(set(sizes)) != 1:
            raise AdapterError("a batch must hold images of one size; generate() groups them for you")
        return self._layouts(sizes[0])

    def _layout_of(self, encoded: Encoded) -> AnyresLayout:
        return self._layouts(tuple(encoded.image_inputs["image_sizes"][0].tolist()))

    def _encoded(self, tokens: Any, images: Any, layout: AnyresLayout) -> Encoded:
        """The batch from the tokenizer's ``input_ids`` / ``attention_mask`` (``tokens``) and the image
        processor's ``pixel_values`` / ``image_sizes`` (``images``), on the model's device."""
        device = self.device
        return Encoded(tokens["input_ids"].to(device), tokens["attention_mask"].to(device),
                       {"pixel_values": images["pixel_values"].to(device, self.dtype),
                        "image_sizes": images["image_sizes"].to(device)},
                       self.model.config.image_token_id, self.patch_grid, visual_count=layout.n_visual,
                       span_count=layout.n_span, crops=layout.crops)

    def _span(self, encoded: Encoded, block: VisualBlock) -> Applied:
        return self._layout_of(encoded).span(block, self.model.model.image_newline)


def anyres_layout(pack: Pack, crops: int, side: int, image_size: torch.Tensor) -> AnyresLayout:
    """The layout of an image tiled into ``crops`` crops of ``side``² patches (base crop first),
    whose original (height, width) is ``image_size``."""
    patches = side * side
    index = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches, 1)
    marked = torch.cat([index, torch.ones_like(index)], dim=-1)  # channel 1: 1 visual, 0 newline
    packed = pack(marked, image_size, torch.tensor([-1.0, 0.0], dtype=torch.float64))
    is_newline = packed[:, 1] == 0
    line = torch.cumsum(is_newline.long(), 0) - is_newline.long()  # newlines strictly before
    positions = torch.arange(packed.shape[0])
    visual_span = positions[~is_newline]
    source = packed[~is_newline, 0]
    exact = bool((source == source.round()).all()) and bool((packed[~is_newline, 1] == 1).all())
    visual_source = source.round().long() if exact else None
    table, grids = _crop_table(visual_source, visual_span, line, crops, side)
    return AnyresLayout(int(packed.shape[0]), visual_source, visual_span, line[~is_newline],
                        positions[is_newline], line[is_newline], CropLayout(grids, table))


def _crop_table(source: torch.Tensor | None, visual_span: torch.Tensor, line: torch.Tensor, crops: int,
                side: int) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """(crop, y, x) per visual token and the (h, w) of each crop's surviving part.

    With an exact source each crop is a crop of the encoder; with pooled tokens (no single source
    patch) the sub-crop area is reported as one crop: its grid is the packed rows and columns."""
    if source is not None:
        crop = source // (side * side)
        y, x = (source % (side * side)) // side, source % side
    else:
        base = side * side
        n = visual_span.shape[0]
        sub = torch.arange(n) >= base
        rows = line[visual_span]
        first_in_row = torch.zeros(n, dtype=torch.long)
        if bool(sub.any()):
            row_start = torch.full((int(rows.max()) + 1,), n, dtype=torch.long).scatter_reduce(
                0, rows[sub], torch.arange(n)[sub], reduce="amin")
            first_in_row[sub] = row_start[rows[sub]]
        crop = sub.long()
        index = torch.arange(n)
        y = torch.where(sub, rows, index // side)
        x = torch.where(sub, index - first_in_row, index % side)
        crops = 2 if bool(sub.any()) else 1
    # each crop's surviving part is a rectangle: shift it to start at (0, 0) and record its (h, w);
    # crops without surviving tokens are dropped and the others renumbered without gaps
    grids = []
    renumbered = torch.empty_like(crop)
    for c in range(crops):
        member = crop == c
        if not bool(member.any()):
            continue
        y0, x0 = int(y[member].min()), int(x[member].min())
        grids.append((int(y[member].max()) - y0 + 1, int(x[member].max()) - x0 + 1))
        y, x = torch.where(member, y - y0, y), torch.where(member, x - x0, x)
        renumbered[member] = len(grids) - 1
    crop = renumbered
    return torch.stack([crop, y, x], dim=1), tuple(grids)
