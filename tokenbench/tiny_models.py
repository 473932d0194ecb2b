"""Tiny random-weight VLMs built from configs, saved in HF format, for tests and offline runs.

Nothing here downloads anything: tokenizers are word-level vocabularies built with the
``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast``; models are stock ``transformers``
classes instantiated from small configs. Each factory writes a directory that loads with
``from_pretrained`` + ``AutoProcessor.from_pretrained`` exactly like a real checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def simple_chat_template(image_token: str = "<image>", video_token: str | None = None) -> str:
    """A plain ``ROLE: text`` chat template; ``{"type": "image"}`` content items render as
    ``image_token`` (the processor then expands it to one placeholder per visual token), and
    ``{"type": "video"}`` items as ``video_token`` where one is given."""
    return (
        "{% for message in messages %}"
        "{{ message['role'] | upper }}: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image_token + " {% endif %}"
        + ("{% if item['type'] == 'video' %}" + video_token + " {% endif %}" if video_token else "") +
        "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %} "
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


DEFAULT_WORDS = (
    "a", "an", "the", "is", "are", "of", "in", "on", "to", "and", "or", "what", "which", "how",
    "many", "color", "shape", "red", "green", "blue", "yellow", "black", "white", "circle",
    "square", "triangle", "star", "left", "right", "top", "bottom", "one", "two", "three", "four",
    "five", "yes", "no", "image", "picture", "describe", "there", "this", "that", "user",
    "assistant", ":", "?", ".", ",",
)


def word_level_tokenizer(words: Sequence[str], special_tokens: Sequence[str] = ("<unk>", "<pad>", "<s>", "</s>"),
                         chat_template: str | None = None, *, unk_token: str = "<unk>",
                         pad_token: str = "<pad>", bos_token: str | None = "<s>",
                         eos_token: str | None = "</s>",
                         extra_attributes: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-and-punctuation word-level tokenizer over ``words``.

    Special tokens come first in the vocabulary (ids 0..), then ``words`` in order (duplicates
    dropped). Every special token is registered as an added special token, so strings like
    ``<image>`` always encode to one id. Decoding joins words with spaces. ``extra_attributes`` sets
    named special tokens the processors look up (e.g. ``{"image_token": "<image>"}``).
    """
    specials = list(dict.fromkeys([unk_token, pad_token, *(t for t in (bos_token, eos_token) if t),
                                   *special_tokens]))
    vocab: dict[str, int] = {}
    for token in [*specials, *(w.lower() for w in words)]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation("isolated")])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    core.add_special_tokens(specials)
    extra = dict(extra_attributes or {})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=unk_token, pad_token=pad_token, bos_token=bos_token,
        eos_token=eos_token, additional_special_tokens=[t for t in specials if t not in
                                                        (unk_token, pad_token, bos_token, eos_token)],
        extra_special_tokens=extra or None, padding_side="left")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


LLAVA_IMAGE_TOKEN = "<image>"
QWEN_SPECIAL = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def llava_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA's ``<image>`` token and a plain ``ROLE: text`` template."""
    return word_level_tokenizer(words, special_tokens=[LLAVA_IMAGE_TOKEN],
                                chat_template=simple_chat_template(LLAVA_IMAGE_TOKEN),
                                extra_attributes={"image_token": LLAVA_IMAGE_TOKEN})


def llava_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 336, patch_size: int = 14, *,
                    select_strategy: str = "default", image_processor: Any = None) -> Any:
    """LLaVA-1.5's processor: CLIP preprocessing at ``image_size`` (``image_processor`` replaces the
    default one) and ``<image>`` expanded to one placeholder per patch."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    if image_processor is None:
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy=select_strategy, num_additional_image_tokens=1,
                          chat_template=tokenizer.chat_template)


def qwen_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen2-VL's vision special tokens and a plain chat template."""
    return word_level_tokenizer(words, special_tokens=QWEN_SPECIAL,
                                chat_template=simple_chat_template("<|vision_start|><|image_pad|><|vision_end|>",
                                                                   "<|vision_start|><|video_pad|><|vision_end|>"),
                                extra_attributes={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                  "vision_start_token": "<|vision_start|>",
                                                  "vision_end_token": "<|vision_end|>"})


