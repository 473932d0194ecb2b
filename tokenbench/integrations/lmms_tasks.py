"""lmms-eval tasks in tokenbench: ``tokenbench run --tasks lmms:<task>``.

A task named ``lmms:<task>`` is built on demand from lmms-eval's own task definition: its documents
(``eval_docs``), its zero-shot context (``doc_to_text``, through lmms-eval's ``fewshot_context``),
its one image (``doc_to_visual``) and its ``generation_kwargs`` (length and stop strings). Each
answer is scored with the task's filters and ``process_results``, and the task metrics come from
its own aggregation functions, so tokenbench's records, paired bootstrap, agreement, resume and
leaderboard work unchanged. The primary metric is the first of the task's ``metric_list``.

Tasks come from lmms-eval's installed task folder and from the folders in
``TOKENBENCH_LMMS_INCLUDE_PATH`` (``os.pathsep``-separated, like lmms-eval's ``--include_path``;
searched first). A task that scores log-probabilities (``loglikelihood``, ``multiple_choice``),
runs several rounds, or whose scorer calls a judge model is refused with that reason.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tokenbench.integrations import LMMS_INSTALL_HINT, lmms_eval_version
from tokenbench.integrations.lmms_requests import Decoding, RequestError, single_image
from tokenbench.plugins import LMMS_PREFIX as PREFIX
from tokenbench.tasks.base import Sample, Task, TaskDataError

INCLUDE_ENV = "TOKENBENCH_LMMS_INCLUDE_PATH"
MODEL_NAME = "tokenbench"  # the name lmms-eval picks per-model prompt variants by (the bridge's model id)
# Words in a scorer's module that mark a judge model (lmms-eval's judge and verifier packages, API
# clients, GPT model names), and in a metric's name (MMBench's gpt_eval_score, LLaVA-W's gpt_eval_*).
JUDGE_MARKERS = ("lmms_eval.llm_judge", "lmms_eval.verifiers.openai", "import openai", "from openai",
                 "OPENAI_API_KEY", "API_TYPE", "get_chat_response", "gpt-4")
JUDGE_METRIC = "gpt"
LOGPROB_TYPES = ("loglikelihood", "multiple_choice")


class LmmsTaskError(TaskDataError):
    """An lmms-eval task that is unknown, or that tokenbench cannot run; the message says why."""


def include_paths() -> list[str]:
    return [p for p in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if p]


def source_note() -> str:
    """Where ``lmms:<task>`` tasks come from (for ``tokenbench tasks``); imports nothing heavy."""
    version = lmms_eval_version()
    if version is None:
        return f"lmms:<task>  lmms-eval tasks: lmms-eval is not installed ({LMMS_INSTALL_HINT})"
    extra = f" and {INCLUDE_ENV}={os.environ[INCLUDE_ENV]}" if include_paths() else \
        f" (add task folders with {INCLUDE_ENV})"
    return (f"lmms:<task>  any single-image generation task of lmms-eval {version}: its installed tasks "
            f"(`lmms-eval --tasks list`){extra}; log-probability, multi-round and judge-scored tasks "
            f"are refused")


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool) -> Any:
    try:
        from loguru import logger

        logger.remove()  # lmms-eval logs through loguru at DEBUG by default; its own CLI sets WARNING too
        logger.add(sys.stderr, level="WARNING")
        from lmms_eval.tasks import TaskManager
    except ImportError as exc:
        raise LmmsTaskError(f"lmms:<task> needs lmms-eval ({exc}); {LMMS_INSTALL_HINT}") from None
    return TaskManager("ERROR", include_path=list(include) or None, include_defaults=defaults,
                       model_name=MODEL_NAME)


def task_manager_for(name: str) -> Any:
    """The manager that indexes ``name``: the include folders alone first (quick), else with
    lmms-eval's own ~2000 task definitions (about 20 s to index)."""
    include = tuple(include_paths())
    if include and name in _task_manager(include, False).all_tasks:
        return _task_manager(include, False)
    manager = _task_manager(include, True)
    if name not in manager.all_tasks:
        import difflib

        close = difflib.get_close_matches(name, manager.all_tasks, n=1)
        hint = f"; did you mean '{PREFIX}{close[0]}'?" if close else ""
        raise LmmsTaskError(f"unknown lmms-eval task '{name}'{hint} (list them with `lmms-eval --tasks list`; "
                            f"local task folders go in {INCLUDE_ENV})")
    return manager


def refusal(name: str, config: Mapping[str, Any]) -> str | None:
    """Why tokenbench cannot run this lmms-eval task config, or None."""
    output_type = config.get("output_type", "generate_until")
    if output_type in LOGPROB_TYPES:
        return f"it scores log-probabilities (output_type {output_type}); tokenbench generates text"
    if output_type != "generate_until":
        return f"output_type {output_type}: tokenbench runs single-turn text generation only"
    metrics = [m for m in config.get("metric_list") or [] if isinstance(m, Mapping)]
    judged = [m["metric"] for m in metrics if JUDGE_METRIC in str(m.get("metric", "")).lower()]
    if judged:
        return f"its metric {judged[0]} is scored by a judge model, which tokenbench does not run"
    scorers = [config.get("process_results")] + [m.get("aggregation") for m in metrics]
    # lmms-eval loads a task's utils.py without registering a module, so read the scorers' files
    for path in dict.fromkeys(getattr(getattr(f, "__code__", None), "co_filename", None) for f in scorers):
        try:
            source = Path(path).read_text() if path else ""
        except OSError:
            continue
        marker = next((m for m in JUDGE_MARKERS if m in source), None)
        if marker:
            return f"its scorer ({path}) calls a judge model ('{marker}'), which tokenbench does not run"
    try:
        Decoding.from_generation_kwargs(config.get("generation_kwargs"))
    except RequestError as exc:
        return str(exc)
    return None


