"""Run records → a markdown leaderboard (tabulate, github format) and a plot per model.

The markdown is a pure function of the run JSON files (sorted, no timestamps), so
``tokenbench leaderboard check`` can re-render it and compare with the committed copy. Tables are
per model and budget: the uncompressed baseline first, then the methods by name. Latencies are only
shown for runs measured on the baseline's hardware (same fingerprint); others read ``n/c``.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from tabulate import tabulate

from tokenbench.budget import Budget
from tokenbench.results import load_run_records, run_file_name

BASELINE = "none"
MARKDOWN_NAME = "README.md"
RESULTS_DIR = "results"


class LeaderboardError(ValueError):
    """Missing or unusable inputs; the message says what to run."""


# ------------------------------------------------------------------------------------------ helpers

def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _sig(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _hardware(record: dict[str, Any]) -> str | None:
    return (record.get("provenance") or {}).get("hardware")


def _budget_order(label: str, n_visual: float) -> float:
    return -Budget.parse(label).target(max(int(round(n_visual)), 1))


def _flash(record: dict[str, Any]) -> str:
    fa = record.get("flash_attention")
    if not fa:
        return "—"
    text = fa.get("class", "—")
    if text == "probe":
        rows = fa.get("probe_rows", 0)
        text += f" ({rows} row{'s' if rows != 1 else ''}, +{fa.get('probe_ms', 0.0):.2f} ms)"
    declared = fa.get("declared")
    if declared and declared != fa.get("class") and fa.get("class") != "fails":
        text += f" ≠ declared {declared}"
    return text


# ------------------------------------------------------------------------------------------ rows

def _row(method: str, runs: Sequence[dict[str, Any]], tasks: Sequence[str], hardware: str | None,
         footnotes: set[str]) -> list[str]:
    by_task = {r["task"]: r for r in runs}
    first = runs[0]
    infeasible = [r["infeasible"] for r in runs if r.get("infeasible")]
    stages = ", ".join(first.get("stages") or []) or "—"
    if infeasible:
        return [method, stages, "—", "infeasible ¹", *["—"] * len(tasks), "—", "—", "—", "—", "—"]
    relative = _mean(r.get("relative") for r in runs)
    rel_text = _fmt(relative)
    if len(runs) == 1 and first.get("relative_ci") and first["method"] != BASELINE:
        low, high = first["relative_ci"]
        rel_text += f" [{low:.1f}, {high:.1f}]"
    tokens = _mean(r.get("realised_tokens") for r in runs)
    ratio = _mean(r.get("realised_ratio") for r in runs)
    token_text = "—" if tokens is None else f"{tokens:.1f} ({100 * ratio:.1f}%)" if ratio else f"{tokens:.1f}"
    scores = []
    for task in tasks:
        run = by_task.get(task)
        text = _fmt(run.get("score")) if run else "—"
        if run and run.get("n_errors"):
            text += f" ({run['n_errors']} err)"
            footnotes.add("err")
        scores.append(text)
    tflops = _mean(((r.get("flops") or {}).get("prefill") or 0) / 1e12 if r.get("flops") else None for r in runs)
    same_hw = all(_hardware(r) == hardware for r in runs)
    latency = [r.get("latency_ms") or {} for r in runs]
    if same_hw:
        ttft = _fmt(_mean(lat.get("ttft") for lat in latency), 2)
        e2e = _fmt(_mean(lat.get("end_to_end") for lat in latency), 2)
    else:
        ttft = e2e = "n/c"
        footnotes.add("hw")
    memory = _mean(r.get("peak_memory_bytes") for r in runs)
    flash = "; ".join(sorted({_flash(r) for r in runs}))
    return [method, stages, token_text, rel_text, *scores, _sig(tflops, 4), ttft, e2e,
            _fmt(memory / 2**20 if memory is not None else None), flash]


def _table(model: str, budget: str | None, runs: list[dict[str, Any]], baseline: list[dict[str, Any]],
           tasks: Sequence[str], footnotes: set[str]) -> str:
    hardware = _hardware(baseline[0]) if baseline else None
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in runs:
        by_method[record["method"]].append(record)
    rows = [_row(BASELINE, baseline, tasks, hardware, footnotes)] if baseline else []
    rows += [_row(m, sorted(by_method[m], key=lambda r: r["task"]), tasks, hardware, footnotes)
             for m in sorted(by_method)]
    headers = ["method", "stage(s)", "tokens ↓", "relative % ↑ [95% CI]",
               *[f"{t} ↑" for t in tasks], "TFLOPs prefill ↓", "TTFT ms ↓", "end-to-end ms ↓",
               "peak MiB ↓", "FlashAttention"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    notes = [f"¹ {m} at budget {budget}: {r['infeasible']}" for m in sorted(by_method)
             for r in by_method[m][:1] if r.get("infeasible")]
    return "\n\n".join([table, *notes])


# ------------------------------------------------------------------------------------------ render

def render_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The whole leaderboard page for ``records`` (deterministic)."""
    if not records:
        raise LeaderboardError("no run records to render; run 'tokenbench run' first")
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_model[record["model"]].append(record)
    out = ["# tokenbench leaderboard", "",
           "Generated by `tokenbench leaderboard build` from the run JSON in `results/`; "
           "`tokenbench leaderboard check` verifies this page matches them. Relative % is the "
           "method's primary score as a percentage of the uncompressed baseline's on the same samples "
           "(mean over tasks; the paired-bootstrap 95% CI is shown for single-task tables). Tokens are "
           "the layer-averaged visual tokens the LLM processed (share of the image's tokens). TFLOPs: "
           "`full_flops` (2 × MACs; vision encoder + projector + LLM prefill + LM head on the last "
           "token). Latency: median batch-1 time to first token and end to end.", ""]
    footnotes: set[str] = set()
    for model in sorted(by_model):
        model_runs = by_model[model]
        tasks = sorted({r["task"] for r in model_runs})
        baseline = sorted((r for r in model_runs if r["method"] == BASELINE and r["budget"] is None),
                          key=lambda r: r["task"])
        n_visual = _mean(r.get("n_visual") for r in baseline) or 576.0
        budgets = sorted({r["budget"] for r in model_runs if r["budget"] is not None},
                         key=lambda b: (_budget_order(b, n_visual), b))
        prov = (baseline[0] if baseline else model_runs[0]).get("provenance") or {}
        out += [f"## {model}", "",
                f"Tasks: {', '.join(tasks)}. Hardware: {prov.get('device', '?')} "
                f"({prov.get('device_type', '?')}, fingerprint `{prov.get('hardware', '?')}`), "
                f"dtype {prov.get('dtype', '?')}, attention {prov.get('attention_backend', '?')}, "
                f"tokenbench {prov.get('tokenbench', '?')} ({(prov.get('git_sha') or 'no git')[:10]}), "
                f"torch {prov.get('torch', '?')}, transformers {prov.get('transformers', '?')}, "
                f"seed {prov.get('seed', '?')}.", ""]
        for budget in budgets:
            runs = [r for r in model_runs if r["budget"] == budget]
            out += [f"### {model} · budget {budget}", "", _table(model, budget, runs, baseline, tasks, footnotes), ""]
        if not budgets and baseline:
            out += [f"### {model} · uncompressed", "", _table(model, None, [], baseline, tasks, footnotes), ""]
        out += [f"![relative accuracy vs prefill TFLOPs]({plot_name(model)})", ""]
    if "hw" in footnotes:
        out += ["`n/c`: measured on other hardware than the baseline; latencies are not comparable.", ""]
    if "err" in footnotes:
        out += ["`(k err)`: k samples failed (recorded with the error in the run's samples); the score "
                "covers the others.", ""]
    return "\n".join(out).rstrip() + "\n"