def tiny_llava(directory: str | Path, *, words: Sequence[str] = DEFAULT_WORDS, vision_layers: int = 3,
               llm_layers: int = 4, seed: int = 0) -> Path:
    """A random-weight LLaVA-1.5-shaped model: 336px CLIP, patch 14 (24×24 = 576 visual tokens),
    ``vision_feature_layer=-2`` with the CLS token dropped, a 2-layer MLP projector and a GQA
    Llama decoder of hidden size 64. Saved with its processor under ``directory``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    directory = Path(directory)
    tokenizer = llava_tokenizer(words)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=336, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=llm_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = llava_processor(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


VIDEO_LLAVA_VIDEO_TOKEN = "<video>"


def video_llava_tokenizer(words: Sequence[str] = DEFAULT_WORDS, chat_template: str | None = None
                          ) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the ``<image>`` and ``<video>`` tokens of Video-LLaVA (and of
    LLaVA-OneVision, which names them alike), with ``chat_template`` if given."""
    return word_level_tokenizer(words, special_tokens=[LLAVA_IMAGE_TOKEN, VIDEO_LLAVA_VIDEO_TOKEN],
                                chat_template=chat_template,
                                extra_attributes={"image_token": LLAVA_IMAGE_TOKEN,
                                                  "video_token": VIDEO_LLAVA_VIDEO_TOKEN})


def video_llava_processor(image_size: int = 224, words: Sequence[str] = DEFAULT_WORDS) -> Any:
    """What the ``video_llava`` adapter needs of a processor, built offline: a word-level tokenizer
    with ``<image>`` / ``<video>`` and Video-LLaVA's image processor at ``image_size``."""
    from transformers import VideoLlavaImageProcessor

    from tokenbench.adapters.qwen2_vl import ProcessorParts

    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": image_size},
                                               crop_size={"height": image_size, "width": image_size})
    return ProcessorParts(video_llava_tokenizer(words), image_processor)


