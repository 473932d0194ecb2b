"""The ``tokenbench`` command: a thin click front end over the registry, the harness and the leaderboard.

Every error a user can cause ends in one line on stderr, ``tokenbench: error: ...``, and exit
status 2 (usage) — never a traceback.
"""

from __future__ import annotations

import fnmatch
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import click
import torch
from tabulate import tabulate

from tokenbench.adapters.placement import DEVICE_MAPS, parse_max_memory
from tokenbench.budget import BudgetError, parse_budgets
from tokenbench.config import ConfigError, MethodSpec, RunConfig, parse_method_list, parse_option_assignments
from tokenbench.distributed import current_processes
from tokenbench.models import ModelNameError, default_model, embedded_models, resolve_model
from tokenbench.plugins import PluginError, Registry, UnknownName, load_registry
from tokenbench.tasks.base import TaskDataError

USAGE_ERRORS = (UnknownName, ConfigError, BudgetError, ModelNameError, PluginError, TaskDataError)
DEFAULT_BUDGETS = "33.3%,22.2%,11.1%"


class UsageFailure(click.ClickException):
    exit_code = 2


class TokenbenchGroup(click.Group):
    """Turns every user error (click's own usage errors included) into one line and exit 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("tokenbench: interrupted", err=True)
            sys.exit(130)
        except (click.UsageError, UsageFailure) as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) and \
                isinstance(exc, click.UsageError) and exc.ctx.parent else ""
            click.echo(f"tokenbench: error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"tokenbench: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except USAGE_ERRORS as exc:
            click.echo(f"tokenbench: error: {exc}", err=True)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole first sentence (click cuts it to the width)."""
        rows = [(name, command.get_short_help_str(limit=500)) for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _registry(ctx: click.Context) -> Registry:
    obj = ctx.find_root().ensure_object(dict)
    if "registry" not in obj:
        obj["registry"] = load_registry(obj.get("plugins_dir"))
        for problem in obj["registry"].problems:
            click.echo(f"tokenbench: warning: {problem}", err=True)
    return obj["registry"]


@click.group(cls=TokenbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plugins-dir", envvar="TOKENBENCH_PLUGINS_DIR", default=None, metavar="DIR",
              help="Also load loose *.py plugin files from DIR (env TOKENBENCH_PLUGINS_DIR).")
@click.version_option(package_name="tokenbench")
@click.pass_context
def cli(ctx: click.Context, plugins_dir: str | None) -> None:
    """tokenbench: benchmark visual-token compression methods on vision-language models."""
    if plugins_dir is not None and not Path(plugins_dir).is_dir():
        raise UsageFailure(f"plugins dir '{plugins_dir}' does not exist; give an existing directory "
                           f"of *.py plugin files")
    ctx.ensure_object(dict)["plugins_dir"] = plugins_dir


@cli.command()
@click.argument("pattern", required=False)
@click.pass_context
def methods(ctx: click.Context, pattern: str | None) -> None:
    """List compression methods (optionally matching a glob PATTERN)."""
    registry = _registry(ctx)
    rows = []
    for name, cls in sorted(registry.compressors.items()):
        if pattern and not fnmatch.fnmatch(name, pattern) and pattern not in name:
            continue
        method = cls()
        rows.append([name, ", ".join(str(s) for s in cls.stages), ", ".join(sorted(method.needs)) or "-",
                     method.flash_attention, cls.paper or "-", registry.owner[("compressor", name)].label])
    if pattern and not rows:
        raise UnknownName("compressor", pattern, list(registry.compressors))
    click.echo(tabulate(rows, headers=["method", "stages", "needs", "flash-attn", "paper", "plugin"]))


@cli.command()
@click.pass_context
def plugins(ctx: click.Context) -> None:
    """Print every discovered plugin, its version and what it registered, as JSON."""
    registry = _registry(ctx)
    click.echo(json.dumps([p.to_dict() for p in registry.plugins], indent=2))


@cli.command()
@click.option("--validate", "validate", is_flag=True,
              help="Load two samples of each named (default: every) task and score them.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Local copy of the benchmark data (parquet files per task).")
@click.argument("names", nargs=-1)
@click.pass_context
def tasks(ctx: click.Context, validate: bool, data_dir: str | None, names: tuple[str, ...]) -> None:
    """List tasks with their metric and data source."""
    registry = _registry(ctx)
    selected = [registry.task(n) for n in names] if names else [registry.tasks[n] for n in sorted(registry.tasks)]
    if not validate:
        rows = [[t.name, t.primary_metric, t.source or "-", t.description or "-",
                 registry.owner[("task", t.name)].name] for t in selected]  # `tokenbench plugins` has the rest
        click.echo(tabulate(rows, headers=["task", "primary metric", "source", "description", "plugin"],
                            maxcolwidths=[None, 16, 22, 42, 16]))
        if not names:
            from tokenbench.integrations.lmms_tasks import source_note

            click.echo("\n" + textwrap.fill(source_note(), width=106, subsequent_indent=" " * 13))
        return
    from tokenbench.tasks.validate import validate_task

    failed = 0
    for task_cls in selected:
        ok, message = validate_task(task_cls, data_dir)
        failed += not ok
        click.echo(f"{'ok     ' if ok else 'missing'} {task_cls.name}: {message}")
    if failed:
        sys.exit(1)


@cli.command()
@click.pass_context
def models(ctx: click.Context) -> None:
    """List adapter families (with their stages) and the embedded models."""
    registry = _registry(ctx)
    rows = [[cls.name, ", ".join(cls.model_types), ", ".join(sorted(str(s) for s in cls.stages)),
             registry.owner[("adapter", name)].label] for name, cls in sorted(registry.adapters.items())]
    click.echo(tabulate(rows, headers=["adapter", "model_type", "stages", "plugin"]))
    zoo = embedded_models()
    if zoo:
        click.echo("\nembedded models (offline, shipped with tokenbench):")
        for name, path in sorted(zoo.items()):
            marker = " (default)" if name == default_model() else ""
            click.echo(f"  {name}{marker}: {path}")


@cli.command()
@click.option("--model", default=None, help="Embedded model name, local checkpoint dir or hub id.")
@click.option("--methods", "methods_text", default="apet,fastv", show_default=True,
              help="Comma-separated methods; the uncompressed baseline always runs too.")
@click.option("--budgets", default=DEFAULT_BUDGETS, show_default=True,
              help="Layer-averaged visual tokens per method: counts (192,128,64) or ratios (11.1%).")
@click.option("--tasks", "tasks_text", default="shapes", show_default=True, help="Comma-separated tasks.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Samples per task.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the methods' random generator and of the bootstrap.")
@click.option("--output", type=click.Path(file_okay=False), default="tokenbench-results", show_default=True,
              help="Results directory; runs with other methods, budgets, tasks or limits add to it and "
                   "reuse every finished sample.")
@click.option("-o", "option_assignments", multiple=True, metavar="METHOD.KEY=VALUE",
              help="Set a method option; repeatable.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Precision the model runs in.")
@click.option("--attn", type=click.Choice(["sdpa", "flash_attention_2", "eager"]), default="sdpa",
              show_default=True, help="Attention implementation the model loads with.")
@click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads torch uses (torch.set_num_threads); default: torch's own. Recorded with "
                   "the timings.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Local copy of benchmark data.")
