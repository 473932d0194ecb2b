"""Hub ids without a network: fail at once with a remedy instead of retrying for half a minute.

``--model org/name`` loads through ``from_pretrained``, which on a machine without network retries
the hub for tens of seconds and then fails without saying what to do. Before loading, tokenbench
looks for the checkpoint in the local Hugging Face cache; when it is not there (or
``HF_HUB_OFFLINE`` is set) and the hub does not answer a TCP connection within a few seconds, it
stops with a one-line message that says how to point ``--model`` at a local copy.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """Whether the user asked for no hub access (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached(repo_id: str) -> bool:
    """Whether the hub id's ``config.json`` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover -- transformers depends on huggingface_hub
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 -- a malformed id or cache: treat as not cached
        return False


def reachable(endpoint: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds."""
    url = urlparse(endpoint or hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable_reason(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot be loaded here (a one-line message with the remedy), or None."""
    if cached(repo_id):
        return None
    local = ("download it on a machine with network (huggingface-cli download "
             f"{repo_id} --local-dir DIR), copy DIR here and give --model DIR")
    if offline():
        return f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {local}"
    if not reachable():
        return f"the Hugging Face hub ({hub_endpoint()}) is unreachable from here; {local}"
    return None
