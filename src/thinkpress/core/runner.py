"""The runner: one resolved config from plan to report (planning, stage execution, evaluation, manifest)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from thinkpress.core.config import RunConfig, dump_yaml
from thinkpress.core.context import UI, RunState
from thinkpress.core.errors import ConfigError
from thinkpress.core.evaluator import Evaluator
from thinkpress.core.execution import StageExecutor
from thinkpress.core.files import atomic_write_json
from thinkpress.core.manifest import manifest, nondeterminism, peak_rss_mb
from thinkpress.core.models import EMBEDDED_MODELS, model_identity, resolve_model_path, slow_cpu_dtype_note
from thinkpress.core.planning import TestSet, load_problems, resolve_plan
from thinkpress.core.plugins import Registry, get_registry
from thinkpress.core.results import RunResult, TestSetResult, VariantResult
from thinkpress.core.store import RunStore, stable_hash

log = logging.getLogger("thinkpress")


class Runner:
    """Runs one resolved config. Everything that can be wrong with the input is checked in ``__init__``."""

    def __init__(self, cfg: RunConfig, *, registry: Registry | None = None, ui: UI | None = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.reg = registry or get_registry()
        self.ui = ui or UI()
        self.overwrite = overwrite
        # Everything that can be wrong with the input is checked here, before any work.
        self.plan = resolve_plan(cfg, self.reg)
        self.test_sets: list[TestSet] = []
        for i, spec in enumerate(cfg.test_data if cfg.eval.enabled else []):
            probs, stats = load_problems(spec, self.reg, cfg.seed, f"test_data.{i}")
            self.test_sets.append(TestSet(spec.display_name(), spec, probs,
                                          stable_hash([x.model_dump(mode="json") for x in probs]),
                                          stats.get("skipped", 0)))
        self.train_problems, train_stats = (load_problems(cfg.train_data, self.reg, cfg.seed, "train_data")
                                            if self.plan.train else ([], {}))
        self.skipped_rows = {"train_data": train_stats.get("skipped", 0),
                             "test_data": sum(t.skipped_rows for t in self.test_sets)}
        if cfg.eval.adapter and not Path(cfg.eval.adapter, "adapter_config.json").exists():
            raise ConfigError(f"eval.adapter: {cfg.eval.adapter!r} is not a saved LoRA adapter directory "
                              "(no adapter_config.json)")
        self.reg.engine(cfg.engine)
        if cfg.model not in EMBEDDED_MODELS:
            resolve_model_path(cfg.model)  # a missing local model fails here, not after sampling
        self.model_id = model_identity(cfg.model)
        self.store = RunStore(cfg.run_dir(), cfg.stage_cache_dir())
        self.state = RunState(cfg, self.reg, self.store, self.ui)
        self.executor = StageExecutor(cfg, self.reg, self.store, self.state, self.ui, self.model_id, self.plan)
        self.evaluator = Evaluator(cfg, self.store, self.state, self.plan, self.model_id)
        self.timings: dict[str, float] = {}
        used = sorted(set(self.plan.engines.values())) or [cfg.engine]
        self.nondeterminism = nondeterminism(cfg, {name: self.reg.engine(name) for name in used})
        self.result: RunResult | None = None
        """The finished run (after :meth:`run`)."""

    @property
    def stage_info(self) -> dict[str, Any]:
        return self.executor.stage_info

    def run(self) -> dict[str, Any]:
        import torch

        from thinkpress.core.report import write_report

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        resumed = self.store.claim(dump_yaml(cfg), cfg.config_hash(), overwrite=self.overwrite)
        handler = logging.FileHandler(self.store.dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            info = manifest(cfg) | {"resumed": resumed, "plan": self.plan.describe(),
                                         "skipped_rows": self.skipped_rows,
                                         "nondeterminism": self.nondeterminism}
            if any(self.skipped_rows.values()):
                self.ui.info(f"skipped malformed dataset rows: {self.skipped_rows}")
            atomic_write_json(self.store.dir / "manifest.json", info)
            self.ui.info(f"run directory {self.store.dir} ({'resuming' if resumed else 'new'}); "
                         f"plan: {self.plan.describe()}")
            if note := slow_cpu_dtype_note(cfg):
                self.ui.info(note)
            t0 = time.perf_counter()
            result, train_key, trainer = self.executor.train(self.plan, self.train_problems)
            self.timings["train_s"] = time.perf_counter() - t0
            sets = [TestSetResult(ts) for ts in self.test_sets] if cfg.eval.enabled else []
            if cfg.eval.enabled:
                t1 = time.perf_counter()
                adapter = self.executor.adapter_path(result, train_key) if result is not None else None
                variants = self.evaluator.variants(result, train_key, trainer, adapter, self.executor.rounds)
                for out in sets:
                    out.variants = [VariantResult(v, self.evaluator.evaluate_variant(v, out.test_set))
                                    for v in variants]
                self.timings["eval_s"] = time.perf_counter() - t1
            self.timings["total_s"] = time.perf_counter() - t0
            run = RunResult(config=cfg, plan=self.plan, out_dir=self.store.dir, test_sets=sets, train=result,
                            stages=self.stage_info, timings=self.timings, nondeterminism=self.nondeterminism,
                            skipped_rows=self.skipped_rows)
            if run.primary is not None and run.primary.variants:
                # components' own report sections (ratio sweeps, KV budget curves) cover the primary test set
                for planned in ([trainer] if trainer else []) + self.plan.kv_pruners:
                    run.report_lines += planned.instance.report_extras(run.primary, self.store.dir)
            info |= {"timings": self.timings, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "peak_rss_mb_process": peak_rss_mb()}
            atomic_write_json(self.store.dir / "manifest.json", info)
            self.result = run
            return write_report(run)
        finally:
            self.state.close()
            log.removeHandler(handler)
            handler.close()