@click.option("--efficiency/--no-efficiency", default=True, show_default=True,
              help="Also run the batch-1 timing pass.")
@click.option("--accuracy/--no-accuracy", default=True, show_default=True,
              help="Run the accuracy pass; --no-accuracy times the methods only.")
@click.option("--model-config", default=None, metavar="PATH|NAME",
              help="Efficiency only: build the model from an HF config.json with random weights (no "
                   "checkpoint; implies --no-accuracy): a path, or a shipped config: llava-1.5-7b, "
                   "qwen2-vl-2b, llava-next-7b, llava-onevision-7b.")
@click.option("--json", "as_json", is_flag=True, help="Print the result records as JSON at the end.")
@click.option("--scoring", type=click.Choice(["official", "lenient"]), default="official", show_default=True,
              help="Benchmark scoring: each benchmark's official rule, or lenient (wider reading of choice "
                   "letters and VQA answers; recorded in the provenance).")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Frames a video benchmark (mvbench, videomme) samples uniformly from each video; default: "
                   "the model family's reference evaluation (Video-LLaVA 8, LLaVA-OneVision and Qwen2-VL 32). "
                   "shapes-video clips always have 8.")
@click.option("--protocol", type=click.Choice(["llava", "hf"]), default=None,
              help="Prompt and image protocol: llava (LLaVA-1.5's pad-to-square and vicuna_v1 conversation; "
                   "default for LLaVA checkpoints) or hf (processor and chat template; default for "
                   "embedded models and other families).")
@click.option("--device-map", type=click.Choice(DEVICE_MAPS), default=None,
              help="Spread a model too large for one GPU over the GPUs (and CPU / disk) with accelerate's "
                   "big-model loading; replaces --device.")
@click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
              help="With --device-map: memory per device, e.g. 0=40GiB,1=40GiB,cpu=64GiB.")
