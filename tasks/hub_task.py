"""The shared shape of a benchmark read from a hub dataset: rows in, samples out.

A subclass names its hub id, subset and split, the columns every row must fill, and turns one row
into a :class:`Sample` (``make_sample``). A row with an empty required field, or whose image does
not decode, still becomes a sample: loading its image raises :class:`SampleError` naming the task,
row and field, so the harness records the failure for that sample and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from PIL import Image
from tokenbench.tasks.base import Sample, Task, TaskDataError
from tokenbench.tasks.hub import SampleError, load_first, open_image, raw_rows

SHORT_ANSWER = "Answer the question using a single word or phrase."
# The organisation the current lmms-eval release reads these benchmarks from; each hub id of the
# older "lmms-lab" organisation is also tried under it.
CURRENT_ORG = "lmms-lab-encoder"


class HubTask(Task):
    """Base class for the real benchmarks (see the module docstring)."""

    hub_id: ClassVar[str] = ""
    config: ClassVar[str | None] = None
    split: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()
    image_column: ClassVar[str | None] = "image"
    id_column: ClassVar[str | None] = "question_id"

    dataset_source: str | None = None  # the hub id (or local copy) the rows came from, once loaded

    @property
    def hub_ids(self) -> tuple[str, ...]:
        """``hub_id`` (the lmms-lab organisation), then the same repository under :data:`CURRENT_ORG`."""
        org, _, repo = self.hub_id.partition("/")
        return (self.hub_id,) if org == CURRENT_ORG else (self.hub_id, f"{CURRENT_ORG}/{repo}")

    def load(self, config: str | None, split: str) -> Any:
        """One split from the first hub id that has it (or the local copy); records where from."""
        rows, self.dataset_source = load_first(self.name, self.hub_ids, config, split, self.data_dir)
        return rows

    def provenance(self) -> dict[str, Any]:
        return super().provenance() | {"dataset": self.dataset_source}

    def rows(self) -> Any:
        """The evaluated rows (a ``datasets.Dataset``); ``TaskDataError`` when the data are missing
        or lack a column."""
        rows = self.load(self.config, self.split)
        self.check_columns(rows, self.required + ((self.image_column,) if self.image_column else ()))
        return self.select(rows)

    def check_columns(self, rows: Any, columns: tuple[str, ...]) -> None:
        missing = [c for c in columns if c not in rows.column_names]
        if missing:
            names = ", ".join(map(repr, missing))
            raise TaskDataError(f"task '{self.name}': the data have no column {names} "
                                f"(found {', '.join(rows.column_names)}); use the schema of {self.hub_id}")

    def select(self, rows: Any) -> Any:
        """The rows the benchmark evaluates (all, unless a subclass narrows them)."""
        return rows

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        rows = self.rows()
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        for index, row in enumerate(raw_rows(rows)):
            yield self.sample_from(index, row)

    def sample_from(self, index: int, row: dict[str, Any]) -> Sample:
        sample_id = self.sample_id(index, row)
        label = f"task '{self.name}' row {index} (id {sample_id})"
        empty = [column for column in self.required if _is_empty(row.get(column))]
        if empty:
            return broken_sample(sample_id, f"{label}: field '{empty[0]}' is empty")
        return self.make_sample(sample_id, row, self.image_loader(row, label))

    def sample_id(self, index: int, row: dict[str, Any]) -> str:
        value = row.get(self.id_column) if self.id_column else None
        return str(index) if value is None else str(value)

    def image_loader(self, row: dict[str, Any], label: str) -> Callable[[], Image.Image]:
        """A zero-argument decoder of the row's image; ``label`` names the task and row in errors."""
        cell = row.get(self.image_column) if self.image_column else None
        return lambda: open_image(cell, f"{label} field '{self.image_column}'")

    def make_sample(self, sample_id: str, row: dict[str, Any], image: Callable[[], Image.Image]) -> Sample:
        raise NotImplementedError

    def reference_prediction(self, sample: Sample) -> str:
        """An answer that the scorer counts right (used by ``tokenbench tasks --validate``)."""
        return str(sample.target)


def column_arrow(rows: Any, column: str) -> Any:
    """One column as a pyarrow array (zero-copy, nothing decoded): for filtering rows cheaply."""
    return rows.select_columns([column]).with_format("arrow")[:][column]


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def broken_sample(sample_id: str, message: str) -> Sample:
    """A sample standing for an unusable row: loading its image raises ``SampleError(message)``."""
    def load() -> Image.Image:
        raise SampleError(message)
    return Sample(sample_id, "", load, None, {"error": message})
