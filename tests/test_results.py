"""Result records: keys, the JSONL store (torn lines), the output-directory guard, statistics."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tokenbench.results import (
    OutputDirError,
    SampleStore,
    claim_output_dir,
    load_run_records,
    record_key,
    run_file_name,
    settings_key,
    write_run_record,
)
from tokenbench.stats import agreement, bootstrap_relative, compare, units


def test_record_key_is_stable_and_sensitive():
    base = {"model": "m", "task": "t", "sample": "s1", "method": "apet", "options": {"basis": 10},
            "budget": "64", "seed": 0}
    assert record_key(**base) == record_key(**dict(reversed(list(base.items()))))
    for field, value in [("sample", "s2"), ("options", {"basis": 11}), ("budget", "128"), ("seed", 1)]:
        assert record_key(**base | {field: value}) != record_key(**base)


def test_store_appends_and_reloads(tmp_path):
    path = tmp_path / "samples.jsonl"
    with SampleStore(path) as store:
        store.append({"key": "a", "value": 1})
        store.append({"key": "b", "value": 2})
    with SampleStore(path) as store:
        assert "a" in store and store.get("b") == {"key": "b", "value": 2} and store.dropped == 0


def test_store_drops_a_torn_last_line_and_appends_cleanly(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"key": "a", "value": 1}\n{"key": "b", "val')
    with SampleStore(path) as store:
        assert "a" in store and "b" not in store and store.dropped == 1
        store.append({"key": "b", "value": 2})
    assert "1 incomplete record(s) dropped" in capsys.readouterr().err
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b"]


def test_output_dir_guard(tmp_path):
    directory = tmp_path / "out"
    claim_output_dir(directory, {"limit": 10})
    claim_output_dir(directory, {"limit": 10})  # same arguments: resume
    claim_output_dir(directory, {"limit": 20})  # other arguments: the directory grows
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["runs"] == [{"limit": 10}, {"limit": 20}]
    (directory / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 99}))
    with pytest.raises(OutputDirError, match=r"schema version 99.*--output .*out-v1.*rm -r"):
        claim_output_dir(directory, {"limit": 10})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    with pytest.raises(OutputDirError, match="not a tokenbench results directory"):
        claim_output_dir(foreign, {})


def test_run_records_round_trip(tmp_path):
    record = {"schema_version": 1, "model": "m/x", "task": "t", "method": "apet", "budget": "11.1%", "score": 1.0}
    path = write_run_record(tmp_path, record)
    assert path.name == run_file_name("m/x", "t", "apet", "11.1%", settings_key(record))
    assert path.name.startswith("m_x__t__apet__11.1pct__")
    assert [r for _, r in load_run_records([tmp_path])] == [record]


def test_run_records_of_other_settings_do_not_overwrite_each_other(tmp_path):
    """Issue 15: a record per (model, task, method, budget, settings)."""
    record = {"schema_version": 1, "model": "m", "task": "t", "method": "apet", "budget": "64", "score": 1.0,
              "provenance": {"limit": None, "seed": 0}}
    first = write_run_record(tmp_path, record)
    limited = json.loads(json.dumps(record))
    limited["provenance"]["limit"] = 8
    limited["score"] = 2.0
    second = write_run_record(tmp_path, limited)
    assert first != second
    assert sorted(r["score"] for _, r in load_run_records([tmp_path])) == [1.0, 2.0]
    assert write_run_record(tmp_path, record | {"score": 3.0}) == first  # same settings: replaced


def _records(correct: list[int], predictions: list[str]) -> list[dict]:
    return [{"sample_id": f"s{i}", "scores": {"c": c}, "prediction": p, "error": None}
            for i, (c, p) in enumerate(zip(correct, predictions))]


def _aggregate(records):
    return {"acc": 100.0 * sum(r["scores"]["c"] for r in records) / len(records)}


def test_relative_agreement_and_paired_bootstrap():
    baseline = _records([1, 1, 1, 1, 0, 1, 1, 1], list("abcdefgh"))
    method = _records([1, 1, 0, 1, 0, 1, 1, 0], list("abxdefgy"))
    result = compare(method, baseline, _aggregate, "acc", seed=0)
    assert result["relative"] == pytest.approx(100 * 5 / 7)
    assert result["agreement"] == pytest.approx(6 / 8)
    low, high = result["relative_ci"]
    assert low < result["relative"] < high <= 100.0
    assert bootstrap_relative(method, baseline, _aggregate, "acc", seed=0) == result["relative_ci"]
    assert bootstrap_relative(method, baseline, _aggregate, "acc", seed=1) != result["relative_ci"]


def test_bootstrap_resamples_jointly_scored_samples_as_whole_units():
    baseline = _records([1, 1, 1, 0, 1, 1, 0, 1], list("abcdefgh"))
    method = _records([1, 0, 1, 0, 0, 1, 0, 1], list("axcdxfgh"))
    for index, record in enumerate([*baseline, *method]):
        record["meta"] = {"image": f"img{index % 8 // 2}", "category": "ocr"}
    seen = []

    def by_pairs(records):
        counts = Counter(r["meta"]["image"] for r in records)
        seen.append(all(n % 2 == 0 for n in counts.values()))
        return _aggregate(records)

    grouped = compare(method, baseline, by_pairs, "acc", seed=0, unit=("category", "image"))
    assert grouped["relative_ci"] is not None and all(seen)
    seen.clear()
    compare(method, baseline, by_pairs, "acc", seed=0)
    assert not all(seen)  # sample-level resampling splits the pairs
    assert units([{"meta": {"g": 1}}, {"meta": {}}, {"meta": {"g": 1}}, {}], ("g",)) == [[0, 2], [1], [3]]


def test_statistics_use_only_samples_that_succeeded_in_both():
    baseline = _records([1, 1, 0], ["a", "b", "c"])
    method = _records([1, 0, 0], ["a", "x", "c"])
    method[0]["error"] = "image: broken"
    result = compare(method, baseline, _aggregate, "acc", seed=0)
    assert result["n_paired"] == 2 and result["relative"] == 0.0
    assert agreement(method[1:], baseline[1:]) == 0.5
    assert compare([], baseline, _aggregate, "acc", seed=0)["relative"] is None


def test_a_second_writer_on_the_same_directory_is_refused(tmp_path):
    with SampleStore(tmp_path / "samples.jsonl"), \
            pytest.raises(OutputDirError, match="another tokenbench run is writing"):
        SampleStore(tmp_path / "samples.jsonl")
    SampleStore(tmp_path / "samples.jsonl").close()  # free again once the first one closed
