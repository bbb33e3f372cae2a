"""Ablation studies: one YAML file, many runs sharing one stage cache, one table and one plot.

A study file names a base config (preset, plugins, a config file, ``set`` overrides) and how the
variants differ from it: axes over any config key (combined as a ``grid`` or ``zip``), explicit
``variants`` and repeated ``seeds``. ``core ablate STUDY.yaml --out DIR`` runs every variant as an
ordinary run in ``DIR/runs/<variant>``, with the stage cache ``DIR/.cache`` shared by all of them: a
stage whose inputs and config equal another variant's (same key) runs once. Several worker processes
(``--workers``) may reach the same stage at once; a per-key file lock lets one compute it while the
others wait and then reuse it. A killed study resumes: finished variants are read back, unfinished
ones resume from their runs' journals.

Results: ``study.json`` (one row per variant and evaluated model: the config diff, every metric of
every test set with its interval, the run directory), ``study.md`` (tables sorted by accuracy, the
best value per column in bold, the change against the control variant with a paired interval, in
words when it is no significant change; marginal effects per axis) and ``pareto.png`` (accuracy vs.
mean tokens with 95% error bars, one panel per test set).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from thinkpress.core.config import RunConfig, Strict, build_config, format_validation_error
from thinkpress.core.errors import ConfigError, ThinkpressError
from thinkpress.core.files import atomic_write_json, atomic_write_text


class StudyBase(Strict):
    preset: str | None = Field(default=None, description="Preset every variant starts from (default: default)")
    plugins: list[str] | None = Field(default=None, description="Plugins (default: the preset's)")
    config: str | None = Field(default=None, description="A run config YAML file (relative to the study file)")
    set: dict[str, Any] = Field(default_factory=dict, description="Config overrides, key path -> value")


class Axis(Strict):
    key: str = Field(description="Config key path (components.<trainer>.lr), or `plugins`")
    values: list[Any] = Field(min_length=1, description="The values the axis takes")
    labels: list[str] | None = Field(default=None, description="Names of the values in variant names (default: "
                                     "the values)")
    name: str | None = Field(default=None, description="The axis's name in variant names (default: the key's "
                             "last part)")

    @model_validator(mode="after")
    def _labels_match(self) -> Axis:
        if self.labels is not None and len(self.labels) != len(self.values):
            raise ValueError(f"{len(self.labels)} labels for {len(self.values)} values")
        return self

    def label(self, i: int) -> str:
        return self.labels[i] if self.labels else _short(self.values[i])

    @property
    def short(self) -> str:
        return self.name or self.key.split(".")[-1]


class Variant(Strict):
    name: str = Field(description="The variant's name (its run directory)")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides on top of the base")


class Resources(Strict):
    cpus: float = Field(default=1.0, gt=0, description="CPUs per variant (Ray executor)")
    gpus: float = Field(default=0.0, ge=0, description="GPUs per variant (Ray executor)")


class Study(Strict):
    name: str = Field(description="Study name")
    description: str = Field(default="", description="What the study asks")
    base: StudyBase = Field(default_factory=StudyBase, description="The config every variant starts from")
    axes: list[Axis] = Field(default_factory=list, description="Config keys to vary")
    combine: Literal["grid", "zip"] = Field(default="grid", description="grid: every combination of the axes' "
                                            "values; zip: the i-th values together (equal lengths)")
    variants: list[Variant] = Field(default_factory=list, description="Explicit variants, after the axes' ones")
    seeds: list[int] | None = Field(default=None, description="Repeat every variant with these seeds (an axis)")
    control: str | None = Field(default=None, description="The variant the others are compared with (default: "
                                 "the first)")
    compare: str = Field(default="trained", description="The evaluated model each variant is judged by (a "
                         "report variant name: trained, or e.g. base+<kv policy>@budget=128); `all`: every one")
    resources: Resources = Field(default_factory=Resources, description="Per-variant resources (Ray)")
    plugin_modules: list[str] = Field(default_factory=list, description="Importable Python modules registered as "
                                      "plugins in every worker (plugins that are not installed packages)")

    @field_validator("axes")
    @classmethod
    def _distinct_axes(cls, v: list[Axis]) -> list[Axis]:
        keys = [a.key for a in v]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"axis {dup[0]!r} appears twice")
        return v

    @model_validator(mode="after")
    def _something_to_run(self) -> Study:
        if self.combine == "zip" and len({len(a.values) for a in self.axes}) > 1:
            raise ValueError("combine: zip needs axes of equal length, got "
                             + ", ".join(f"{a.key}: {len(a.values)}" for a in self.axes))
        return self


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(_short(x) for x in v) or "none"
    if isinstance(v, dict):
        return ",".join(f"{k}:{_short(x)}" for k, x in v.items())
    return str(v)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+," else "_" for c in name)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; errors name the key path."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    try:
        return Study.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + format_validation_error(e)) from None


def with_overrides(study: Study, sets: list[str] | tuple[str, ...]) -> Study:
    """The study with ``key.path=value`` overrides (``core ablate --set``) added to its base: every variant gets
    them, and a variant that sets the same key itself keeps its own value."""
    if not sets:
        return study
    from thinkpress.core.config import parse_set

    base_set = dict(study.base.set)
    for expr in sets:
        key, value = parse_set(expr)
        base_set[".".join(key)] = value
    return study.model_copy(update={"base": study.base.model_copy(update={"set": base_set})})


def expand(study: Study) -> list[tuple[str, dict[str, Any]]]:
    """The variants as (name, overrides): the axes' combinations, the explicit variants, times the seeds."""
    out: list[tuple[str, dict[str, Any]]] = []
    if study.axes:
        idx = (itertools.product(*[range(len(a.values)) for a in study.axes]) if study.combine == "grid"
               else zip(*[range(len(a.values)) for a in study.axes], strict=True))
        for combo in idx:
            name = ",".join(f"{a.short}={a.label(i)}" for a, i in zip(study.axes, combo, strict=True))
            out.append((name, {a.key: a.values[i] for a, i in zip(study.axes, combo, strict=True)}))
    out += [(v.name, dict(v.set)) for v in study.variants]
    if not out:
        out = [("base", {})]
    if study.seeds:
        out = [(f"{name},seed={s}", {**sets, "seed": s}) for name, sets in out for s in study.seeds]
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two variants are named {dup[0]!r}: give axes labels or variants distinct names")
    return out