def tiny_video_llava(directory: str | Path, *, words: Sequence[str] = DEFAULT_WORDS, vision_layers: int = 3,
                     llm_layers: int = 4, image_size: int = 224, seed: int = 0) -> Path:
    """A random-weight Video-LLaVA-shaped model: CLIP-shaped video and image towers at
    ``image_size`` px, patch 14 (16×16 = 256 patches per frame at 224 px, plus CLS),
    ``vision_feature_layer=-2``, a 2-layer MLP projector and a GQA Llama decoder of hidden size 64.
    Saved with its tokenizer and image processor (frames are preprocessed by the image processor);
    ``AutoProcessor`` builds a ``VideoLlavaProcessor`` where torchvision is installed."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    directory = Path(directory)
    processor = video_llava_processor(image_size, words)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=llm_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    side = image_size // 14
    config = VideoLlavaConfig(vision_config=vision, text_config=text,
                              image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                              video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_LLAVA_VIDEO_TOKEN),
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              image_seq_length=side * side, video_seq_length=8 * (side * side + 1),
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    return directory


def video_llava_from_llava(source: str | Path, directory: str | Path) -> Path:
    """A Video-LLaVA checkpoint made from a LLaVA-1.5-architecture one (e.g. ``tiny-llava-shapes``), to
    train a video model from: its CLIP tower becomes both the image and the video tower, its
    projector and decoder are kept, and a ``<video>`` token is added (the embedding and LM-head
    rows grow by one; every other row is unchanged). On images it computes what the source model
    does. Saved with the tokenizer and an image processor with the source's preprocessing."""
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
    )

    directory = Path(directory)
    llava = LlavaForConditionalGeneration.from_pretrained(source).eval()
    processor = AutoProcessor.from_pretrained(source)
    tokenizer = processor.tokenizer
    tokenizer.add_tokens([VIDEO_LLAVA_VIDEO_TOKEN], special_tokens=True)
    config = llava.config
    text = config.text_config.to_dict() | {"vocab_size": len(tokenizer)}
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    video_config = VideoLlavaConfig(
        vision_config=vision.to_dict(), text_config=text, image_token_id=config.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_LLAVA_VIDEO_TOKEN),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act, image_seq_length=side * side,
        video_seq_length=8 * (side * side + 1), pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings)
    model = VideoLlavaForConditionalGeneration(video_config).eval()
    parts = model.model
    with torch.no_grad():
        for tower in (parts.image_tower, parts.video_tower):
            tower.load_state_dict(llava.model.vision_tower.state_dict())
        parts.multi_modal_projector.load_state_dict(llava.model.multi_modal_projector.state_dict())
        rows = config.text_config.vocab_size
        decoder = parts.language_model.state_dict()  # views of the parameters
        for name, value in llava.model.language_model.state_dict().items():
            decoder[name][: value.shape[0]].copy_(value)  # only the embedding grows (by the new row)
        embed = parts.language_model.embed_tokens.weight
        embed[rows:] = embed[:rows].mean(dim=0)
        model.lm_head.weight[:rows] = llava.lm_head.weight
        model.lm_head.weight[rows:] = llava.lm_head.weight.mean(dim=0)
    model.generation_config = llava.generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    source_images = processor.image_processor
    VideoLlavaImageProcessor(
        size=dict(source_images.size), crop_size=dict(source_images.crop_size),
        resample=source_images.resample, image_mean=list(source_images.image_mean),
        image_std=list(source_images.image_std), do_center_crop=source_images.do_center_crop,
    ).save_pretrained(directory)
    return directory


