"""The trainer stage as several processes: ``core run --launcher accelerate --num-processes N``.

The ``core run`` process (the parent) writes the stage's input and a spec into ``<stage dir>/launch/``
and starts ``accelerate launch [--config_file F] --num_processes N -m thinkpress.core.launch SPEC``.
Every process rebuilds the registry, the config and the trainer from the spec and runs the stage
through the same ``run_stage`` hook as in-process training. The shared LoRA loop
(:func:`thinkpress.toolkit.lora.train_lora`) splits each global micro-batch across the processes,
all-reduces the gradients and lets only the main process write (adapter, checkpoints, result, stats).
The parent then reads the result and the stats, so the run store, the cache and the report see one
stage, exactly as for in-process training. Sampling and evaluation stay in the parent, with the
engine's own parallelism (vLLM tensor/data parallel).

``THINKPRESS_WRITE_AUDIT=<dir>`` (a diagnostic, used by the two-process test) makes each process
record every path it opens for writing, creates, renames or removes under the stage cache and the run
directory, in ``<dir>/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinkpress.core.data import Example, PreferencePair, TrainingSet, TrainResult, read_jsonl, write_jsonl
from thinkpress.core.errors import PluginError, TrainingError
from thinkpress.core.files import atomic_write_json

if TYPE_CHECKING:
    from thinkpress.core.config import RunConfig
    from thinkpress.core.context import StageContext
    from thinkpress.core.planning import Planned
    from thinkpress.core.plugins import Registry

LAUNCH_DIR = "launch"
AUDIT_ENV = "THINKPRESS_WRITE_AUDIT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plugin_modules(reg: Registry) -> dict[str, str]:
    """``{plugin: module}`` for the plugins registered in code (not by entry point or as built-ins), which the
    launched processes import by name; a plugin object that is not an importable module is refused."""
    import importlib

    out = {}
    for name, info in reg.plugins.items():
        if info.entry_point or info.builtin or info.broken:
            continue
        obj = reg.pm.get_plugin(name)
        mod = getattr(obj, "__name__", None)
        try:
            ok = mod is not None and importlib.import_module(mod) is obj
        except ImportError:
            ok = False
        if not ok:
            raise PluginError(f"plugin {name!r} was registered in code as an object that is not an importable module; "
                              "launched training processes cannot rebuild it. Install it with an entry point "
                              "(docs/plugin_hooks.md) or register a module.")
        out[name] = mod
    return out


def launch_command(cfg: RunConfig, spec: Path) -> list[str]:
    """The ``accelerate launch`` command line for the trainer stage.

    Without a config file, several processes use accelerate's ``--multi_gpu`` launcher (torchrun): on a
    machine without GPUs its processes train on the CPU and talk over gloo (its ``--cpu`` flag would
    start one process only, multi-CPU there meaning MPI). A config file (DeepSpeed, FSDP) decides the
    distributed type; ``num_processes`` overrides its count.
    """
    lc = cfg.launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if lc.config_file:
        cmd += ["--config_file", lc.config_file]
    elif lc.num_processes > 1:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(lc.num_processes), "--num_machines", "1",
            "--main_process_port", str(lc.main_process_port or _free_port())]
    return [*cmd, "-m", "thinkpress.core.launch", str(spec)]


def launch_trainer(cfg: RunConfig, reg: Registry, planned: Planned, data: TrainingSet,
                   ctx: StageContext) -> TrainResult:
    """Run the trainer stage ``planned`` on ``data`` under ``accelerate launch``; its result, and its stats
    in ``ctx.stats``."""
    d = ctx.workdir / LAUNCH_DIR
    d.mkdir(parents=True, exist_ok=True)
    for f in ("result.json", "stats.json"):  # from an earlier, killed launch
        (d / f).unlink(missing_ok=True)
    write_jsonl(d / "examples.jsonl", data.examples)
    write_jsonl(d / "pairs.jsonl", data.pairs)
    spec = {"config": cfg.model_dump(mode="json"), "component": planned.name,
            "component_config": planned.instance.config.model_dump(mode="json"), "workdir": str(ctx.workdir),
            "key": ctx.key, "engine": ctx.engine_name, "adapter": ctx.adapter, "plugin_modules": plugin_modules(reg),
            "quiet": ctx.ui.quiet}
    atomic_write_json(d / "spec.json", spec)
    cmd = launch_command(cfg, d / "spec.json")
    ctx.log(f"launching {cfg.launch.num_processes} training process(es): {' '.join(cmd[1:])}")
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if not ctx.ui.quiet:
                sys.stderr.write(line)
        rc = proc.wait()
    if rc != 0 or not (d / "result.json").exists():
        raise TrainingError(f"the launched trainer {planned.name!r} failed (exit code {rc}); its last output:\n"
                            + "\n".join(tail))
    ctx.stats.update(json.loads((d / "stats.json").read_text()))
    return TrainResult.model_validate(json.loads((d / "result.json").read_text()))


def _install_write_audit(rank: int, roots: list[Path]) -> None:
    """Record this process's writes under ``roots`` (see the module docstring)."""
    import atexit

    out_dir = Path(os.environ[AUDIT_ENV])
    prefixes = [str(r.resolve()) for r in roots]
    seen: list[str] = []

    def under(p: Any) -> str | None:
        try:
            s = os.path.abspath(os.fsdecode(p))
        except TypeError:
            return None
        return s if any(s.startswith(x) for x in prefixes) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open" and len(args) >= 2 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
            p = under(args[0])
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            p = under(args[0])
        else:
            return
        if p is not None:
            seen.append(f"{event} {p}")

    sys.addaudithook(hook)
    atexit.register(lambda: (out_dir / f"rank{rank}.json").write_text(json.dumps(seen)))


def worker(spec_path: str) -> None:
    """One launched process: rebuild the stage from the spec and run it (only the main process writes)."""
    import importlib

    import torch
    from accelerate import PartialState

    from thinkpress.core.config import RunConfig
    from thinkpress.core.context import UI, RunState, StageContext
    from thinkpress.core.plugins import build_registry
    from thinkpress.core.store import RunStore

    spec = json.loads(Path(spec_path).read_text())
    d = Path(spec_path).parent
    cfg = RunConfig.model_validate(spec["config"])
    state = PartialState(cpu=not torch.cuda.is_available())
    if os.environ.get(AUDIT_ENV):
        _install_write_audit(state.process_index, [Path(spec["workdir"]), cfg.run_dir()])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mods = {name: importlib.import_module(m) for name, m in spec["plugin_modules"].items()}
    reg = build_registry(extra_plugins=mods)
    entry = reg.component("trainer", spec["component"])
    comp = entry.cls(entry.cls.Config.model_validate(spec["component_config"]))
    run = RunState(cfg, reg, RunStore(cfg.run_dir(), cfg.stage_cache_dir()),
                   UI(quiet=spec["quiet"] or not state.is_main_process))
    ctx = StageContext(run=run, stage="trainer", component=spec["component"], workdir=Path(spec["workdir"]),
                       key=spec["key"], engine_name=spec["engine"], adapter=spec["adapter"])
    data = TrainingSet(examples=read_jsonl(d / "examples.jsonl", Example),
                       pairs=read_jsonl(d / "pairs.jsonl", PreferencePair))
    result = reg.pm.hook.run_stage(stage="trainer", component=comp, inputs={"data": data}, ctx=ctx)
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_json(d / "stats.json", ctx.stats)
        atomic_write_json(d / "result.json", result.model_dump(mode="json"))


if __name__ == "__main__":
    worker(sys.argv[1])
