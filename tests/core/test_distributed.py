"""Training under a launcher: two CPU processes (gloo) train like one, only rank 0 writes, a killed stage resumes."""

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from thinkpress.core.config import LaunchConfig, build_config
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Example, PreferencePair, TrainingSet
from thinkpress.core.errors import ConfigError, PluginError, TrainingError
from thinkpress.core.launch import AUDIT_ENV, launch_command, launch_trainer, plugin_modules
from thinkpress.core.planning import resolve_plan
from thinkpress.core.plugins import build_registry, get_registry
from thinkpress.core.store import RunStore
from thinkpress.toolkit import lora

ROOT = Path(__file__).resolve().parents[2]


def _examples(n: int) -> list[Example]:
    return [Example(id=str(i), problem_id=str(i), prompt=f"Q: what is {i}+{i}?",
                    completion=f" {i}+{i} = {2 * i}. The answer is {2 * i}.") for i in range(n)]


def _setup(tmp_path: Path, model: str, *sets: str, work: str = "work", plugin: str = "baseline"):
    cfg = build_config(preset="smoke", sets=[f"model={model}", f"out={tmp_path / 'run'}", "dtype=float32",
                                             f"plugins=[{plugin}]", *sets])
    reg = get_registry()
    plan = resolve_plan(cfg, reg)
    state = RunState(cfg, reg, RunStore(tmp_path / "run", tmp_path / "cache"), UI(quiet=True))
    ctx = StageContext(run=state, stage="trainer", component=plan.trainer.name, workdir=tmp_path / work, key=work)
    return cfg, reg, plan.trainer, ctx


def _delta_w(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Each adapted module's weight change B @ A (what the adapter does to the model)."""
    w = load_file(adapter_dir / "adapter_model.safetensors")
    return {k: w[k.replace("lora_A", "lora_B")] @ w[k] for k in w if "lora_A" in k}


def test_launch_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"launch.*num_processes > 1 needs launcher: accelerate"):
        build_config(preset="smoke", sets=["launch.num_processes=2"])
    with pytest.raises(ConfigError, match=r"launch.*config_file.*not a file"):
        build_config(preset="smoke", sets=["launch.launcher=accelerate", "launch.config_file=/nonexistent.yaml"])


def test_launch_enters_only_the_trainer_key_and_only_when_used(tmp_path):
    assert LaunchConfig().identity() == []  # one in-process trainer: keys as before the launcher existed
    two = LaunchConfig(launcher="accelerate", num_processes=2).identity()
    assert two and two != LaunchConfig(launcher="accelerate", num_processes=4).identity()
    f = tmp_path / "ds.yaml"
    f.write_text("distributed_type: DEEPSPEED\n")
    a = LaunchConfig(launcher="accelerate", num_processes=2, config_file=str(f)).identity()
    f.write_text("distributed_type: FSDP\n")
    assert a != LaunchConfig(launcher="accelerate", num_processes=2, config_file=str(f)).identity()

    from thinkpress.core.execution import StageExecutor

    keys = {}
    for n in (1, 2):
        sets = ["plugins=[baseline]"] + (["launch.launcher=accelerate", f"launch.num_processes={n}"] if n > 1 else [])
        cfg = build_config(preset="smoke", sets=sets)
        plan = resolve_plan(cfg, get_registry())
        ex = StageExecutor(cfg, get_registry(), None, None, None, "m", plan)
        keys[n] = {s: ex.stage_key(s, p, ["in"]) for s, p in (("sampler", plan.sampler), ("trainer", plan.trainer))}
    assert keys[1]["sampler"] == keys[2]["sampler"] and keys[1]["trainer"] != keys[2]["trainer"]


def test_launch_command_cpu_processes_use_the_torchrun_launcher(tmp_path):
    cfg = build_config(preset="smoke", sets=["launch.launcher=accelerate", "launch.num_processes=2",
                                             "launch.main_process_port=29555"])
    cmd = launch_command(cfg, tmp_path / "spec.json")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" not in cmd  # --cpu would start one process
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "29555"
    assert "--multi_gpu" in cmd and cmd[-3:] == ["-m", "thinkpress.core.launch", str(tmp_path / "spec.json")]
    f = ROOT / "configs" / "accelerate" / "deepspeed-zero3.yaml"
    cfg = build_config(preset="smoke", sets=["launch.launcher=accelerate", "launch.num_processes=8",
                                             f"launch.config_file={f}"])
    cmd = launch_command(cfg, tmp_path / "spec.json")
    assert cmd[cmd.index("--config_file") + 1] == str(f) and "--multi_gpu" not in cmd