def tiny_qwen2_vl(directory: str | Path, *, words: Sequence[str] = DEFAULT_WORDS, llm_layers: int = 4,
                  image_size: int = 224, seed: int = 0, variant: str = "qwen2_vl") -> Path:
    """A random-weight Qwen2-VL (``variant="qwen2_5_vl"``: Qwen2.5-VL): patch 14, 2×2 spatial merge,
    so a ``image_size``² image gives an (image_size/28)² grid of visual tokens (8×8 = 64 at 224px);
    M-RoPE decoder of hidden size 64."""
    import transformers

    directory = Path(directory)
    tokenizer = qwen_tokenizer(words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": llm_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            # head_dim 16: the three M-RoPE sections (t, h, w) split its 8 frequency pairs
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    common = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "in_channels": 3}
    if variant == "qwen2_vl":
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = {**common, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    elif variant == "qwen2_5_vl":
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = {**common, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64,
                  "window_size": 56, "fullatt_block_indexes": [1]}
    else:
        raise ValueError(f"variant {variant!r} must be 'qwen2_vl' or 'qwen2_5_vl'")
    config = config_cls(text_config=text, vision_config=vision,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    pixels = image_size * image_size
    image_processor = transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, merge_size=2, temporal_patch_size=2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    # Qwen2VLProcessor insists on a video processor, which needs torchvision; save the parts a
    # processor is made of instead (AutoProcessor assembles them where torchvision is present).
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    processor_class = "Qwen2VLProcessor" if variant == "qwen2_vl" else "Qwen2_5_VLProcessor"
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
    return directory


def tiny_clip(directory: str | Path, *, vision_from: str | Path, words: Sequence[str] = DEFAULT_WORDS,
              text_positions: int = 8, seed: int = 0) -> Path:
    """A full ``CLIPModel`` (both towers and projections) whose vision tower is the one of the LLaVA
    checkpoint at ``vision_from``, as LLaVA-1.5's is CLIP's: the auxiliary model of the ``clip_*``
    signals (CDPruner) for tests. The text tower is random, with ``text_positions`` positions per
    segment (small, so that test prompts span several segments); the word-level tokenizer wraps
    text in ``<s> … </s>`` as CLIP's tokenizer does. Saved with its tokenizer under ``directory``."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPModel, LlavaForConditionalGeneration

    directory = Path(directory)
    tokenizer = word_level_tokenizer(words)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    llava = LlavaForConditionalGeneration.from_pretrained(vision_from)
    vision = llava.config.vision_config
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": text_positions, "bos_token_id": bos,
            "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=vision.projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


ONEVISION_VIDEO_TOKEN = VIDEO_LLAVA_VIDEO_TOKEN


def onevision_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA-OneVision's ``<image>`` and ``<video>`` tokens and a chat
    template that renders both."""
    return video_llava_tokenizer(words, simple_chat_template(LLAVA_IMAGE_TOKEN, ONEVISION_VIDEO_TOKEN))


TINY_ANYRES_PINPOINTS = [[112, 224], [224, 112], [224, 224]]


def llava_next_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 336, patch_size: int = 14,
                         pinpoints: Sequence[Sequence[int]] | None = None) -> Any:
    """LLaVA-NeXT's processor: anyres CLIP preprocessing (base crop plus ``pinpoints`` sub-crops at
    ``image_size``) and ``<image>`` expanded to the unpadded token count with newlines."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    kwargs = {} if pinpoints is None else {"image_grid_pinpoints": [list(p) for p in pinpoints]}
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **kwargs)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=tokenizer.chat_template)


def tiny_llava_next(directory: str | Path, *, words: Sequence[str] = DEFAULT_WORDS, vision_layers: int = 3,
                    llm_layers: int = 4, image_size: int = 112, seed: int = 0) -> Path:
    """A random-weight LLaVA-NeXT: CLIP at ``image_size`` px, patch 14 (8×8 = 64 tokens per crop at
    112 px), sub-crops tiled from 1×2, 2×1 and 2×2 pinpoints (up to 64 + 256 visual tokens plus 16
    newlines), ``vision_feature_layer=-2`` with CLS dropped, Llama decoder of hidden size 64."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    directory = Path(directory)
    tokenizer = llava_tokenizer(words)
    pinpoints = [[image_size * a // 112, image_size * b // 112] for a, b in TINY_ANYRES_PINPOINTS]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=llm_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = llava_next_processor(tokenizer, image_size, 14, pinpoints)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tiny_llava_onevision(directory: str | Path, *, words: Sequence[str] = DEFAULT_WORDS, vision_layers: int = 2,
                         llm_layers: int = 4, image_size: int = 56, seed: int = 0) -> Path:
    """A random-weight LLaVA-OneVision: SigLIP at ``image_size`` px, patch 14 (4×4 = 16 tokens per crop
    at 56 px, no CLS), sub-crops tiled from 1×1 … 4×4 pinpoints with ``anyres_max_9`` (grids above nine
    crops are pooled), Qwen2 decoder of hidden size 64. A video frame is one crop pooled 2×2 by the
    model (2×2 tokens at 56 px; 4×4 at 98 px, whose odd 7×7 grid pools like the real 27×27 → 14×14).
    Saved as tokenizer + image processor (the processor class needs torchvision for its video
    processor; ``AutoProcessor`` assembles it where that is installed)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    directory = Path(directory)
    tokenizer = onevision_tokenizer(words)
    pinpoints = [[image_size * a, image_size * b] for a in range(1, 5) for b in range(1, 5)]
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": vision_layers, "num_attention_heads": 2, "image_size": image_size,
              "patch_size": 14, "vision_use_head": False}
    text = {"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": llm_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
                                  video_token_id=tokenizer.convert_tokens_to_ids(ONEVISION_VIDEO_TOKEN),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=pinpoints,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaOnevisionProcessor"}))
    return directory
