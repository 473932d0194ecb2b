"""The CLIP joint embedding space behind the ``clip_visual`` / ``clip_text`` signals (spec E7, CDPruner).

A VLM checkpoint such as llava-hf's keeps CLIP's vision tower but neither its text tower nor its
``visual_projection``. CDPruner loads both from the CLIP checkpoint the tower came from
(``openai/clip-vit-large-patch14-336`` for LLaVA-1.5); a user points tokenbench at a local copy
with the method's ``clip_checkpoint`` option. What is computed, as the reference does:

- ``visual``: ``visual_projection(post_layernorm(features))`` of the selected-layer patch features
  (CLIP was trained to project the final layer's CLS token, not these; the reference does it anyway);
- ``text``: the instruction tokenised without truncation, zero-padded to a multiple of the text
  tower's ``max_position_embeddings`` and cut into rows of that length; each row's projected pooled
  output is one embedding (M rows, usually 1).

Everything runs in float32 (the reference's text tower does; its patch path rounds in fp16 first).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokenbench.adapters.base import AdapterError


class ClipSpace:
    """A loaded ``CLIPModel`` and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, path: str) -> None:
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        self.segment = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: str | Path, device: torch.device) -> ClipSpace:
        """Load a full CLIP checkpoint; :class:`AdapterError` (one line, with the fix) if it is not one."""
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        path = str(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot read the CLIP checkpoint '{path}': {_first_line(exc)}") from None
        if config.model_type != "clip":
            raise AdapterError(f"'{path}' is a {config.model_type} checkpoint without a CLIP text tower; "
                               "clip_text needs a full CLIPModel checkpoint (vision and text towers with "
                               "their projections), e.g. a local copy of openai/clip-vit-large-patch14-336")
        try:
            model, loading = CLIPModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot load the CLIP checkpoint '{path}': {_first_line(exc)}") from None
        missing = [k for k in loading["missing_keys"] if k.startswith(("text_", "visual_projection"))]
        if missing:
            raise AdapterError(f"the CLIP checkpoint '{path}' lacks {missing[0]} (and {len(missing) - 1} more "
                               "weights): it has no usable text tower or projection")
        return cls(model.to(device), tokenizer, path)

    @property
    def vision_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @torch.no_grad()
    def visual(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, N, Dv]`` vision-encoder features → ``[B, N, Dc]`` float32 joint-space embeddings."""
        vision = self.model.vision_model
        return self.model.visual_projection(vision.post_layernorm(features.float()))

    @torch.no_grad()
    def text(self, texts: list[str]) -> torch.Tensor:
        """``[B, M, Dc]`` float32 embeddings of ``texts`` (equal segment counts M across the batch)."""
        rows = [self._segments(text) for text in texts]
        counts = {r.shape[0] for r in rows}
        if len(counts) != 1:
            raise AdapterError("clip_text needs instructions of equal CLIP segment counts in a batch; "
                               "run such methods one sample at a time")
        return torch.stack(rows)

    def _segments(self, text: str) -> torch.Tensor:
        encoded = self.tokenizer(text, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        segments = (ids.shape[1] - 1) // self.segment + 1
        padding = segments * self.segment - ids.shape[1]
        ids = torch.cat([ids, ids.new_zeros(1, padding)], dim=1).view(segments, self.segment)
        mask = torch.cat([mask, mask.new_zeros(1, padding)], dim=1).view(segments, self.segment)
        device = self.model.text_projection.weight.device
        return self.model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
