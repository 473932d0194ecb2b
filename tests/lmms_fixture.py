"""A local lmms-eval task over a small POPE-schema dataset, written to disk for the bridge's tests.

The task folder (for ``--include_path`` / ``TOKENBENCH_LMMS_INCLUDE_PATH``) holds a YAML in the shape
of lmms-eval's own ``pope.yaml`` and a ``utils.py`` that reuses lmms-eval's POPE functions; the data
are a parquet file of POPE's columns whose images and yes/no questions are the existence questions
of tokenbench's ``shapes`` task (what the embedded model answers), all in one POPE category.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK = "tb_pope_local"
CATEGORY = "adversarial"
MAX_NEW_TOKENS = 3

YAML = """\
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
task: {task}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_precision
    aggregation: !function utils.pope_aggregate_precision
    higher_is_better: true
  - metric: pope_recall
    aggregation: !function utils.pope_aggregate_recall
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function utils.pope_aggregate_f1_score
    higher_is_better: true
  - metric: pope_yes_ratio
    aggregation: !function utils.pope_aggregate_yes_ratio
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {post_prompt}
metadata:
  - version: 0.0
"""

UTILS = "from lmms_eval.tasks.pope.utils import *  # noqa: F401,F403 -- lmms-eval's own POPE functions\n"


def write_pope_task(root: Path, n: int = 8, post_prompt: str = "", max_new_tokens: int = MAX_NEW_TOKENS) -> Path:
    """Write the task folder under ``root`` (returned) with ``n`` POPE rows. The parquet file lies
    where tokenbench's own ``pope`` task finds it too (``--data-dir root``); with ``post_prompt``
    "\\nAnswer the question using a single word or phrase." and 8 new tokens both ask the same."""
    import datasets
    from tokenbench.tasks.shapes import FAMILIES, make_example

    examples = [make_example(0, len(FAMILIES) * i) for i in range(n)]  # index ≡ 0 mod 6: existence
    assert all(e.family == "existence" for e in examples)
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image_source": datasets.Value("string"),
                                  "image": datasets.Image(), "category": datasets.Value("string")})
    rows = {"question_id": [str(i) for i in range(n)], "question": [e.question for e in examples],
            "answer": [e.answer for e in examples], "image_source": [f"shapes-{i}" for i in range(n)],
            "image": [e.image() for e in examples], "category": [CATEGORY] * n}
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data = root / "POPE" / "data" / "test-00000.parquet"
    data.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data))
    (folder / f"{TASK}.yaml").write_text(YAML.format(data=data, task=TASK, max_new_tokens=max_new_tokens,
                                                          post_prompt=json.dumps(post_prompt)))
    (folder / "utils.py").write_text(UTILS)
    return folder