@pytest.mark.parametrize("name", ["ddp-8gpu", "deepspeed-zero3", "fsdp-8gpu"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    kinds = {"ddp-8gpu": "MULTI_GPU", "deepspeed-zero3": "DEEPSPEED", "fsdp-8gpu": "FSDP"}
    assert c.num_processes == 8 and c.distributed_type.value == kinds[name]


def test_plugins_registered_as_objects_cannot_be_launched(monkeypatch):
    reg = build_registry(load_entry_points=False, extra_plugins={"obj": SimpleNamespace(__name__="not.a.module")})
    with pytest.raises(PluginError, match="obj.*not an importable module"):
        plugin_modules(reg)
    mod = types.ModuleType("tp_launch_double")  # an importable module: the launched processes import it by name
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    assert plugin_modules(build_registry(load_entry_points=False, extra_plugins={"m": mod})) == {"m": mod.__name__}


def test_cli_flags_reach_the_launch_config():
    from conftest import run_cli

    r = run_cli(["run", "--plugins", "baseline", "--preset", "smoke", "--num-processes", "2",
                 "--set", "launch.launcher=none"])
    assert r.returncode != 0 and "num_processes > 1 needs launcher" in r.stderr


@pytest.mark.slow
def test_two_cpu_processes_train_like_one_and_only_rank_0_writes(tmp_path, smollm_path, monkeypatch):
    common = ["components.lora-sft.batch_size=4", "components.lora-sft.grad_accum=1", "components.lora-sft.epochs=1",
              "components.lora-sft.lr=1e-3", "components.lora-sft.dropout=0.0"]
    data = TrainingSet(examples=_examples(8))
    _, _, planned, ctx1 = _setup(tmp_path, "smollm2-135m", *common, work="one")
    one = planned.instance.train(data, ctx1)

    audit = tmp_path / "audit"
    audit.mkdir()
    monkeypatch.setenv(AUDIT_ENV, str(audit))
    cfg, reg, planned, ctx2 = _setup(tmp_path, "smollm2-135m", *common, "launch.launcher=accelerate",
                                     "launch.num_processes=2", work="two")
    two = launch_trainer(cfg, reg, planned, data, ctx2)

    # the global batch of 4 was split 2 + 2: each process saw half of the 8 examples, none saw the same one
    assert ctx2.stats["processes"] == 2 and ctx2.stats["steps"] == ctx1.stats["steps"] == 2
    assert ctx2.stats["items_per_process"] == [4, 4] and ctx2.stats["items_seen_by_several_processes"] == 0
    assert ctx2.stats["loss_first"] == pytest.approx(ctx1.stats["loss_first"], abs=1e-5)
    # only rank 0 wrote under the stage and run directories
    rank0 = json.loads((audit / "rank0.json").read_text())
    assert json.loads((audit / "rank1.json").read_text()) == []
    assert any("adapter" in w for w in rank0)
    # the same update: each module's B @ A within 1e-3 relative (fp32; the halves are summed in another order;
    # measured 3e-5), and training moved the adapter (B starts at 0)
    d1, d2 = _delta_w(Path(one.adapter_path)), _delta_w(Path(two.adapter_path))
    assert d1.keys() == d2.keys() and all(d1[k].norm() > 0 for k in d1)
    worst = max(((d1[k] - d2[k]).norm() / d1[k].norm()).item() for k in d1)
    assert worst < 1e-3


def test_dpo_l_with_two_processes_shards_the_reference_and_the_pairs(tmp_path, tiny_llama, monkeypatch):
    from thinkpress.plugins.tokensqueeze.dpo import REFERENCE_FILE

    common = ["components.dpo-l.batch_size=4", "components.dpo-l.grad_accum=1", "components.dpo-l.epochs=1",
              "components.dpo-l.lr=1e-3", "components.dpo-l.dropout=0.0"]
    pairs = [PreferencePair(id=str(i), problem_id=str(i), prompt=f"Q: what is {i}+{i}?", chosen=f" {2 * i}.",
                            rejected=f" {i} plus {i} makes {2 * i}, so the answer is {2 * i}.") for i in range(8)]
    _, _, planned, ctx1 = _setup(tmp_path, tiny_llama, *common, work="one", plugin="tokensqueeze")
    assert planned.name == "dpo-l"
    one = planned.instance.train(TrainingSet(pairs=pairs), ctx1)
    audit = tmp_path / "audit"
    audit.mkdir()
    monkeypatch.setenv(AUDIT_ENV, str(audit))
    cfg, reg, planned, ctx2 = _setup(tmp_path, tiny_llama, *common, "launch.launcher=accelerate",
                                     "launch.num_processes=2", work="two", plugin="tokensqueeze")
    two = launch_trainer(cfg, reg, planned, TrainingSet(pairs=pairs), ctx2)

    # the reference log-probs: each process computed one batch of 4 pairs, the sum equals one process's (measured
    # equal); the update within 1e-3 relative (measured 3.3e-5)
    ref1, ref2 = torch.load(tmp_path / "one" / REFERENCE_FILE), torch.load(tmp_path / "two" / REFERENCE_FILE)
    assert ref1.shape == (8, 2) and (ref1 < 0).all() and torch.allclose(ref1, ref2, rtol=0, atol=1e-6)
    assert ctx2.stats["items_per_process"] == [4, 4] and ctx2.stats["items_seen_by_several_processes"] == 0
    assert ctx2.stats["loss_first"] == pytest.approx(ctx1.stats["loss_first"], abs=1e-5)
    assert json.loads((audit / "rank1.json").read_text()) == []
    d1, d2 = _delta_w(Path(one.adapter_path)), _delta_w(Path(two.adapter_path))
    assert d1.keys() == d2.keys() and all(d1[k].norm() > 0 for k in d1)
    assert max(((d1[k] - d2[k]).norm() / d1[k].norm()).item() for k in d1) < 1e-3


def test_a_killed_training_resumes_from_its_checkpoint(tmp_path, tiny_llama, monkeypatch):
    from thinkpress.plugins.baseline.sft import LoraSFT

    cfg = LoraSFT.Config(epochs=4, batch_size=2, grad_accum=1, save_every=1, autocast_bf16=False, lr=1e-3)
    data = TrainingSet(examples=_examples(8))  # 4 micro-batches per epoch: 16 steps; dropout 0.05 on
    _, _, _, ref_ctx = _setup(tmp_path, tiny_llama, work="uninterrupted")
    ref = LoraSFT(cfg).train(data, ref_ctx)

    calls = {"n": 0}
    real_loss = lora.SFTTask.loss

    def killed_at_sixth(self, model, idx, device):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_loss(self, model, idx, device)

    _, _, _, ctx = _setup(tmp_path, tiny_llama, work="killed")
    monkeypatch.setattr(lora.SFTTask, "loss", killed_at_sixth)
    with pytest.raises(KeyboardInterrupt):
        LoraSFT(cfg).train(data, ctx)
    monkeypatch.setattr(lora.SFTTask, "loss", real_loss)
    assert json.loads((tmp_path / "killed" / "adapter_last_good" / "step.json").read_text())["step"] == 5

    calls["n"] = 0
    _, _, _, ctx = _setup(tmp_path, tiny_llama, work="killed")
    out = LoraSFT(cfg).train(data, ctx)
    assert ctx.stats["resumed_from_step"] == 5 and ctx.stats["steps"] == 16
    assert ctx.stats["loss_last"] == pytest.approx(ref_ctx.stats["loss_last"], rel=1e-6)
    a = load_file(Path(ref.adapter_path) / "adapter_model.safetensors")
    b = load_file(Path(out.adapter_path) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)


_KILLABLE = """
import os

import thinkpress
from thinkpress.plugins.baseline.sft import LoraSFT
from thinkpress.toolkit import lora


class KillableSFT(LoraSFT):
    name = "killable-sft"
    description = "lora-sft whose processes all exit at micro-batch $KILL_AT (for the resume test)"

    def train(self, data, ctx):
        at, real, calls = int(os.environ.get("KILL_AT", "0")), lora.SFTTask.loss, [0]

        def loss(task, model, idx, device):
            calls[0] += 1
            if calls[0] == at:
                os._exit(9)
            return real(task, model, idx, device)

        lora.SFTTask.loss = loss
        try:
            return super().train(data, ctx)
        finally:
            lora.SFTTask.loss = real


@thinkpress.hookimpl
def register_trainers(register):
    register(KillableSFT)
"""


def test_a_killed_launched_training_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_llama, monkeypatch):
    (tmp_path / "killable_trainer.py").write_text(_KILLABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the launched processes import the plugin by name
    import killable_trainer

    reg = build_registry(extra_plugins={"killable_trainer": killable_trainer})
    sets = [f"model={tiny_llama}", f"out={tmp_path / 'run'}", "dtype=float32", "plugins=[baseline]",
            "stages.trainer=killable-sft", "launch.launcher=accelerate", "launch.num_processes=2",
            *(f"components.killable-sft.{k}" for k in ("epochs=4", "batch_size=2", "grad_accum=1", "save_every=1",
                                                       "lr=1e-3", "autocast_bf16=false"))]
    cfg = build_config(preset="smoke", sets=sets)
    planned = resolve_plan(cfg, reg).trainer
    data = TrainingSet(examples=_examples(8))  # 4 global micro-batches per epoch: 16 steps; dropout 0.05 on

    def launch(work: str):
        state = RunState(cfg, reg, RunStore(tmp_path / "run", tmp_path / "cache"), UI(quiet=True))
        ctx = StageContext(run=state, stage="trainer", component=planned.name, workdir=tmp_path / work, key=work)
        return launch_trainer(cfg, reg, planned, data, ctx), ctx

    ref, _ = launch("uninterrupted")
    monkeypatch.setenv("KILL_AT", "6")  # both processes die in the 6th micro-batch, after step 5's checkpoint
    with pytest.raises(TrainingError, match="failed"):
        launch("killed")
    assert json.loads((tmp_path / "killed" / "adapter_last_good" / "step.json").read_text())["step"] == 5
    monkeypatch.delenv("KILL_AT")
    out, ctx = launch("killed")
    assert ctx.stats["resumed_from_step"] == 5 and ctx.stats["steps"] == 16 and ctx.stats["processes"] == 2
    a = load_file(Path(ref.adapter_path) / "adapter_model.safetensors")
    b = load_file(Path(out.adapter_path) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