def plot_name(model: str) -> str:
    return run_file_name(model, "plot", "accuracy", "flops").removesuffix(".json") + ".png"


def render_plots(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per model: relative accuracy (%) against prefill TFLOPs, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("flops") and record.get("relative") is not None:
            by_model[record["model"]].append(record)
    paths = []
    for model, runs in sorted(by_model.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for method in sorted({r["method"] for r in runs}):
            points = sorted(((r["flops"]["prefill"] / 1e12, r["relative"]) for r in runs
                             if r["method"] == method), key=lambda p: p[0])
            xs, ys = zip(*points)
            style = dict(marker="*", markersize=12, linestyle="none", color="black") if method == BASELINE \
                else dict(marker="o")
            ax.plot(xs, ys, label="uncompressed" if method == BASELINE else method, **style)
        ax.set_xlabel("prefill TFLOPs (full_flops, per sample)")
        ax.set_ylabel("relative accuracy (% of uncompressed)")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / plot_name(model)
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ build/check

def collect(results: Sequence[Path], destination: Path) -> None:
    """Copy every run record under ``results`` into ``destination`` (named by model, task, method,
    budget, so a newer run replaces the older one)."""
    destination.mkdir(parents=True, exist_ok=True)
    for path, record in load_run_records(results):
        if path.resolve().parent == destination.resolve():
            continue
        target = destination / run_file_name(record["model"], record["task"], record["method"], record["budget"])
        shutil.copyfile(path, target)


def committed_records(out: Path) -> list[dict[str, Any]]:
    return [record for _, record in load_run_records([out / RESULTS_DIR])] if (out / RESULTS_DIR).is_dir() else []


def build(results: Sequence[Path], out: Path) -> tuple[Path, list[Path]]:
    for directory in results:
        if not directory.exists():
            raise LeaderboardError(f"results '{directory}' does not exist; run 'tokenbench run --output "
                                   f"{directory}' first or give --results DIR")
    collect(results, out / RESULTS_DIR)
    records = committed_records(out)
    if not records:
        raise LeaderboardError(f"no run records (*.json with schema_version) under "
                               f"{', '.join(map(str, results))}; run 'tokenbench run' first")
    markdown = out / MARKDOWN_NAME
    markdown.write_text(render_markdown(records))
    return markdown, render_plots(records, out)


def check(out: Path) -> str | None:
    """None when ``out/README.md`` matches what ``out/results`` renders, else a description."""
    records = committed_records(out)
    markdown = out / MARKDOWN_NAME
    if not records:
        raise LeaderboardError(f"no run records under {out / RESULTS_DIR}; run 'tokenbench leaderboard build'")
    if not markdown.is_file():
        return f"{markdown} is missing; run 'tokenbench leaderboard build --out {out}'"
    expected = render_markdown(records)
    actual = markdown.read_text()
    if expected == actual:
        return None
    for number, (want, have) in enumerate(zip(expected.splitlines(), actual.splitlines()), start=1):
        if want != have:
            return (f"{markdown} differs from what {out / RESULTS_DIR} renders (first at line {number}); "
                    f"run 'tokenbench leaderboard build --out {out}'")
    return f"{markdown} differs in length from what {out / RESULTS_DIR} renders; run 'tokenbench leaderboard build'"
