"""Command-line interface, installed as both ``thinkpress`` and ``core``.

Stable commands (scripts depend on them): ``run``, ``eval``, ``plugins [--json]``, ``config schema``,
``models``. Plugins add commands through the ``register_commands`` hook.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from thinkpress import __version__
from thinkpress.core.errors import ThinkpressError
from thinkpress.core.report import fmt_num_ci, fmt_pct_ci

err_console = Console(stderr=True, soft_wrap=True)


def _fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="thinkpress")
def cli():
    """thinkpress: run, compose and compare reasoning-compression methods."""


def _data_overrides(data: str | None, reg) -> dict:
    if not data:
        return {}
    if data in reg.datasets:
        return {"train_data": {"name": data, "path": None}, "test_data": {"name": data, "path": None}}
    p = Path(data).expanduser()
    if not p.exists():
        raise ThinkpressError(f"--data {data!r}: not a registered dataset ({', '.join(sorted(reg.datasets))}) "
                              "and no such file or directory")
    name = p.name if p.is_dir() and p.name in reg.datasets else (p.parent.name if p.parent.name in reg.datasets
                                                                   else "jsonl")
    return {"train_data": {"name": name, "path": str(p)}, "test_data": {"name": name, "path": str(p)}}


def _common_options(f):
    """Options shared by ``run`` and ``eval``."""
    opts = [
        click.option("--preset", default=None, metavar="NAME",
                     help="Preset (default: default)"),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="YAML config file"),
        click.option("--model", default=None, help="Embedded model name, local directory or Hub id"),
        click.option("--set", "sets", multiple=True, metavar="KEY.PATH=VALUE", help="Override any config key "
                     "(repeatable)"),
        click.option("--out", default=None, help="Run directory (default: runs/<plugins>-<hash>)"),
        click.option("--overwrite", is_flag=True, help="Replace a run directory that holds a different config"),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or messages; the summary tables only"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _execute(overrides: dict, preset, config_file, sets, overwrite, quiet) -> None:
    from thinkpress.core.config import build_config
    from thinkpress.core.context import UI
    from thinkpress.core.runner import Runner

    try:
        notes: list[str] = []
        cfg = build_config(preset=preset, config_file=config_file, overrides=overrides, sets=list(sets), notes=notes)
        _echo_notes(notes)
        runner = Runner(cfg, ui=UI(quiet=quiet), overwrite=overwrite)
        report = runner.run()
    except ThinkpressError as e:
        _fail(e)
    _print_report(report, cfg)
    click.echo(f"report: {runner.store.dir / 'report.md'}")


def _echo_notes(notes: list[str]) -> None:
    for n in notes:
        click.echo(f"note: {n}", err=True)


def _print_report(report: dict, cfg) -> None:
    console = Console(width=max(140, Console().width))
    for ts in report.get("test_sets", []):
        rows = ts["variants"]
        table = Table(title=f"thinkpress {', '.join(cfg.plugins)} on {cfg.model}: {ts['name']} "
                            f"({ts['dataset']['split']}, n={ts['dataset']['n']}); brackets: 95% CI")
        table.add_column("variant", justify="left", min_width=max((len(v["name"]) for v in rows), default=7),
                         no_wrap=True)
        for col in ("accuracy %", "vs ref, pt", "lost/gained (p)", "mean tokens", "saved vs base %", "truncated",
                    "tok/s"):
            table.add_column(col, justify="right")
        for v in rows:
            d = v.get("accuracy_delta")
            table.add_row(
                v["name"], f"{100 * v['accuracy']:.1f}{fmt_pct_ci(v.get('accuracy_ci'))}",
                "-" if d is None else f"{100 * d:+.1f}{fmt_pct_ci(v.get('accuracy_delta_ci'), signed=True)}",
                "-" if v.get("flips_vs") is None else f"{v['lost']}/{v['gained']} ({v['flip_p']:.2g})",
                f"{v['mean_tokens']:.1f}{fmt_num_ci(v.get('mean_tokens_ci'), digits=1)}",
                "-" if v.get("tokens_saved") is None else
                f"{100 * v['tokens_saved']:.1f}{fmt_pct_ci(v.get('tokens_saved_ci'), signed=True)}",
                f"{100 * v['truncation_rate']:.1f}%", f"{v['decode_tokens_per_s']:.1f}")
        console.print(table)
    for line in report.get("summary", []):
        click.echo(f"- {line}")
    if report.get("nondeterminism"):
        click.echo("not reproducible bit for bit: " + "; ".join(report["nondeterminism"]))


@cli.command()
@click.option("--plugins", "plugins", default=None, help="Comma-separated plugin names (`core plugins` lists them)")
@click.option("--data", default=None, help="Dataset name (arith, gsm8k, math500) or a JSONL file/directory")
@click.option("--launcher", type=click.Choice(["none", "accelerate"]), default=None,
              help="Run the trainer stage in this process (none) or under `accelerate launch` (launch.launcher)")
@click.option("--num-processes", type=int, default=None, metavar="N",
              help="Training processes under the launcher (launch.num_processes; CPU processes use gloo)")
@click.option("--accelerate-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="accelerate config file for the launcher, e.g. DeepSpeed ZeRO or FSDP (launch.config_file)")
@_common_options
def run(plugins, data, launcher, num_processes, accelerate_config, preset, config_file, model, sets, out, overwrite,
        quiet):
    """Run the pipeline and the evaluation; write DIR/report.json and DIR/report.md."""
    from thinkpress.core.plugins import get_registry

    try:
        overrides = {"model": model, "out": out, **_data_overrides(data, get_registry())}
    except ThinkpressError as e:
        _fail(e)
    if plugins:
        overrides["plugins"] = [p.strip() for p in plugins.split(",") if p.strip()]
    launch = {k: v for k, v in (("launcher", launcher), ("num_processes", num_processes),
                                ("config_file", accelerate_config)) if v is not None}
    if launch.get("num_processes", 1) > 1 or accelerate_config:
        launch.setdefault("launcher", "accelerate")
    if launch:
        overrides["launch"] = launch
    _execute(overrides, preset, config_file, sets, overwrite, quiet)


@cli.command("eval")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="A saved LoRA adapter directory, evaluated unmerged as variant 'adapter' next to 'base'")
@click.option("--plugins", "plugins", default=None, help="KV-policy plugins to evaluate with (see `core plugins`)")
@click.option("--data", multiple=True, help="Test set: dataset name or JSONL file/directory (repeatable; default: "
              "the preset's test sets)")
@_common_options
def eval_cmd(adapter, plugins, data, preset, config_file, model, sets, out, overwrite, quiet):
    """Evaluate a model as it is (and/or with a saved adapter, and/or KV policies) on test sets, no training.

    The same report, intervals and evaluation cache as ``run``.
    """
    from thinkpress.core.plugins import get_registry

    overrides: dict = {"model": model, "out": out, "train": False, "plugins": [], "eval": {"adapter": adapter}}
    try:
        tests = [{"split": "test", **_data_overrides(d, get_registry())["test_data"]} for d in data]
    except ThinkpressError as e:
        _fail(e)
    if tests:
        overrides["test_data"] = tests[0] if len(tests) == 1 else tests
    if plugins:
        overrides["plugins"] = [p.strip() for p in plugins.split(",") if p.strip()]
    _execute(overrides, preset, config_file, sets, overwrite, quiet)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
def plugins_cmd(as_json):
    """List installed plugins: name, version, stages provided, hooks; broken ones are marked."""
    from thinkpress.core.plugins import get_registry

    reg = get_registry()
    infos = [i.as_dict() for i in reg.plugins.values()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    table = Table(title="thinkpress plugins")
    for col in ("name", "version", "stages", "hooks", "status"):
        table.add_column(col)
    for i in infos:
        stages = "; ".join(f"{s}: {', '.join(c)}" for s, c in i["stages"].items()) or "-"
        if i["bundle"]:
            stages = "bundle of: " + ", ".join(i["bundle"])
        status = "[red]broken[/]: " + i["broken"].splitlines()[0] if i["broken"] else ("built-in" if i["builtin"]
                                                                                       else i["entry_point"])
        table.add_row(i["name"], i["version"] or "-", stages, ", ".join(i["hooks"]), status)
    Console(width=160).print(table)


@cli.group("config")
def config_group():
    """Configuration helpers."""


@config_group.command("schema")
def config_schema():
    """Print the JSON schema of the run configuration."""
    from thinkpress.core.config import RunConfig

    click.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


@config_group.command("show")
@click.option("--preset", default=None, metavar="NAME", help="Preset (declared by the plugins; default: default)")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--set", "sets", multiple=True)
def config_show(preset, config_file, sets):
    """Print the resolved config (YAML) without running anything."""
    from thinkpress.core.config import build_config, dump_yaml

    try:
        click.echo(dump_yaml(build_config(preset=preset, config_file=config_file, sets=list(sets))))
    except ThinkpressError as e:
        _fail(e)


@cli.command("ablate")
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Study directory (default: studies/out/<study name>)")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Variants run at once "
              "(local worker processes sharing the stage cache)")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: one Ray task per variant (pip install 'thinkpress[ray]'); the stage cache must be on "
                   "storage every worker sees")
@click.option("--dry-run", is_flag=True, help="Print the variants and the training stages they share; run nothing")
@click.option("--quiet", "-q", is_flag=True, help="No progress output from the runs")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a base config key for every "
              "variant (e.g. threads=1); a variant's own value for the key wins")
@click.option("--only", "only", multiple=True, metavar="NAME[,NAME]", help="Run only these variants (and the "
              "control); variants that finished earlier are still summarized, the others are listed as not run")
def ablate_cmd(study_file, out, workers, executor, dry_run, quiet, sets, only):
    """Run an ablation study (a YAML file of variants over one base config); write study.json, study.md and
    pareto.png. Rerunning resumes: finished variants are read back, stages shared between variants run once."""
    from thinkpress.core.ablate import dry_run as do_dry_run
    from thinkpress.core.ablate import load_study, run_study, with_overrides

    try:
        study = with_overrides(load_study(study_file), sets)
        out_dir = Path(out) if out else Path("studies") / "out" / study.name
        if dry_run:
            do_dry_run(study, Path(study_file), out_dir, echo=click.echo)
            return
        names = [n.strip() for o in only for n in o.split(",") if n.strip()]
        summary = run_study(study, Path(study_file), out_dir, workers=workers, executor=executor, quiet=quiet,
                            only=names or None, echo=click.echo)
    except ThinkpressError as e:
        _fail(e)
    st, ev = summary["stage_runs"], summary["evaluations"]
    click.echo(f"{len(summary['variants'])} variants ({len(summary['ran'])} run now); {st['total']} training "
               f"stage runs, {st['from_cache']} from the shared cache; {ev['total']} evaluations, "
               f"{ev['total'] - ev['distinct']} shared")
    if summary["not_run"]:
        click.echo(f"not run (--only): {', '.join(summary['not_run'])}")
    click.echo(f"study: {out_dir / 'study.md'}")


@cli.command("plan")
@click.option("--plugins", "plugins", default=None, help="Comma-separated plugin names")
@click.option("--preset", default=None, metavar="NAME", help="Preset (declared by the plugins; default: default)")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--set", "sets", multiple=True)
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(plugins, preset, config_file, sets, as_json):
    """Print what `core run` would do (components per stage and their plugins, configs, test sets); run nothing."""
    from thinkpress.core.config import build_config
    from thinkpress.core.planning import resolve_plan
    from thinkpress.core.plugins import get_registry

    try:
        reg = get_registry()
        overrides = {"plugins": [p.strip() for p in plugins.split(",") if p.strip()]} if plugins else {}
        notes: list[str] = []
        cfg = build_config(preset=preset, config_file=config_file, overrides=overrides, sets=list(sets), registry=reg,
                           notes=notes)
        _echo_notes(notes)
        plan = resolve_plan(cfg, reg)
    except ThinkpressError as e:
        _fail(e)
    steps = [(stage, p) for stage, p in plan.steps()]
    if as_json:
        click.echo(json.dumps({"train": plan.train, "steps": [
            {"stage": s, "component": p.name, "plugin": p.entry.plugin, "engine": plan.engine_for(s, p.name),
             "config": p.instance.config.model_dump(mode="json")} for s, p in steps],
            "engines": plan.engines, "test_sets": [d.model_dump(mode="json") for d in cfg.test_data]}, indent=2))
        return
    click.echo(f"model {cfg.model}, preset {cfg.preset}, plugins {', '.join(cfg.plugins) or '-'}, "
               f"engine {cfg.engine} (fallback {cfg.fallback_engine or '-'})")
    for stage, p in steps:
        conf = ", ".join(f"{k}={v}" for k, v in p.instance.config.model_dump(mode="json").items())
        click.echo(f"  {stage:<10} {p.name} ({p.entry.plugin}) on {plan.engine_for(stage, p.name)}: {conf}")
    if plan.eval_engine:
        click.echo(f"  evaluation on {plan.eval_engine}")
    if not plan.train:
        click.echo("  (no training stages: an evaluation run)")
    for d in cfg.test_data:
        click.echo(f"  test set   {d.display_name()} ({d.split}, limit {d.limit})")


@cli.group("models", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_group(ctx, as_json):
    """List the embedded models and their cache state."""
    if ctx.invoked_subcommand:
        return
    from thinkpress.core.models import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_dir, embedded_state

    rows = [{"name": m.name, "default": m.name == DEFAULT_MODEL, "state": embedded_state(m.name),
             "path": str(embedded_dir(m.name)), "sha256": m.sha256, "source": ", ".join(m.wheels),
             "description": m.description} for m in EMBEDDED_MODELS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="embedded models")
    for col in ("name", "state", "source", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"] + (" (default)" if r["default"] else ""), r["state"], r["source"], r["description"])
    Console(width=160).print(table)


@models_group.command("fetch")
@click.argument("name")
def models_fetch(name):
    """Fetch, verify and convert an embedded model (done automatically on first use)."""
    from thinkpress.core.models import EMBEDDED_MODELS, ensure_embedded

    if name not in EMBEDDED_MODELS:
        _fail(ThinkpressError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}"))
    try:
        click.echo(ensure_embedded(name, log=click.echo))
    except ThinkpressError as e:
        _fail(e)


@cli.group("samples")
def samples_group():
    """Move the sample cache (earlier runs' completions, reused by samplers) between machines."""


_CACHE_DIR = click.option("--cache-dir", type=click.Path(file_okay=False), default="runs/.cache", show_default=True,
                          help="Stage cache whose samples/ folder is read or filled (a run's cache_dir)")


@samples_group.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@_CACHE_DIR
@click.option("--model", default=None, help="Only requests whose model identity contains this (e.g. an embedded "
              "model's name)")
def samples_export(file, cache_dir, model):
    """Write the cached completions to FILE (JSON lines; gzip when FILE ends in .gz)."""
    from thinkpress.core.store import SampleCache

    n = SampleCache(Path(cache_dir) / "samples").export(Path(file), model=model)
    click.echo(f"wrote {n} requests' completions to {file}")


@samples_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@_CACHE_DIR
def samples_import(file, cache_dir):
    """Add the completions in FILE (from `core samples export`) to the sample cache; checked before any write.

    A run reuses an entry only when its request matches exactly, engine and dtype included: entries
    decoded with another engine or dtype than this machine's defaults resolve to are counted in a note.
    """
    from thinkpress.core.store import SampleCache

    try:
        entries = SampleCache.read_export(Path(file))
        added, present = SampleCache(Path(cache_dir) / "samples").add(entries)
    except ThinkpressError as e:
        _fail(e)
    click.echo(f"added {added} requests' completions to {cache_dir}/samples ({present} already there)")
    note = _foreign_samples_note([e["request"] for e in entries])
    if note:
        click.echo(note)


def _foreign_samples_note(requests: list[dict]) -> str | None:
    """A note when imported requests name an engine or dtype other than what ``engine: auto`` and ``dtype: auto``
    resolve to here (e.g. bf16 samples on a CPU without native bf16, where runs use fp32): runs reuse those
    only when told to use that engine and dtype."""
    from collections import Counter

    from thinkpress.core.config import build_config

    try:
        here = build_config(sets=["engine=auto", "dtype=auto"])
    except ThinkpressError:
        return None
    other = Counter((r.get("engine"), r.get("dtype")) for r in requests
                    if (r.get("engine"), r.get("dtype")) != (here.engine, here.dtype))
    lines = []
    for (engine, dtype), n in sorted(other.items(), key=str):
        sets = [f"--set {k}={v}" for k, v, mine in (("engine", engine, here.engine), ("dtype", dtype, here.dtype))
                if v != mine]
        lines.append(f"note: {n} of them were decoded with engine {engine!r} in {dtype}; here engine auto resolves "
                     f"to {here.engine!r} and dtype auto to {here.dtype}, so runs reuse them only with "
                     + " ".join(sets))
    return "\n".join(lines) or None


def _add_plugin_commands() -> None:
    from thinkpress.core.plugins import get_registry

    reg = get_registry()
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        info = reg.plugins.get(impl.plugin_name)
        if info is None or info.broken:
            continue
        try:
            impl.function(cli=cli)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not stop the CLI
            info.broken = f"register_commands raised {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            err_console.print(f"[yellow]warning:[/] plugin {escape(repr(impl.plugin_name))} failed to add commands: "
                              f"{escape(str(e))}")


def main() -> None:
    try:
        _add_plugin_commands()
    except ThinkpressError as e:
        _fail(e)
    cli()


if __name__ == "__main__":
    main()
