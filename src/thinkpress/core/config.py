"""Run configuration: one pydantic ``RunConfig``, loaded from presets, YAML, CLI flags and ``--set``.

Precedence, lowest first: preset (``default`` unless ``--preset`` names another; the plugins declare
the presets' settings through the ``register_presets`` hook) < YAML file
(``--config``) < CLI flags (``--model``, ``--data``, ``--plugins``, ``--out``) < ``--set key.path=value``
(values parsed as YAML scalars, so ``--set seed=3`` is an int and ``--set plugins=[a,b]`` a list).

Every model forbids unknown keys; every error names the key path (``train_data.limit: ...``) and is
raised before any work starts. Component configs (``components.<component name>.<key>``) are
validated against the selected components' ``Config`` classes by the pipeline, also before work.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from thinkpress.core.errors import ConfigError

if TYPE_CHECKING:
    from thinkpress.core.plugins import Registry

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSpec(Strict):
    name: str = Field(default="arith", description="Registered dataset name (arith, gsm8k, math500, jsonl, ...)")
    split: str = Field(default="train", description="Split to load (train or test)")
    path: str | None = Field(default=None, description="Local JSONL file or directory (<split>.jsonl) to read")
    limit: int | None = Field(default=None, ge=1, description="Use only the first N problems (after seeded shuffle)")
    shuffle: bool = Field(default=False, description="Shuffle (seeded) before applying limit")
    difficulty: list[int] | None = Field(default=None, description="Keep only problems of these difficulty levels")
    skip_invalid: bool = Field(default=False, description="Skip (and count) malformed rows instead of failing")
    label: str | None = Field(default=None, description="Name of this set in the report (default: the dataset "
                              "name; needed only to tell apart two sets of the same dataset)")

    def display_name(self) -> str:
        return self.label or self.name


class GenerationConfig(Strict):
    max_new_tokens: int = Field(default=384, ge=1, description="Maximum new tokens per completion")
    batch_size: int = Field(default=16, ge=1, description="Sequences decoded together")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold")
    stop: list[str] = Field(default_factory=list, description="Stop strings (in addition to EOS)")


class EvalConfig(Strict):
    enabled: bool = Field(default=True, description="Evaluate after training")
    base: bool = Field(default=True, description="Also evaluate the base model (variant 'base')")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding for evaluation")
    kv_agreement: bool = Field(default=True, description="KV-policy variants: token agreement with, and teacher-forced "
                               "NLL of, the full-cache outputs that ended with EOS (one extra decode pass each)")
    adapter: str | None = Field(default=None, description="A saved LoRA adapter directory to evaluate as variant "
                                "'adapter' (unmerged, on top of the model; `core eval --adapter DIR`)")
    every_round: bool = Field(default=False, description="With rounds > 1: also evaluate each earlier round's "
                              "adapter (variants trained@round1, ...)")
    bootstrap: int = Field(default=2000, ge=100, description="Bootstrap resamples for the paired token-savings and "
                           "accuracy-difference intervals (seeded: the same predictions give the same interval)")


class StageChoice(Strict):
    sampler: str | None = Field(default=None, description="Sampler component name (default: from --plugins)")
    selector: str | None = Field(default=None, description="Selector component name")
    trainer: str | None = Field(default=None, description="Trainer component name")
    refiners: list[str] | None = Field(default=None, description="Refiner chain (default: selected plugins')")
    pruners: list[str] | None = Field(default=None, description="Pruners (trace and KV) (default: selected plugins')")


class StageFallback(Strict):
    sampler: str | None = Field(default=None, description="Sampler that runs when no selected plugin provides one "
                                "(the presets set it)")
    selector: str | None = Field(default=None, description="Selector that runs when no selected plugin provides one")
    trainer: str | None = Field(default=None, description="Trainer that runs when no selected plugin provides one")


class LaunchConfig(Strict):
    """How training stages run: in this process, or as N processes under ``accelerate launch``.

    Generation stages keep their own parallelism (the engine's: vLLM tensor/data parallel); only the
    trainer stage is launched. See docs/training.md.
    """

    launcher: Literal["none", "accelerate"] = Field(
        default="none", description="none: train in this process; accelerate: `accelerate launch` the trainer stage "
        "as num_processes processes (DDP; DeepSpeed or FSDP through config_file)")
    num_processes: int = Field(default=1, ge=1, description="Training processes (one per GPU; on CPU, gloo)")
    config_file: str | None = Field(default=None, description="accelerate config file (e.g. configs/accelerate/"
                                    "deepspeed-zero3.yaml); its num_processes is overridden by num_processes")
    main_process_port: int | None = Field(default=None, ge=1, le=65535, description="Rendezvous port (default: a "
                                          "free one)")

    def identity(self) -> list[Any]:
        """What a trainer stage's cache key adds for this launch: nothing for one process in this process (so
        such keys are unchanged), else the launcher, the process count and the config file's content."""
        if self.launcher == "none":
            return []
        text = Path(self.config_file).read_text() if self.config_file else None
        return ["launch", self.launcher, self.num_processes, text]

    @model_validator(mode="after")
    def _check(self) -> LaunchConfig:
        if self.launcher == "none" and self.num_processes > 1:
            raise ValueError("num_processes > 1 needs launcher: accelerate")
        if self.config_file and not Path(self.config_file).is_file():
            raise ValueError(f"config_file: {self.config_file!r} is not a file")
        return self


