"""Reading a benchmark's rows: from the Hugging Face hub, or from a local copy with the same schema.

A local copy (``data_dir``) is either a directory written by ``Dataset.save_to_disk`` or a
directory of parquet files laid out like the hub repository (what ``huggingface-cli download
<hub id> --repo-type dataset --local-dir DIR`` produces): ``DIR/<config>/<split>-*.parquet`` or
``DIR/data/<split>-*.parquet``. Both routes end in the same ``datasets.Dataset``, so everything
after loading is one code path; rows are read without decoding images (:func:`raw_rows`).
One ``--data-dir`` can serve several benchmarks: each is also looked for in
``DIR/<hub repository name>`` (``DIR/POPE``, ``DIR/MME``, ...) and in ``DIR/<task name>``.

Offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) is honoured by ``datasets`` itself; when
it is off, the hub endpoint is probed with a short timeout first so that a machine without network
fails at once instead of spending half a minute in retries.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

from PIL import Image
from tokenbench.tasks.base import TaskDataError

PROBE_TIMEOUT_S = 3.0


class SampleError(ValueError):
    """One row of a benchmark is unusable (a field is missing, the image does not decode).

    Raised lazily, when the sample's image is loaded, so the harness records it for that sample
    and goes on with the others."""


def require_datasets(task: str) -> ModuleType:
    """The ``datasets`` package, or a one-line error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise TaskDataError(f"task '{task}' needs the 'datasets' package: pip install 'tokenbench[data]'") \
            from None
    return datasets


def how_to_get(hub_id: str, config: str | None, split: str) -> str:
    subset = f" (subset '{config}', split '{split}')" if config else f" (split '{split}')"
    return (f"download the hub dataset {hub_id}{subset} with network access, or pass --data-dir DIR "
            f"holding its parquet files (huggingface-cli download {hub_id} --repo-type dataset "
            f"--local-dir DIR)")


def load_split(task: str, hub_id: str, config: str | None, split: str,
               data_dir: Path | None = None) -> Any:
    """One split of a benchmark as a ``datasets.Dataset``; ``TaskDataError`` when it is missing."""
    datasets = require_datasets(task)
    if data_dir is not None:
        return _load_local(datasets, task, hub_id, config, split, Path(data_dir))
    if not datasets.config.HF_HUB_OFFLINE:
        _probe_hub(task, hub_id, config, split)
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 -- datasets raises many types for "not there"
        offline = " (offline mode is on and it is not in the local cache)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TaskDataError(f"task '{task}': cannot load {hub_id}{offline}: {reason}; "
                            f"{how_to_get(hub_id, config, split)}") from None


def load_first(task: str, hub_ids: Sequence[str], config: str | None, split: str,
               data_dir: Path | None = None) -> tuple[Any, str]:
    """The split from the first of ``hub_ids`` that loads, with where it came from: that hub id, or
    the local copy (read in the schema of ``hub_ids[0]``); ``TaskDataError`` when none loads."""
    if data_dir is not None:
        return load_split(task, hub_ids[0], config, split, data_dir), f"{hub_ids[0]} (local copy {data_dir})"
    failures = []
    for hub_id in hub_ids:
        try:
            return load_split(task, hub_id, config, split), hub_id
        except TaskDataError as exc:
            failures.append(exc)
    tried = f" (also tried {', '.join(hub_ids[1:])})" if len(hub_ids) > 1 else ""
    raise TaskDataError(f"{failures[0]}{tried}")


def _probe_hub(task: str, hub_id: str, config: str | None, split: str) -> None:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise TaskDataError(f"task '{task}': cannot reach {constants.ENDPOINT} ({exc}); if {hub_id} is "
                            f"in the local cache set HF_DATASETS_OFFLINE=1, otherwise "
                            f"{how_to_get(hub_id, config, split)}") from None


def _load_local(datasets: ModuleType, task: str, hub_id: str, config: str | None, split: str,
                root: Path) -> Any:
    """The split from ``root`` itself or, when ``root`` holds several benchmarks, from its
    subdirectory named like the hub repository (``root/POPE``) or the task (``root/pope``)."""
    if not root.is_dir():
        raise TaskDataError(f"task '{task}': data dir '{root}' does not exist; "
                            f"{how_to_get(hub_id, config, split)}")
    repo = hub_id.rsplit("/", 1)[-1]
    for base in (root / repo, root / task, root):
        for candidate in ([base / config] if config else []) + [base]:
            if (candidate / "state.json").is_file() or (candidate / "dataset_dict.json").is_file():
                return _from_disk(datasets, task, candidate, split)
        files = parquet_files(base, config, split)
        if files:
            return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    layout = f"{config}/{split}-*.parquet" if config else f"data/{split}-*.parquet"
    raise TaskDataError(f"task '{task}': no parquet files for split '{split}' in '{root}' (expected "
                        f"{root}/{layout} or {root}/{repo}/{layout}); {how_to_get(hub_id, config, split)}")


def _from_disk(datasets: ModuleType, task: str, path: Path, split: str) -> Any:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise TaskDataError(f"task '{task}': '{path}' has no split '{split}' "
                                f"(it has {', '.join(loaded)})")
        return loaded[split]
    return loaded


def parquet_files(root: Path, config: str | None, split: str) -> list[Path]:
    """The parquet files of ``split``, in the first of the hub-like layouts that has any."""
    folders = ([root / config] if config else []) + [root / "data", root]
    for folder in folders:
        for pattern in (f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet"):
            found = sorted(folder.glob(pattern))
            if found:
                return found
    return []


def raw_rows(rows: Any, batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """The rows as plain dicts with nothing decoded: image cells stay ``{"bytes", "path"}`` (also
    inside lists), so one broken image fails one sample (:func:`open_image`), not the whole run.
    Class-label columns come back as their names."""
    import datasets

    labels = {name: f for name, f in rows.features.items() if isinstance(f, datasets.ClassLabel)}
    for batch in rows.with_format("arrow").iter(batch_size=batch_size):
        for row in batch.to_pylist():
            for name, feature in labels.items():
                if row.get(name) is not None:
                    row[name] = feature.int2str(row[name])
            yield row


def raw_row(rows: Any, index: int) -> dict[str, Any]:
    """Row ``index``, as :func:`raw_rows` gives it."""
    return next(raw_rows(rows.select([index]), batch_size=1))


def open_image(value: Any, where: str) -> Image.Image:
    """Decode an image cell (``{"bytes", "path"}``, a path or a PIL image); ``where`` names the
    task, row and field in the error."""
    if isinstance(value, Image.Image):
        return value
    if not value:
        raise SampleError(f"{where}: no image")
    try:
        if isinstance(value, dict):
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        else:
            source = value
        if not source:
            raise ValueError("the cell holds neither bytes nor a path")
        image = Image.open(source)
        image.load()
    except Exception as exc:  # noqa: BLE001 -- PIL fails in many ways; each is this one error
        raise SampleError(f"{where}: the image does not decode ({type(exc).__name__}: {exc})") from None
    return image