def variant_config(study: Study, study_file: Path, out: Path, name: str, sets: dict[str, Any],
                   registry=None, notes: list[str] | None = None) -> RunConfig:
    """The run config of one variant (errors name the variant and the key path; ``notes``: see build_config)."""
    merged = {**study.base.set, **sets}
    overrides: dict[str, Any] = {"out": str(out / "runs" / _slug(name))}
    if study.base.plugins is not None and "plugins" not in merged:
        overrides["plugins"] = study.base.plugins
    set_exprs = [f"{k}={json.dumps(v)}" for k, v in merged.items() if k != "cache_dir"]
    cache = merged.get("cache_dir") or str(out / ".cache")
    set_exprs.append(f"cache_dir={json.dumps(str(cache))}")
    cfg_file = (study_file.parent / study.base.config) if study.base.config else None
    from thinkpress.core.planning import resolve_plan
    from thinkpress.core.plugins import get_registry

    registry = registry or get_registry()
    try:
        cfg = build_config(preset=study.base.preset, config_file=cfg_file, overrides=overrides, sets=set_exprs,
                           registry=registry, notes=notes)
        resolve_plan(cfg, registry)  # component configs and engine capabilities, before any variant runs
        return cfg
    except ConfigError as e:
        raise ConfigError(f"variant {name!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def study_registry(plugin_modules: list[str]):
    """The registry variants run with: the installed plugins plus the study's ``plugin_modules``."""
    import importlib

    from thinkpress.core.plugins import build_registry, get_registry

    if not plugin_modules:
        return get_registry()
    try:
        mods = {m: importlib.import_module(m) for m in plugin_modules}
    except ImportError as e:
        raise ConfigError(f"plugin_modules: {e}") from None
    return build_registry(extra_plugins=mods)


def run_variant(cfg_yaml: str, quiet: bool = True, plugin_modules: list[str] | None = None) -> dict[str, Any]:
    """Run one variant (in this process); returns its report. Picklable entry point for worker processes."""
    from thinkpress.core.context import UI
    from thinkpress.core.runner import Runner

    cfg = RunConfig.model_validate(yaml.safe_load(cfg_yaml))
    return Runner(cfg, registry=study_registry(plugin_modules or []), ui=UI(quiet=quiet)).run()


def finished_report(cfg: RunConfig) -> dict[str, Any] | None:
    """The report of a variant that finished with this very config (None otherwise)."""
    d = cfg.run_dir()
    rep, h = d / "report.json", d / "config.hash"
    if rep.exists() and h.exists() and h.read_text().strip() == cfg.config_hash():
        return json.loads(rep.read_text())
    return None


def _clear_stale_run(name: str, cfg: RunConfig, echo) -> None:
    """Remove a variant's run directory that holds another config (the study file or ``--set`` changed since):
    the study owns it, and what its stages computed stays in the shared stage cache under content keys."""
    import shutil

    d = cfg.run_dir()
    h = d / "config.hash"
    if h.exists() and h.read_text().strip() != cfg.config_hash():
        echo(f"[{name}] its config changed since the run in {d}: replacing that run directory (stages and "
             "evaluations that did not change come from the shared cache)")
        shutil.rmtree(d)


def _echo_base_notes(study: Study, study_file: Path, out: Path, reg, echo) -> None:
    """Show once what the base's mapping-valued keys drop from the preset (build_config's notes)."""
    notes: list[str] = []
    try:
        variant_config(study, study_file, out, "base", {}, reg, notes=notes)
    except ConfigError:  # a base that is valid only with its axes' values: the variants' own checks report errors
        return
    for n in notes:
        echo(f"note: {n}")


def run_study(study: Study, study_file: Path, out: Path, *, workers: int = 1, executor: str = "local",
              quiet: bool = True, only: list[str] | None = None, echo=print) -> dict[str, Any]:
    """Run (or resume) every variant, then write study.json, study.md and pareto.png into ``out``.

    ``only``: run just these variants and the control (the comparisons need it); the others that finished
    earlier are read back and summarized as well, the rest are listed as not run (``not_run``). This splits a
    study that outgrows one sitting into parts; the last part's summary is the whole study's.
    """
    from thinkpress.core.config import dump_yaml

    out.mkdir(parents=True, exist_ok=True)
    variants = expand(study)
    reg = study_registry(study.plugin_modules)
    cfgs = {name: variant_config(study, study_file, out, name, sets, reg) for name, sets in variants}  # checked first
    _echo_base_notes(study, study_file, out, reg, echo)
    selected = None
    if only:
        unknown = [n for n in only if n not in cfgs]
        if unknown:
            raise ConfigError(f"--only: no variant named {', '.join(map(repr, unknown))} "
                              f"(variants: {', '.join(cfgs)})")
        selected = set(only) | {study.control or variants[0][0]}
    atomic_write_text(out / "study.yaml", yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    reports: dict[str, dict[str, Any]] = {}
    todo, not_run = [], []
    for name, cfg in cfgs.items():
        rep = finished_report(cfg)
        if rep is not None:
            reports[name] = rep
            echo(f"[{name}] finished earlier: {cfg.run_dir()}")
        elif selected is not None and name not in selected:
            not_run.append(name)
            echo(f"[{name}] not run (--only)")
        else:
            todo.append(name)
            _clear_stale_run(name, cfg, echo)
    t0 = time.perf_counter()
    if todo and executor == "ray":
        reports |= _run_ray(study, {n: dump_yaml(cfgs[n]) for n in todo}, echo)
    elif todo and workers > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futs = {pool.submit(run_variant, dump_yaml(cfgs[n]), True, study.plugin_modules): n for n in todo}
            for f in as_completed(futs):
                reports[futs[f]] = f.result()
                echo(f"[{futs[f]}] done")
    else:
        for n in todo:
            echo(f"[{n}] running: {cfgs[n].run_dir()}")
            reports[n] = run_variant(dump_yaml(cfgs[n]), quiet, study.plugin_modules)
    _fill_eval_keys(reports, cfgs, reg)
    summary = summarize_study(study, [(n, sets) for n, sets in variants if n in reports], cfgs, reports, out,
                              not_run=not_run)
    summary["wall_s"] = time.perf_counter() - t0
    summary["ran"] = todo
    atomic_write_json(out / "study.json", summary)
    return summary


def _fill_eval_keys(reports: dict[str, dict[str, Any]], cfgs: dict[str, RunConfig], reg) -> None:
    """Reports written before evaluation rows carried their cache key: fill in the keys of the evaluations that
    need no trained adapter (base, KV policies) from the config, as ``--dry-run`` computes them (in memory)."""
    for name, rep in reports.items():
        rows = [(ts["name"], v) for ts in rep["test_sets"] for v in ts["variants"] if not v.get("eval_key")]
        if rows:
            keys = stage_keys(cfgs[name], reg)
            for ts_name, v in rows:
                v["eval_key"] = keys.get(f"eval {v['name']} on {ts_name}")


def _run_ray(study: Study, cfg_yamls: dict[str, str], echo) -> dict[str, dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ThinkpressError("--executor ray needs Ray: pip install 'thinkpress[ray]'") from None
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=study.resources.cpus, num_gpus=study.resources.gpus)(run_variant)
    refs = {name: task.remote(y, True, study.plugin_modules) for name, y in cfg_yamls.items()}
    out = {}
    for name, ref in refs.items():
        out[name] = ray.get(ref)
        echo(f"[{name}] done (ray)")
    return out


def stage_keys(cfg: RunConfig, registry=None) -> dict[str, str]:
    """Each training stage's cache key for this config, and the evaluation keys of the variants that need no
    trained adapter (base, KV policies), computed without running anything."""
    from thinkpress.core.runner import Runner

    runner = Runner(cfg, registry=registry)
    keys = runner.executor.planned_keys(runner.plan, runner.train_problems)
    for v in runner.evaluator.variants(None, None, None, None):
        for ts in runner.test_sets:
            keys[f"eval {v.name} on {ts.name}"] = runner.evaluator.eval_key(v, ts)
    return keys


def dry_run(study: Study, study_file: Path, out: Path, echo=print) -> list[dict[str, Any]]:
    """Print the variants, their overrides and which training stages each shares with others."""
    variants = expand(study)
    reg = study_registry(study.plugin_modules)
    _echo_base_notes(study, study_file, out, reg, echo)
    rows = []
    keys: dict[str, dict[str, str]] = {}
    for name, sets in variants:
        cfg = variant_config(study, study_file, out, name, sets, reg)
        keys[name] = stage_keys(cfg, reg)
        rows.append({"name": name, "overrides": sets, "run_dir": str(cfg.run_dir()), "stages": keys[name]})
    owners: dict[str, list[str]] = {}
    for name, ks in keys.items():
        for k in ks.values():
            owners.setdefault(k, []).append(name)
    total = sum(len(k) for k in keys.values())
    unique = len(owners)
    echo(f"study {study.name!r}: {len(variants)} variants, {total} stage runs and untrained evaluations, {unique} "
         f"distinct ({total - unique} shared through the stage cache; trained models' evaluations not counted)")
    for r in rows:
        echo(f"- {r['name']}: {', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or '(base)'}")
        for label, k in r["stages"].items():
            others = [o for o in owners[k] if o != r["name"]]
            echo(f"    {label}: " + (f"shared with {len(others)} ({', '.join(others[:3])}"
                                      f"{', ...' if len(others) > 3 else ''})" if others else "own"))
        r["shared"] = {label: [o for o in owners[k] if o != r["name"]] for label, k in r["stages"].items()}
    return rows


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

METRICS = ("accuracy", "accuracy_ci", "mean_tokens", "mean_tokens_ci", "tokens_saved", "tokens_saved_ci",
           "accuracy_delta", "accuracy_delta_ci", "lost", "gained", "flip_p", "truncation_rate", "peak_kv_bytes",
           "kv_evicted", "kv_ratio", "kv_kept_mean", "token_agreement", "exact_match", "nll_full", "nll_pruned", "n")


def _predictions(run_dir: Path, test_set: str, variant: str) -> list[dict] | None:
    p = run_dir / "eval" / test_set.replace("/", "_") / variant.replace("/", "_") / "predictions.jsonl"
    return [json.loads(line) for line in p.open()] if p.exists() else None


def paired_change(ref: list[dict], other: list[dict], seed: int = 0) -> dict[str, Any]:
    """Accuracy and token change of ``other`` vs ``ref`` on their common problems, with paired intervals."""
    from thinkpress.core.stats import mcnemar_exact, paired_difference

    by_id = {p["problem_id"]: p for p in other}
    pairs = [(r, by_id[r["problem_id"]]) for r in ref if r["problem_id"] in by_id]
    if not pairs:
        return {}
    a = [float(r["correct"]) for r, _ in pairs]
    b = [float(o["correct"]) for _, o in pairs]
    ta = [float(r["n_tokens"]) for r, _ in pairs]
    tb = [float(o["n_tokens"]) for _, o in pairs]
    lost = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    gained = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    ci = paired_difference(a, b, seed=seed)
    tci = paired_difference(ta, tb, seed=seed)
    return {"n": len(pairs), "accuracy_change": sum(b) / len(b) - sum(a) / len(a),
            "accuracy_change_ci": list(ci) if ci else None, "tokens_change": sum(tb) / len(tb) - sum(ta) / len(ta),
            "tokens_change_ci": list(tci) if tci else None, "lost": lost, "gained": gained,
            "flip_p": mcnemar_exact(lost, gained),
            "significant": _excludes_zero(list(ci) if ci else None)}


def summarize_study(study: Study, variants: list[tuple[str, dict]], cfgs: dict[str, RunConfig],
                    reports: dict[str, dict], out: Path, not_run: list[str] | None = None) -> dict[str, Any]:
    """study.json's content; also writes study.md and pareto.png. ``not_run``: variants left out (``--only``)."""
    control = study.control or variants[0][0]
    if control not in cfgs:
        raise ConfigError(f"control: no variant named {control!r} (variants: {', '.join(cfgs)})")
    rows: list[dict[str, Any]] = []
    cached = total = 0
    for name, sets in variants:
        rep = reports[name]
        for s in (rep.get("stages") or {}).values():
            total += 1
            cached += bool(s.get("cached"))
        for ts in rep["test_sets"]:
            names = [v["name"] for v in ts["variants"]]
            wanted = [n for n in names if n != "base"] if study.compare == "all" else [study.compare]
            if study.compare not in names and study.compare != "all":
                wanted = ["base"]  # an evaluation-only variant: judge the model as it is
            for v in ts["variants"]:
                if v["name"] in wanted:
                    rows.append({"variant": name, "model": v["name"], "test_set": ts["name"], "overrides": sets,
                                 "run_dir": str(cfgs[name].run_dir()),
                                 **{k: v.get(k) for k in METRICS if k in v}})
    bases = {}
    for ts in reports[control]["test_sets"]:
        b = next((v for v in ts["variants"] if v["name"] == "base"), None)
        if b:
            bases[ts["name"]] = {k: b.get(k) for k in METRICS if k in b}
    for r in rows:
        ref_model = r["model"] if study.compare != "all" else None
        ref = _predictions(cfgs[control].run_dir(), r["test_set"], ref_model or r["model"])
        mine = _predictions(Path(r["run_dir"]), r["test_set"], r["model"])
        if r["variant"] != control and ref is not None and mine is not None:
            r["vs_control"] = paired_change(ref, mine)
    marginal = marginal_effects(study, variants, rows, cfgs)
    evaluations = evaluation_sharing(reports[n] for n, _ in variants)
    summary = {"study": study.name, "description": study.description, "control": control,
               "compare": study.compare, "variants": [{"name": n, "overrides": s, "run_dir": str(cfgs[n].run_dir())}
                                                      for n, s in variants],
               "base_model": bases, "rows": rows, "marginal_effects": marginal,
               "stage_runs": {"total": total, "from_cache": cached}, "evaluations": evaluations,
               "not_run": list(not_run or [])}
    atomic_write_text(out / "study.md", study_markdown(summary))
    if rows:
        pareto_plot(summary, out / "pareto.png")
    if _kv_rows(summary):
        kv_plot(summary, out / "kv.png")
    return summary


def evaluation_sharing(reports) -> dict[str, int]:
    """How many evaluations the variants' reports hold and how many distinct ones (by evaluation cache key):
    the difference ran once and was shared (e.g. the base model's, in every variant). An evaluation recorded
    without its key (reports written before keys were recorded) counts as distinct and as ``unkeyed``."""
    keys = [v.get("eval_key") for rep in reports for ts in rep["test_sets"] for v in ts["variants"]]
    known = [k for k in keys if k]
    unkeyed = len(keys) - len(known)
    return {"total": len(keys), "distinct": len(set(known)) + unkeyed, "unkeyed": unkeyed}


def marginal_effects(study: Study, variants: list[tuple[str, dict]], rows: list[dict],
                     cfgs: dict[str, RunConfig]) -> list[dict[str, Any]]:
    """Per axis and non-first value: the mean change of accuracy and tokens when only that axis moves from
    its first value, pooled over the matching variant pairs (paired by problem, bootstrap interval)."""
    out = []
    by_name = dict(variants)
    for axis in study.axes:
        first = axis.values[0]
        for value in axis.values[1:]:
            for ts in sorted({r["test_set"] for r in rows}):
                ref_all: list[dict] = []
                oth_all: list[dict] = []
                n_pairs = 0
                for name, sets in variants:
                    if sets.get(axis.key) != value:
                        continue
                    twin = {**sets, axis.key: first}
                    partner = next((n for n, s in by_name.items() if s == twin), None)
                    if partner is None:
                        continue
                    for model in {r["model"] for r in rows if r["variant"] == name and r["test_set"] == ts}:
                        a = _predictions(cfgs[partner].run_dir(), ts, model)
                        b = _predictions(cfgs[name].run_dir(), ts, model)
                        if a and b:
                            tag = f"{name}/{model}#"
                            ref_all += [{**p, "problem_id": tag + p["problem_id"]} for p in a]
                            oth_all += [{**p, "problem_id": tag + p["problem_id"]} for p in b]
                            n_pairs += 1
                if n_pairs:
                    out.append({"axis": axis.key, "from": first, "to": value, "test_set": ts, "pairs": n_pairs,
                                **paired_change(ref_all, oth_all)})
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(ci: list[float] | None, scale: float = 100, signed: bool = False) -> str:
    if not ci:
        return ""
    f = "+.1f" if signed else ".1f"
    return f" [{scale * ci[0]:{f}}, {scale * ci[1]:{f}}]"


def _excludes_zero(ci: list[float] | None) -> bool:
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


def study_markdown(s: dict[str, Any]) -> str:
    md = [f"# Study: {s['study']}", ""]
    if s["description"]:
        md += [s["description"], ""]
    st = s["stage_runs"]
    line = (f"{len(s['variants'])} variants; control `{s['control']}`; {st['total']} training stage runs, "
            f"{st['from_cache']} of them reused from the shared stage cache")
    ev = s.get("evaluations")
    if ev:
        line += (f"; {ev['total']} evaluations, {ev['distinct']} distinct ({ev['total'] - ev['distinct']} shared "
                 f"through the evaluation cache" + (f"; {ev['unkeyed']} recorded without a key, counted as distinct"
                                                     if ev["unkeyed"] else "") + ")")
    md += [line + ".", ""]
    if s.get("not_run"):
        md += [f"Not run yet (`--only`), so not in the tables: {', '.join(f'`{n}`' for n in s['not_run'])}.", ""]
    for ts in sorted({r["test_set"] for r in s["rows"]}):
        rows = sorted((r for r in s["rows"] if r["test_set"] == ts), key=lambda r: -r.get("accuracy", 0))
        base = s["base_model"].get(ts)
        md += [f"## {ts}", ""]
        if base:
            md += [f"Base model: accuracy {_pct(base['accuracy'])}%{_ci(base.get('accuracy_ci'))}, "
                   f"{base['mean_tokens']:.0f} mean tokens (n = {base.get('n')}).", ""]
        best_acc = max((r.get("accuracy", 0) for r in rows), default=None)
        best_tok = min((r.get("mean_tokens", math.inf) for r in rows), default=None)
        kv = any(r["model"] != "base" and "+" in r["model"] for r in rows)
        md += ["| variant | model | accuracy % [95% CI] | mean tokens [95% CI] | saved vs base % | "
               "vs its reference: pt [95% CI], lost / gained (p) | "
               + ("KV kept % of full, peak / mean | NLL full -> pruned | token agreement | " if kv else "")
               + "vs control: accuracy pt [95% CI] | lost / gained vs control (p) |",
               "|---|---|---|---|---|---|" + ("---|---|---|" if kv else "") + "---|---|"]
        for r in rows:
            acc = f"{_pct(r.get('accuracy'))}{_ci(r.get('accuracy_ci'))}"
            tok = f"{r.get('mean_tokens', 0):.0f}{_ci(r.get('mean_tokens_ci'), scale=1)}"
            if r.get("accuracy") == best_acc:
                acc = f"**{acc}**"
            if r.get("mean_tokens") == best_tok:
                tok = f"**{tok}**"
            vb = r.get("vs_control")
            if r["variant"] == s["control"]:
                change, flips = "(control)", ""
            elif vb:
                words = "" if vb["significant"] else " no significant change"
                change = f"{100 * vb['accuracy_change']:+.1f}{_ci(vb['accuracy_change_ci'], signed=True)}{words}"
                flips = f"{vb['lost']} / {vb['gained']} ({vb['flip_p']:.2g})"
            else:
                change, flips = "-", ""
            own = "-"
            if r.get("accuracy_delta") is not None:
                words = "" if _excludes_zero(r.get("accuracy_delta_ci")) else " no significant change"
                own = (f"{100 * r['accuracy_delta']:+.1f}{_ci(r.get('accuracy_delta_ci'), signed=True)}{words}, "
                       f"{r.get('lost')} / {r.get('gained')} ({r.get('flip_p', 1):.2g})")
            kv_col = ""
            if kv:
                frac = r.get("kv_ratio")
                kv_col = (f"{_pct(frac)} / {_pct(r.get('kv_kept_mean'))} | " if frac is not None else "- | ")
                nll = (f"{r['nll_full']:.3f} -> {r['nll_pruned']:.3f}" if r.get("nll_pruned") is not None
                       and r.get("nll_full") is not None else "-")
                agree = f"{_pct(r['token_agreement'])}%" if r.get("token_agreement") is not None else "-"
                kv_col += f"{nll} | {agree} | "
            md.append(f"| {r['variant']} | {r['model']} | {acc} | {tok} | {_pct(r.get('tokens_saved'))}"
                      f"{_ci(r.get('tokens_saved_ci'))} | {own} | {kv_col}{change} | {flips} |")
        md.append("")
    if s["marginal_effects"]:
        md += ["## Marginal effects", "", "Mean change when one axis moves from its first value, the other axes "
               "held equal, pooled over the matching pairs of variants (paired by problem; 95% bootstrap interval).",
               "", "| axis | from -> to | test set | pairs | accuracy pt [95% CI] | tokens [95% CI] |",
               "|---|---|---|---|---|---|"]
        for m in s["marginal_effects"]:
            words = "" if m.get("significant") else " (no significant change)"
            md.append(f"| {m['axis']} | {_short(m['from'])} -> {_short(m['to'])} | {m['test_set']} | {m['pairs']} | "
                      f"{100 * m['accuracy_change']:+.1f}{_ci(m['accuracy_change_ci'], signed=True)}{words} | "
                      f"{m['tokens_change']:+.0f}{_ci(m['tokens_change_ci'], scale=1, signed=True)} |")
        md.append("")
    md += ["![accuracy vs. mean tokens](pareto.png)", ""]
    if _kv_rows(s):
        md += ["![accuracy and NLL vs. the KV cache kept](kv.png)", ""]
    return "\n".join(md)


def _kv_rows(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of KV-policy models (``base+<policy>@<param>=<value>``) that know their share of the full cache."""
    return [r for r in s["rows"] if "+" in r["model"] and "@" in r["model"] and r.get("kv_ratio")]


def kv_plot(s: dict[str, Any], path: Path) -> None:
    """Per test set: accuracy (95% error bars) and the NLL of the full cache's outputs under the pruned cache,
    against the peak KV cache kept (share of the full cache's), one line per policy through its budgets; the
    full cache is the black square at 100%."""
    from thinkpress.core.plots import figure

    sets = sorted({r["test_set"] for r in _kv_rows(s)})
    with figure(path, 2 * len(sets), panel=(6, 4.4)) as axes:
        for i, ts in enumerate(sets):
            acc_ax, nll_ax = axes[2 * i], axes[2 * i + 1]
            by_policy: dict[str, list[dict]] = {}
            for r in _kv_rows(s):
                if r["test_set"] == ts:
                    by_policy.setdefault(r["model"].split("+", 1)[1].split("@")[0], []).append(r)
            for policy, rs in sorted(by_policy.items()):
                rs = sorted(rs, key=lambda r: r["kv_ratio"])
                xs = [100 * r["kv_ratio"] for r in rs]
                ys = [100 * r["accuracy"] for r in rs]
                cis = [r.get("accuracy_ci") or [r["accuracy"]] * 2 for r in rs]
                line = acc_ax.errorbar(xs, ys, yerr=[[y - 100 * c[0] for y, c in zip(ys, cis, strict=True)],
                                                     [100 * c[1] - y for y, c in zip(ys, cis, strict=True)]],
                                       fmt="o-", capsize=3, alpha=0.8, label=policy)
                nll = [(x, r["nll_pruned"]) for x, r in zip(xs, rs, strict=True) if r.get("nll_pruned") is not None]
                if nll:
                    nll_ax.plot(*zip(*nll, strict=True), "o-", color=line[0].get_color(), label=policy)
            base = s["base_model"].get(ts)
            if base:
                acc_ax.plot(100, 100 * base["accuracy"], "ks", label="full cache")
            full_nll = [r["nll_full"] for r in _kv_rows(s) if r["test_set"] == ts and r.get("nll_full") is not None]
            if full_nll:
                nll_ax.plot(100, full_nll[0], "ks", label="full cache")
            else:
                nll_ax.text(0.5, 0.5, "no full-cache answer ended with EOS:\nno NLL to compare", ha="center",
                            va="center", transform=nll_ax.transAxes)
            for ax, ylabel in ((acc_ax, "accuracy (%)"), (nll_ax, "NLL of the full cache's outputs")):
                ax.set_xlabel("peak KV cache kept (% of the full cache)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{s['study']}: {ts}")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)


def pareto_plot(s: dict[str, Any], path: Path) -> None:
    """Accuracy vs. mean tokens with 95% error bars per test set; the Pareto front (fewer tokens, higher
    accuracy) is joined by a line; the base model is the black square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["test_set"] for r in s["rows"]})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.6), squeeze=False)
    for ax, ts in zip(axes[0], sets, strict=True):
        rows = [r for r in s["rows"] if r["test_set"] == ts]
        for r in rows:
            ci, tci = r.get("accuracy_ci") or [r["accuracy"]] * 2, r.get("mean_tokens_ci") or [r["mean_tokens"]] * 2
            ax.errorbar(r["mean_tokens"], 100 * r["accuracy"], yerr=[[100 * (r["accuracy"] - ci[0])],
                                                                     [100 * (ci[1] - r["accuracy"])]],
                        xerr=[[r["mean_tokens"] - tci[0]], [tci[1] - r["mean_tokens"]]], fmt="o", capsize=3,
                        alpha=0.8)
            label = r["variant"] if s["compare"] != "all" else f"{r['variant']}:{r['model']}"
            ax.annotate(label, (r["mean_tokens"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        front, best = [], -1.0
        for r in sorted(rows, key=lambda r: (r["mean_tokens"], -r["accuracy"])):
            if r["accuracy"] > best:
                front.append(r)
                best = r["accuracy"]
        ax.plot([r["mean_tokens"] for r in front], [100 * r["accuracy"] for r in front], "--", color="gray", lw=1)
        base = s["base_model"].get(ts)
        if base:
            ax.plot(base["mean_tokens"], 100 * base["accuracy"], "ks", label="base model")
            ax.legend(fontsize=8)
        ax.set_xlabel("mean output tokens")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{s['study']}: {ts}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