class RunConfig(Strict):
    name: str | None = Field(default=None, description="Run name (default: derived from plugins and config hash)")
    preset: str | None = Field(default=None, description="Preset the config started from (plugins declare presets)")
    model: str = Field(default="qwen2.5-coder-0.5b", description="Embedded model name, local directory or Hub id")
    engine: str = Field(default="auto", description="Generation backend: hf, vllm, or auto (vllm when it is "
                        "installed and importable here, else hf; the resolved name is what the run saves)")
    engine_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-engine options keyed by engine name (e.g. engine_options.vllm."
        "tensor_parallel_size), checked by the engine before any work")
    fallback_engine: str | None = Field(default="hf", description="Engine for the stages and evaluations that need "
                                        "a capability `engine` lacks (e.g. scoring, KV policies); None: refuse")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Model dtype; auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16, "
        "AMX), else float32 (emulated bf16 is ~100x slower); the resolved dtype is what the run saves")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    trust_remote_code: bool = Field(default=False, description="Allow model repos to run their own code")
    system_prompt: str | None = Field(default=DEFAULT_SYSTEM_PROMPT, description="System message (None: none)")
    train_data: DataSpec = Field(default_factory=lambda: DataSpec(split="train"), description="Training problems")
    test_data: list[DataSpec] = Field(
        default_factory=lambda: [DataSpec(split="test")],
        description="Evaluation sets: one set or a list of sets, each evaluated for every variant with its own table "
                    "in the report; the first is the primary set (report.json's `dataset` and `variants`)")
    plugins: list[str] = Field(default_factory=list, description="Plugins whose components run (default: the "
                               "preset's)")
    stages: StageChoice = Field(default_factory=StageChoice, description="Explicit component choice per stage")
    fallback: StageFallback = Field(default_factory=StageFallback, description="Components for the stages that no "
                                    "selected plugin provides")
    train: bool | None = Field(default=None, description="Run the training stages (None: when a selected plugin "
                               "provides a training stage; KV pruners alone make an evaluation run)")
    rounds: int = Field(default=1, ge=1, description="Self-improvement rounds: round r > 1 samples, selects, refines "
                        "and trains again with round r-1's adapter as the policy (the trainer continues that adapter)")
    components: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-component config, keyed by component name"
    )
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="How the trainer stage runs: in this "
                                 "process or under `accelerate launch` (docs/training.md)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings")
    seed: int = Field(default=0, description="Global seed (data generation, sampling, training)")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's choice, "
                                "recorded in the manifest; results are reproducible for a fixed thread count)")
    out: str | None = Field(default=None, description="Run directory (default: runs/<name>)")
    cache_dir: str | None = Field(default=None, description="Stage cache shared by runs (default: <out>/../.cache)")
    sample_cache: bool = Field(default=True, description="Reuse earlier runs' completions of the same sampling "
                               "request per problem (model, adapter, engine, dtype, prompt, settings, seed), kept "
                               "in <cache_dir>/samples; false: decode every problem of a new sampler stage")

    @model_validator(mode="after")
    def _resolve_dtype(self) -> RunConfig:
        if self.dtype == "auto":  # resolved here, so the saved config and every cache key hold the real dtype
            from thinkpress.core.models import resolve_dtype

            self.dtype = resolve_dtype(self.dtype, self.device)
        return self

    @field_validator("test_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict | DataSpec) else v

    @field_validator("test_data")
    @classmethod
    def _distinct_names(cls, v: list[DataSpec]) -> list[DataSpec]:
        if not v:
            raise ValueError("at least one test set is needed (set eval.enabled=false to skip evaluation)")
        names = [d.display_name() for d in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two test sets are named {dup[0]!r}: give them distinct `label`s")
        return v

    def config_hash(self) -> str:
        """Hash of everything that affects results (not where they are written)."""
        d = self.model_dump(mode="json", exclude={"out", "cache_dir", "name", "sample_cache"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = self.name or f"{'-'.join(self.plugins) or 'eval'}-{self.config_hash()[:8]}"
        return Path("runs") / name

    def stage_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.run_dir().parent / ".cache"


SET_IDENTITY = ("name", "path", "split", "label")
"""``--set test_data.<key>`` for these keys names one test set: a preset's list becomes its first entry
with that value. Any other key (``limit``, ``shuffle`` ...) applies to every test set."""


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, recursively for mappings.

    A mapping over a list of mappings (one test set over a preset's list of sets) replaces the list
    with that one set, merged over the list's first entry (so ``--data D`` keeps the preset's limit).
    """
    out = copy.deepcopy(base)
    for k, v in over.items():
        cur = out.get(k)
        if isinstance(v, dict) and isinstance(cur, list) and cur and all(isinstance(x, dict) for x in cur):
            cur = cur[0]
        if isinstance(v, dict) and isinstance(cur, dict):
            out[k] = deep_merge(cur, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"malformed YAML in {where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def parse_set(expr: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is a YAML scalar/list/mapping."""
    if "=" not in expr:
        raise ConfigError(f"--set expects key.path=value, got {expr!r}")
    key, raw = expr.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: invalid key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            value = float(value) if any(c.isdigit() for c in value) else value
        except ValueError:
            pass
    return key.split("."), value


def apply_set(d: dict | list, path: list[str], value: Any) -> None:
    """Set ``path`` to ``value``. In a list, a number picks an entry (``test_data.1.limit``) and any other
    key applies to every entry (``test_data.limit=100`` limits every test set)."""
    cur: Any = d
    for i, part in enumerate(path[:-1]):
        if isinstance(cur, list):
            if part.isdigit():
                if int(part) >= len(cur):
                    raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i])} has {len(cur)} entries")
                cur = cur[int(part)]
                continue
            for item in cur:
                apply_set(item, path[i:], value)
            return
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict | list):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
        cur = nxt
    last = path[-1]
    if isinstance(cur, list):
        if last.isdigit() and int(last) < len(cur):
            cur[int(last)] = value
            return
        for item in cur:
            if not isinstance(item, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:-1])} is a list of values")
            item[last] = value
        return
    cur[last] = value


