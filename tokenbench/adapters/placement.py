"""Where a model's modules live: one device, or a ``--device-map`` over several (accelerate's
big-model loading through the stock ``from_pretrained(device_map=..., max_memory=...)``).

With a device map, accelerate hooks every placed module so that its inputs move to the device it
runs on; the adapters call the decoder layers one by one (``prefill.py``) and move the tensors they
compute with themselves (probe signals, the hidden states they splice) to where they are needed
with :func:`execution_device`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """A ``--device-map`` for ``from_pretrained``, given to an adapter's ``load`` as its device.

    ``max_memory`` maps a GPU index, ``"cpu"`` or ``"disk"`` to a size (bytes or ``"40GiB"``);
    modules that fit nowhere else are offloaded to ``offload_folder``."""

    device_map: str
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: Path | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            kwargs["max_memory"] = dict(self.max_memory)
        if self.offload_folder is not None:
            kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's, else its first parameter's that is
    not offloaded (``meta``), else the CPU."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(f"cuda:{hook_device}" if isinstance(hook_device, int) else hook_device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the input embedding's device under a device map."""
    if getattr(model, "hf_device_map", None):
        return execution_device(model.get_input_embeddings())
    return next(model.parameters()).device


def device_placement(model: torch.nn.Module) -> dict[str, Any]:
    """For the run record's provenance, under a device map only: parameter and buffer bytes per
    device (``disk`` / ``cpu`` for offloaded modules) and, on CUDA, the peak allocated per GPU."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return {}
    placed: dict[str, int] = defaultdict(int)
    for name, device in device_map.items():
        module = model.get_submodule(name) if name else model
        tensors = list(module.parameters()) + list(module.buffers())
        placed[f"cuda:{device}" if isinstance(device, int) else str(device)] += sum(
            t.numel() * t.element_size() for t in tensors)
    out: dict[str, Any] = {"device_map_bytes": dict(sorted(placed.items()))}
    gpus = sorted({d for d in device_map.values() if isinstance(d, int)})
    if gpus and torch.cuda.is_available():
        out["peak_memory_per_device"] = {f"cuda:{g}": torch.cuda.max_memory_allocated(g) for g in gpus}
    return out


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=40GiB,1=40GiB,cpu=64GiB"`` as ``from_pretrained``'s ``max_memory``; ``ValueError`` with
    what to fix otherwise."""
    out: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not size or not (key.isdigit() or key in ("cpu", "disk")):
            raise ValueError(f"--max-memory entry '{part}': write DEVICE=SIZE with DEVICE a GPU index, cpu "
                             f"or disk, e.g. 0=40GiB,1=40GiB,cpu=64GiB")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise ValueError("--max-memory is empty; write e.g. 0=40GiB,1=40GiB,cpu=64GiB")
    return out
