"""Registers tokenbench's own adapters (entry point ``tokenbench.adapters.builtin``)."""

from __future__ import annotations

import tokenbench
from tokenbench.adapters.llava import LlavaAdapter
from tokenbench.adapters.llava_next import LlavaNextAdapter
from tokenbench.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenbench.adapters.qwen2_vl import Qwen2VLAdapter
from tokenbench.adapters.video_llava import VideoLlavaAdapter


@tokenbench.hookimpl
def register_adapters(register):
    register(LlavaAdapter)
    register(Qwen2VLAdapter)
    register(LlavaNextAdapter)
    register(LlavaOnevisionAdapter)
    register(VideoLlavaAdapter)
