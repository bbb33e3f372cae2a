"""The core's own hook implementations: the ``hf`` engine, the built-in datasets, ``run_stage``."""

from __future__ import annotations

from thinkpress import hookimpl
from thinkpress.core.datasets import BUILTIN_DATASETS


@hookimpl
def register_engines(register):
    from thinkpress.core.engines.hf import build_hf_engine

    register("hf", build_hf_engine)


@hookimpl
def register_datasets(register):
    for name, loader in BUILTIN_DATASETS.items():
        register(name, loader)


@hookimpl(trylast=True)
def run_stage(stage, component, inputs, ctx):
    """Call the component's stage method (the innermost implementation)."""
    if stage == "sampler":
        return component.sample(inputs["problems"], ctx)
    if stage == "selector":
        return component.select(inputs["samples"], inputs["problems"], ctx)
    if stage == "refiner":
        return component.refine(inputs["data"], ctx)
    if stage == "pruner":
        return component.prune(inputs["data"], ctx)
    if stage == "trainer":
        return component.train(inputs["data"], ctx)
    raise ValueError(f"unknown stage {stage!r}")
