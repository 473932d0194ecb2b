"""The compressor contract: a token-compression method is a policy over tensors.

A :class:`TokenCompressor` never sees the model, its masks, caches or position ids. The adapter
of a VLM family calls :meth:`TokenCompressor.schedule` once per image to learn where the method
acts (:class:`Site`) and how many visual tokens survive each site, and then calls
:meth:`TokenCompressor.reduce` at each site with a :class:`SiteInput` that holds the visual tokens
and only the extra signals the method declared in ``needs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

SIGNALS = frozenset({"attention", "keys", "text", "cls_attention"})
AttentionQueries = Literal["last", "text", "all"]
PositionPolicy = Literal["original", "contiguous"]
FlashAttentionClass = Literal["native", "probe", "eager"]


class Stage(str, Enum):
    """Where in the VLM a reduction runs."""

    VISION = "vision"  # between vision-encoder blocks (ToMe)
    VISION_OUT = "vision_out"  # on the vision encoder's selected output, before the projector
    PROJECTOR = "projector"  # on the projector's output: visual tokens in LLM space
    LLM = "llm"  # between LLM decoder layers during prefill

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class Site:
    """A stage plus the block index the reduction runs before.

    For ``llm`` the layer is the first decoder layer that sees the reduced sequence (FastV's K);
    for ``vision`` it is the first encoder block that sees it; for ``vision_out`` and ``projector``
    it is 0.
    """

    stage: Stage
    layer: int = 0


class Infeasible(Exception):
    """Raised by :meth:`TokenCompressor.schedule` when the budget cannot be met; the message says why."""


@dataclass(frozen=True)
class Architecture:
    """The shapes FLOPs and memory accounting need, read from the model config by the adapter."""

    llm_layers: int
    llm_hidden: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int
    vocab_size: int
    vision_layers: int  # encoder blocks that run up to the selected feature layer
    vision_hidden: int
    vision_intermediate: int
    vision_tokens: int  # tokens inside the vision encoder (patches, plus CLS where there is one)
    projector_in: int
    projector_hidden: int
    gated_mlp: bool = True  # SwiGLU-style third matrix in the LLM MLP
    patch_in: int = 0  # input values per vision patch (channels × patch area × frames); 0: not counted
    patches_per_token: int = 1  # vision patches per visual token entering the LLM (Qwen2-VL: merge² = 4)


@dataclass(frozen=True)
class ModelInfo:
    """What ``schedule`` may know about the model: never the modules themselves."""

    family: str
    stages: frozenset[Stage]
    grid: tuple[int, int]  # visual-token grid (h, w) of this image at the compression stages
    n_visual: int  # visual tokens of this image entering the LLM without compression
    arch: Architecture

    @property
    def llm_layers(self) -> int:
        return self.arch.llm_layers

    @property
    def vision_layers(self) -> int:
        return self.arch.vision_layers

    def scale_layer(self, layer: int, of: int = 32) -> int:
        """Map "layer ``layer`` of a ``of``-layer LLM" onto this model's depth (at least 1)."""
        scaled = round(layer * self.llm_layers / of)
        return min(max(scaled, 1), self.llm_layers - 1)


@dataclass
class SiteInput:
    """What a compressor sees at one site. Signals not declared in ``needs`` are ``None``.

    - ``visual`` [B, N, D]: the visual tokens alive at this site.
    - ``origin`` [B, N]: each token's index in the original (uncompressed) visual-token grid.
    - ``grid``: (h, w) of that original grid; ``keep``: how many tokens must survive (from the plan).
    - ``sizes`` [B, N]: how many original tokens each token stands for (1 unless merged earlier).
    - ``attention`` [B, Q, N]: head-mean softmax attention from the requested queries (see
      ``TokenCompressor.attention_queries``) to the visual tokens, normalised over the whole sequence.
    - ``keys`` [B, N, Dk]: head-mean attention keys of the block the site runs before.
    - ``text`` [B, T, Dt]: the text tokens that follow the image, in LLM space: their input embeddings
      at pre-LLM stages, their hidden states entering the site's layer at ``llm`` sites.
    - ``cls_attention`` [B, N]: head-mean attention of the vision encoder's CLS query at the selected layer.
    - ``generator``: seeded by the harness; use it for any randomness. With ``generators`` set and
      more than one row it is None: draw row ``b`` from ``generators[b]`` (see :meth:`row_generators`).
    - ``generators``: one generator per row, each seeded from the run seed and that row's sample
      (``Prompt.key``), so a row's draws depend neither on its batch position nor on the batch size.
    """

    visual: torch.Tensor
    origin: torch.Tensor
    grid: tuple[int, int]
    keep: int
    site: Site
    generator: torch.Generator | None = None
    sizes: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    generators: list[torch.Generator] | None = None

    def row_generators(self) -> list[torch.Generator | None]:
        """One generator per row of ``visual``: ``generators`` when the harness set them, else
        ``generator`` for every row (rows then draw one after another from the same stream)."""
        if self.generators is not None:
            return list(self.generators)
        return [self.generator] * self.visual.shape[0]


@dataclass
class Reduction:
    """The result of one reduction.

    - ``keep`` [B, K]: sorted, unique indices into ``SiteInput.visual``; K <= ``SiteInput.keep``.
    - ``values`` [B, K, D]: optional merged features for the kept tokens (default: the originals).
    - ``extra`` [B, E, D]: optional new tokens appended after the kept ones (e.g. recycled clusters).
    - ``sizes`` [B, K]: optional token sizes after merging (ToMe's size tracking).
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    sizes: torch.Tensor | None = None

    def check(self, x: SiteInput) -> None:
        """Raise ``ValueError`` if this reduction breaks the contract for input ``x``."""
        b, n, d = x.visual.shape
        keep = self.keep
        if keep.dim() != 2 or keep.shape[0] != b:
            raise ValueError(f"keep must be [B, K] with B={b}, got {tuple(keep.shape)}")
        if keep.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"keep must hold integer indices, got {keep.dtype}")
        k = keep.shape[1]
        if k > max(x.keep, 0) and k > 0 and x.keep < n:
            raise ValueError(f"kept {k} tokens but the plan allows {x.keep}")
        if k and (keep.min() < 0 or keep.max() >= n):
            raise ValueError(f"keep indices must lie in [0, {n})")
        if k > 1 and not bool((keep[:, 1:] > keep[:, :-1]).all()):
            raise ValueError("keep indices must be sorted ascending and unique")
        if self.values is not None and tuple(self.values.shape) != (b, k, d):
            raise ValueError(f"values must be [{b}, {k}, {d}], got {tuple(self.values.shape)}")
        if self.extra is not None and (self.extra.dim() != 3 or self.extra.shape[0] != b
                                       or self.extra.shape[2] != d):
            raise ValueError(f"extra must be [{b}, E, {d}], got {tuple(self.extra.shape)}")
        if self.sizes is not None and tuple(self.sizes.shape) != (b, k):
            raise ValueError(f"sizes must be [{b}, {k}], got {tuple(self.sizes.shape)}")


class TokenCompressor:
    """Base class of every compression method. Subclass it and register the class.

    Class attributes: ``name`` (CLI name), ``stages`` (where it can act, for listings), ``needs``
    (subset of :data:`SIGNALS`), ``attention_queries`` (which query rows ``attention`` holds:
    ``last`` prompt token, all ``text`` tokens after the image, or ``all`` tokens, which needs the
    full attention map), ``positions`` (whether surviving LLM tokens keep their ``original``
    position ids or are renumbered ``contiguous``), ``stochastic`` (``reduce`` uses the generator),
    ``paper``, ``source``. Options are the nested
    pydantic model ``Options``; unknown keys are rejected. An instance may refine ``needs`` or
    ``attention_queries`` from its options in ``__init__``.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = ()
    needs: frozenset[str] = frozenset()
    attention_queries: AttentionQueries = "last"
    positions: PositionPolicy = "original"
    proportional_attention: bool = False  # ToMe: bias vision attention by log(size)
    # Whether reduce draws from SiteInput.generator. Adapters then run the method one sample at a
    # time, so a sample's draw depends on the seed and the sample alone, not on its batch neighbours
    # or on resume.
    stochastic: bool = False
    # Whether a stochastic reduce draws row b only from SiteInput.row_generators()[b]. Such methods
    # run batched: each row's generator is seeded from (run seed, sample), whatever the batch.
    draws_per_row: bool = False
    paper: ClassVar[str] = ""
    source: ClassVar[str] = ""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, **options: Any) -> None:
        self.options = self.Options(**options)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        opts = cls.__dict__.get("Options")
        if opts is not None and opts.model_config.get("extra") != "forbid":
            opts.model_config["extra"] = "forbid"
            opts.model_rebuild(force=True)

    @property
    def flash_attention(self) -> FlashAttentionClass:
        """FlashAttention class derived from ``needs`` (the harness verifies it by running)."""
        return flash_attention_class(self.needs, self.attention_queries)

    def schedule(self, n_visual: int, budget: float, info: ModelInfo) -> list[tuple[Site, int]]:
        """Return ``[(site, keep), ...]`` in execution order so that the layer-averaged visual token
        count over the LLM's layers is ``budget``; raise :class:`Infeasible` if it cannot be met."""
        raise NotImplementedError

    def reduce(self, x: SiteInput) -> Reduction:
        """Choose (and optionally merge) the tokens that survive this site."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options.model_dump(mode="json")}


def flash_attention_class(needs: frozenset[str], queries: AttentionQueries = "last") -> FlashAttentionClass:
    if "attention" not in needs and "cls_attention" not in needs:
        return "native"
    if "attention" in needs and queries == "all":
        return "eager"
    return "probe"


def layer_averaged_tokens(n_visual: int, plan: list[tuple[Site, int]], llm_layers: int,
                          extra: dict[Site, int] | None = None) -> float:
    """Layer-averaged visual tokens the LLM decoder processes under ``plan`` (the budget convention).

    Pre-LLM sites set the count entering the LLM; an ``llm`` site at layer ``l`` changes the count
    for layers ``l..L-1``. ``extra`` adds appended tokens (e.g. recycled clusters) per site.
    """
    extra = extra or {}
    per_layer = [float(n_visual)] * llm_layers
    for site, keep in plan:
        count = min(keep, n_visual) + extra.get(site, 0)
        start = site.layer if site.stage is Stage.LLM else 0
        for layer in range(start, llm_layers):
            per_layer[layer] = count
    return sum(per_layer) / llm_layers