def _dropped_note(data: dict, path: list[str], value: dict) -> str | None:
    """What ``--set path={...}`` drops from the mapping already at ``path`` (None when nothing)."""
    cur: Any = data
    for part in path:
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    if not isinstance(cur, dict):
        return None
    dropped = {k: v for k, v in cur.items() if k not in value}
    if not dropped:
        return None
    key = ".".join(path)
    return (f"{key}={{...}} replaces the whole mapping at {key}, dropping "
            f"{', '.join(f'{k}={v!r}' for k, v in dropped.items())}; set {key}.KEY=VALUE one key at a time "
            "to keep the others")


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
            continue
        got = "" if isinstance(err.get("input"), dict) else f" (got {err['input']!r})"
        lines.append(f"{loc or '<root>'}: {err['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict | None = None,
    sets: list[str] | None = None,
    registry: Registry | None = None,
    notes: list[str] | None = None,
) -> RunConfig:
    """Resolve a RunConfig: the preset (as the plugins declare it), the YAML file, flags, ``--set``.

    ``--set key={...}`` replaces the whole mapping at ``key`` (``key.a=1`` changes one leaf); when that drops
    values the preset or the file had there, a line naming them is appended to ``notes`` (if given), for the
    caller to show: the replace is what was asked, but rarely what was meant.
    """
    file_data = load_yaml(config_file) if config_file else {}
    preset = preset or file_data.get("preset") or "default"
    if registry is None:
        from thinkpress.core.plugins import get_registry

        registry = get_registry()

    dropped_by_sets: list[str] = []

    def layered(base: dict) -> dict:
        data = deep_merge(base, file_data)
        data["preset"] = preset
        data = deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
        dropped_by_sets.clear()
        for expr in sets or []:
            path, value = parse_set(expr)
            if isinstance(value, dict) and (note := _dropped_note(data, path, value)):
                dropped_by_sets.append(note)
            sets_ = data.get(path[0])
            if path[0] == "test_data" and len(path) == 2 and path[1] in SET_IDENTITY and isinstance(sets_, list):
                data["test_data"] = sets_[:1]  # naming a dataset picks one set, like --data
            apply_set(data, path, value)
        return data

    # The selected plugins (known only after layering) may add their own preset settings.
    unconditional = registry.preset_settings(preset, [])
    data = layered(unconditional)
    plugins = data.get("plugins") if isinstance(data.get("plugins"), list) else []
    with_selected = registry.preset_settings(preset, [p for p in plugins if isinstance(p, str)])
    if with_selected != unconditional:
        data = layered(with_selected)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    if notes is not None:
        notes.extend(dropped_by_sets)
    if cfg.engine == "auto":
        cfg.engine = registry.auto_engine(cfg)

    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