@click.pass_context
def run(ctx: click.Context, model: str | None, methods_text: str, budgets: str, tasks_text: str,
        limit: int | None, seed: int, output: str, option_assignments: tuple[str, ...], dtype: str,
        attn: str, device: str, batch_size: int, data_dir: str | None, efficiency: bool,
        accuracy: bool, model_config: str | None, as_json: bool, scoring: str, protocol: str | None,
        device_map: str | None, max_memory: str | None, threads: int | None, frames: int | None) -> None:
    """Run methods x budgets x tasks on a model (plus the uncompressed baseline)."""
    registry = _registry(ctx)
    method_names = parse_method_list(methods_text, registry)
    options = parse_option_assignments(option_assignments, method_names, registry)
    budget_list = parse_budgets(budgets)
    task_names = [t.strip() for t in tasks_text.split(",") if t.strip()]
    if not task_names:
        raise ConfigError("--tasks is empty; give e.g. --tasks shapes")
    if duplicates := sorted({t for t in task_names if task_names.count(t) > 1}):
        raise ConfigError(f"--tasks names {', '.join(duplicates)} twice; give each task once")
    for name in task_names:
        registry.task(name)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir '{data_dir}' does not exist")
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device '{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if model_config is not None:
        from tokenbench.random_model import config_model_ref

        if model is not None:
            raise ConfigError("give either --model or --model-config, not both")
        if not efficiency:
            raise ConfigError("--model-config has random weights, so it only times methods; drop "
                              "--no-efficiency")
        model_ref = config_model_ref(model_config, registry)
        accuracy = False
    else:
        model_ref = resolve_model(model or default_model(), registry)
    if not accuracy and not efficiency:
        raise ConfigError("--no-accuracy with --no-efficiency leaves nothing to run; drop one of them")
    memory = _device_map_memory(device_map, max_memory, model_config)
    config = RunConfig(
        model=model_ref,
        methods=[MethodSpec(n, options[n]) for n in method_names], budgets=budget_list, tasks=task_names,
        limit=limit, seed=seed, output=Path(output), dtype=dtype, attn=attn, device=device,
        batch_size=batch_size, data_dir=Path(data_dir) if data_dir else None, efficiency=efficiency,
        scoring=scoring, protocol=protocol, device_map=device_map, max_memory=memory, threads=threads,
        frames=frames)
    try:
        from tokenbench.runner import resolve_protocol
        from tokenbench.runner import run as run_benchmark
    except ImportError:
        raise click.ClickException("the harness is not built yet: 'run' validated its arguments only")
    if model_ref.model_type is not None:
        resolve_protocol(config, registry.adapter_for(model_ref.model_type))
    records = run_benchmark(config, registry, accuracy=accuracy, random_weights=model_config is not None)
    if not current_processes().is_main:  # the main process of a launched run reports for all
        return
    if as_json:
        click.echo(json.dumps(records, indent=2))
    elif records:
        from tokenbench.leaderboard import render_markdown

        click.echo(render_markdown(records, page=False))
        click.echo(f"results: {config.output}/ (render them with 'tokenbench leaderboard build "
                   f"--results {config.output}')", err=True)
    failed = [r for r in records if r.get("n_samples") and r.get("n_errors") == r["n_samples"]]
    for record in failed:
        first = record.get("first_error") or {}
        where = f" (raised at {first['at']})" if first.get("at") else ""
        arm = record["method"] + (f"@{record['budget']}" if record.get("budget") else "")
        click.echo(f"tokenbench: error: {arm} on {record['task']} failed on all {record['n_samples']} samples; "
                   f"first error: {first.get('error')}{where}", err=True)
    if failed:
        sys.exit(1)


def _device_map_memory(device_map: str | None, max_memory: str | None,
                       model_config: str | None) -> dict[int | str, str] | None:
    """``--max-memory`` parsed, after checking it goes with a ``--device-map`` that can use it."""
    if device_map is None:
        if max_memory is not None:
            raise ConfigError("--max-memory only applies with --device-map; add --device-map auto")
        return None
    if model_config is not None:
        raise ConfigError("--device-map loads a checkpoint; --model-config builds random weights on one "
                          "device: drop one of them")
    try:
        return parse_max_memory(max_memory) if max_memory is not None else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@cli.group()
def leaderboard() -> None:
    """Render and verify the markdown leaderboard built from run JSON files."""


@leaderboard.command("build")
@click.option("--results", "results", multiple=True, type=click.Path(), default=("tokenbench-results",),
              show_default=True, help="Directory (or run JSON) with results from 'tokenbench run'; repeatable.")
@click.option("--out", type=click.Path(file_okay=False), default="leaderboard", show_default=True,
              help="Leaderboard directory: README.md, a PNG plot per model, and results/ (the JSON).")
def leaderboard_build(results: tuple[str, ...], out: str) -> None:
    """Copy run JSON into OUT/results and render OUT/README.md and the plots from it."""
    from tokenbench.leaderboard import LeaderboardError, build

    try:
        markdown, plots = build([Path(r) for r in results], Path(out))
    except LeaderboardError as exc:
        raise ConfigError(str(exc)) from None
    click.echo(f"wrote {markdown}" + "".join(f", {p}" for p in plots), err=True)


@leaderboard.command("check")
@click.option("--out", type=click.Path(file_okay=False), default="leaderboard", show_default=True,
              help="Leaderboard directory to verify.")
def leaderboard_check(out: str) -> None:
    """Exit 1 when OUT/README.md differs from what OUT/results renders."""
    from tokenbench.leaderboard import LeaderboardError, check

    try:
        problem = check(Path(out))
    except LeaderboardError as exc:
        raise ConfigError(str(exc)) from None
    if problem:
        click.echo(f"tokenbench: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{out}: up to date", err=True)


def main() -> None:
    cli(prog_name="tokenbench")


if __name__ == "__main__":
    main()