def task_class(name: str) -> type[LmmsTask]:
    """A tokenbench :class:`Task` class for lmms-eval task ``name`` (``LmmsTaskError`` if it cannot run)."""
    manager = task_manager_for(name)
    entry = manager.task_index[name]
    if entry["type"] != "task":
        raise LmmsTaskError(f"lmms-eval '{name}' is a {entry['type']} of several tasks; name one of its tasks")
    try:
        config = manager._get_config(name)  # lmms-eval's own YAML reader (resolves !function and include)
    except ImportError as exc:  # a scorer module needs a package of lmms-eval's full dependency list
        raise LmmsTaskError(f"lmms-eval task '{name}' needs a package that is not installed ({exc}); "
                            f"install it, or all of lmms-eval's dependencies with the lmms extra (pip install -e '.[lmms]')") from None
    reason = refusal(name, config)
    if reason:
        raise LmmsTaskError(f"lmms-eval task '{name}' cannot run in tokenbench: {reason}")
    metrics = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    if not metrics:
        raise LmmsTaskError(f"lmms-eval task '{name}' names no metric in its metric_list")
    decoding = Decoding.from_generation_kwargs(config.get("generation_kwargs"))
    attrs = {"name": f"{PREFIX}{name}", "lmms_name": name, "primary_metric": metrics[0],
             "max_new_tokens": decoding.max_new_tokens, "decoding": decoding,
             "source": f"lmms-eval {lmms_eval_version()}: {entry['yaml_path']}",
             "description": f"lmms-eval task {name} ({config.get('dataset_path')}), scored by its "
                            f"process_results and aggregation"}
    return type(f"Lmms_{name}", (LmmsTask,), attrs)


class LmmsTask(Task):
    """An lmms-eval task behind tokenbench's task protocol (subclassed per task by :func:`task_class`)."""

    lmms_name: ClassVar[str] = ""
    decoding: ClassVar[Decoding] = Decoding(8)
    metric_scale: ClassVar[float] = 1.0  # lmms-eval metrics carry their task's own scale

    def __init__(self, data_dir: str | Path | None = None) -> None:
        super().__init__(data_dir)  # lmms-eval tasks read their own data (dataset_path in the YAML)
        self._lmms: Any = None
        self._docs: Any = None

    @property
    def lmms(self) -> Any:
        """lmms-eval's ConfigurableTask, loaded (with its dataset) on first use."""
        if self._lmms is None:
            manager = task_manager_for(self.lmms_name)
            try:
                task = manager.load_task_or_group([self.lmms_name])[self.lmms_name]
                docs = task.eval_docs
            except Exception as exc:  # noqa: BLE001 -- its data or definition; one line, not a traceback
                raise LmmsTaskError(f"lmms-eval could not load task '{self.lmms_name}': "
                                    f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}") from None
            if docs is None:
                raise LmmsTaskError(f"lmms-eval task '{self.lmms_name}' has no test or validation split")
            self._lmms, self._docs = task, docs
        return self._lmms

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        task = self.lmms
        shots = task.config.num_fewshot or 0
        for doc_id in range(len(self._docs) if limit is None else min(limit, len(self._docs))):
            doc = self._docs[doc_id]
            yield Sample(str(doc_id), task.fewshot_context(doc, shots), functools.partial(self._image, doc),
                         None, {"doc_id": doc_id})

    def _image(self, doc: Mapping[str, Any]) -> Any:
        try:
            return single_image(self.lmms.doc_to_visual(doc))
        except RequestError as exc:
            raise TaskDataError(f"task '{self.name}': {exc}") from None

    def score(self, sample: Sample, prediction: str) -> dict[str, Any]:
        """The task's filters and ``process_results`` on the answer (cut at the task's stop strings,
        as the bridge's lmms-eval model cuts it). Metrics of the first filter keep their names; the
        others are keyed ``metric,filter`` as in lmms-eval's results."""
        from lmms_eval.api.instance import Instance

        task, doc_id = self.lmms, int(sample.meta["doc_id"])
        doc = self._docs[doc_id]
        instance = Instance("generate_until", (), 0, metadata={"task": self.lmms_name, "doc_id": doc_id,
                                                              "repeats": 1})
        instance.resps = [self.decoding.cut(prediction)]
        scores: dict[str, Any] = {}
        for index, ensemble in enumerate(task._filters):
            ensemble.apply([instance], [doc])
            result = task.process_results(doc, [instance.filtered_resps[ensemble.name]])
            suffix = "" if index == 0 else f",{ensemble.name}"
            scores |= {f"{metric}{suffix}": _json_safe(value) for metric, value in result.items()}
        return scores

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Each metric by the task's own aggregation function (the value where it is a number)."""
        aggregation = self.lmms.aggregation()
        keys = list(dict.fromkeys(k for r in records for k in r["scores"]))
        out: dict[str, float] = {}
        for key in keys:
            function = aggregation.get(key.split(",")[0])
            if function is None:
                continue
            items = [r["scores"][key] for r in records if key in r["scores"]]
            takes_args = "args" in inspect.signature(function).parameters
            value = function(items, args=getattr(self.lmms, "args", None)) if takes_args else function(items)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[key] = float(value)
        return out


def _json_safe(value: Any) -> Any:
    """``value`` as it comes back from the sample store (JSON), so a resumed run scores the same."""
    return json.loads(json.dumps(value, default=str))
