"""Test doubles registered as a plugin module (``plugin_modules: [study_doubles]`` in a study file), so that
worker processes (``--workers``, Ray tasks) can register them too: the fake engine, a selector that keeps
every sample and a trainer whose "adapter" only salts the fake engine. It appends a line per training to
the file named by ``THINKPRESS_TEST_CALLS``."""

from __future__ import annotations

import os

from pydantic import Field

import thinkpress
from thinkpress.core.data import Example, TrainingSet, TrainResult
from thinkpress.core.engines.fake import FakeEngine
from thinkpress.core.stages import ComponentConfig, Selector, Trainer


class KeepAll(Selector):
    name = "keep-all"

    def select(self, samples, problems, ctx):
        return TrainingSet(examples=[Example(id=f"{s.problem_id}#{s.index}", problem_id=s.problem_id,
                                             prompt=s.prompt, completion=s.completion) for s in samples])


class SaltTrainer(Trainer):
    name = "salt-trainer"

    class Config(ComponentConfig):
        lr: float = Field(default=1e-4, description="only changes the salt")

    def train(self, data, ctx):
        with open(os.environ["THINKPRESS_TEST_CALLS"], "a") as f:
            f.write(f"train lr={self.config.lr}\n")
        out = ctx.workdir / "adapter"
        out.mkdir(parents=True, exist_ok=True)
        (out / "salt").write_text(str(self.config.lr))
        return TrainResult(adapter_path=str(out), metrics={"steps": 1})


@thinkpress.hookimpl
def register_engines(register):
    register("fake", FakeEngine.factory)


@thinkpress.hookimpl
def register_selectors(register):
    register(KeepAll)


@thinkpress.hookimpl
def register_trainers(register):
    register(SaltTrainer)
