"""Evaluation: every variant (base, trained, adapter, each KV policy's) on every test set.

An evaluation is resumable per chunk and cached under a content key (variant, its parameters and
adapter identity, test set content, generation settings, model, system prompt, dtype, seed). Each
row gets intervals and paired comparisons (see :mod:`.evaluation` and :mod:`.stats`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from thinkpress.core.config import RunConfig
from thinkpress.core.context import RunState, StageContext
from thinkpress.core.data import Prediction, Problem, TrainResult, read_jsonl, write_jsonl
from thinkpress.core.evaluation import grade, kv_agreement, paired_flips, summarize, with_intervals
from thinkpress.core.files import atomic_write_json
from thinkpress.core.manifest import adapter_identity
from thinkpress.core.planning import Plan, Planned, TestSet, engine_identity
from thinkpress.core.stages import EvalVariant
from thinkpress.core.store import RunStore, stable_hash

log = logging.getLogger("thinkpress")


class Evaluator:
    """Builds a run's evaluation variants and evaluates them."""

    def __init__(self, cfg: RunConfig, store: RunStore, state: RunState, plan: Plan, model_id: str):
        self.cfg, self.store, self.state, self.plan, self.model_id = cfg, store, state, plan, model_id
        self.eval_keys: dict[tuple[str, str], str] = {}
        """Evaluation cache key of every (test set, variant) evaluated so far (KV variants find their reference's)."""

    def variants(self, result: TrainResult | None, train_key: str | None, trainer: Planned | None,
                 adapter: str | None, rounds: list[dict] | None = None) -> list[EvalVariant]:
        """base, the trainer's variants (``adapter`` is its adapter directory), ``adapter``, and each KV policy's.

        With ``eval.every_round`` and several training ``rounds`` (the executor's list), each earlier
        round's adapter is a variant ``trained@round<r>`` too.
        """
        base: list[EvalVariant] = [EvalVariant(name="base", params={})] if self.cfg.eval.base else []
        trained: list[EvalVariant] = []
        if self.cfg.eval.adapter:
            path = str(Path(self.cfg.eval.adapter).resolve())
            key = stable_hash(adapter_identity(path))[:12]
            trained.append(EvalVariant(name="adapter", params={"adapter_key": key}, adapter=path))
        if result is not None and result.adapter_path:
            ctx = StageContext(self.state, "trainer", trainer.name, self.store.stage_cache(train_key), train_key)
            custom = trainer.instance.eval_variants(ctx)
            trained = custom if custom is not None else [EvalVariant(name="trained", params={})]
            for v in trained:
                v.adapter = v.adapter or adapter
                v.params.setdefault("adapter_key", train_key[:12])
            if self.cfg.eval.every_round:
                trained = [EvalVariant(name=f"trained@round{r['round']}", params={"adapter_key": r["key"][:12]},
                                       adapter=r["adapter"]) for r in (rounds or [])[:-1] if r["adapter"]] + trained
        out = base + trained
        for kv in self.plan.kv_pruners:
            for params in kv.instance.variants():
                for v in base + trained:
                    tag = ",".join(f"{k}={val}" for k, val in params.items())
                    out.append(EvalVariant(name=f"{v.name}+{kv.name}" + (f"@{tag}" if tag else ""),
                                           params={**v.params, "kv_policy": kv.name, **params}, adapter=v.adapter,
                                           prompt_suffix=v.prompt_suffix, response_prefix=v.response_prefix,
                                           kv_pruner=kv.name, kv_params=params,
                                           max_new_tokens=v.max_new_tokens, reference=v.name))
        return out

    def eval_key(self, v: EvalVariant, ts: TestSet) -> str:
        """The evaluation cache key of one variant on one test set (what ``core ablate --dry-run`` compares)."""
        # params hold the trainer stage's key (adapter_key) for trained variants: it identifies the adapter.
        # "eval-v3": unmerged adapters and strict grading (older cached evaluations are not reused).
        engine_name = self.plan.eval_engine or self.cfg.engine
        prefix = [("response_prefix", v.response_prefix)] if v.response_prefix else []  # older keys unchanged
        return stable_hash("eval-v3", v.name, v.params, v.prompt_suffix, v.kv_pruner, v.kv_params, ts.key,
                           self.cfg.eval.generation.model_dump(mode="json"), self.model_id, self.cfg.system_prompt,
                           self.cfg.dtype, self.cfg.seed, *engine_identity(self.cfg, engine_name), *prefix)

    def evaluate_variant(self, v: EvalVariant, ts: TestSet) -> dict[str, Any]:
        """Evaluate one variant on one test set (resumable per chunk, cached by content key)."""
        import torch

        from thinkpress.core.engines.base import GenParams

        g = self.cfg.eval.generation
        params = GenParams(max_new_tokens=v.max_new_tokens or g.max_new_tokens, temperature=g.temperature,
                           top_p=g.top_p, stop=g.stop)
        engine_name = self.plan.eval_engine or self.cfg.engine
        key = self.eval_key(v, ts)
        path = self.store.stage_cache(key)
        ctx = StageContext(self.state, "eval", v.name, path, key, engine_name=engine_name)
        engine = self.state.engine(v.adapter, name=engine_name)
        policy = None
        if v.kv_pruner:
            kv = next(p for p in self.plan.kv_pruners if p.name == v.kv_pruner)
            policy = kv.instance.make_policy(v.kv_params)

        def run_chunk(chunk: list[Problem]) -> list[Prediction]:
            engine.stats.reset()
            t0 = time.perf_counter()
            prompts = [engine.chat_prompt(p.question, suffix=v.prompt_suffix) + v.response_prefix for p in chunk]
            outs = engine.generate(prompts, params, n=1, batch_size=g.batch_size, kv_policy=policy)
            wall = time.perf_counter() - t0
            recs = []
            for p, o in zip(chunk, outs, strict=True):
                pred, ok = grade(o[0].text, p.answer, truncated=o[0].finish_reason == "length")
                recs.append(Prediction(problem_id=p.id, completion=o[0].text, n_tokens=o[0].n_tokens,
                                       finish_reason=o[0].finish_reason, pred=pred, correct=ok,
                                       decode_s=engine.stats.decode_s / len(chunk), wall_s=wall / len(chunk),
                                       peak_kv_bytes=engine.stats.peak_kv_bytes, token_ids=o[0].token_ids,
                                       kv_evicted=engine.stats.kv_evicted / len(chunk),
                                       kv_kept_peak=o[0].kv_kept_peak, kv_kept_mean=o[0].kv_kept_mean,
                                       threads=torch.get_num_threads()))
            return recs

        with self.store.lock(key):  # a worker sharing the cache may be evaluating the same variant: wait, reuse
            recs = ctx.journal_map(ts.problems, run_chunk, chunk_size=engine.preferred_chunk(g.batch_size),
                                   item_id=lambda p: p.id, desc=f"eval {v.name} on {ts.name}")
        out_dir = self._eval_dir(ts, v.name)
        write_jsonl(out_dir / "predictions.jsonl", recs)
        metrics = summarize(recs, wall_s=sum(r["wall_s"] for r in recs), decode_s=sum(r["decode_s"] for r in recs),
                            peak_kv_bytes=max((r["peak_kv_bytes"] for r in recs), default=None))
        row = {"name": v.name, "params": v.params, "test_set": ts.name, "reference": v.reference or "base",
               "eval_key": key, **metrics}
        self.eval_keys[(ts.name, v.name)] = key
        ref = v.reference or "base"
        ref_recs = self.predictions(ts, ref) if ref != v.name else None
        base_recs = self.predictions(ts, "base") if v.name != "base" else None
        row |= with_intervals(recs, base=base_recs, reference=ref_recs, n_boot=self.cfg.eval.bootstrap,
                              seed=self.cfg.seed)
        if ref_recs is not None:
            row |= {"flips_vs": ref, **paired_flips(ref_recs, recs)}
        if v.kv_pruner and self.cfg.eval.kv_agreement:
            if ref_recs is None:
                log.warning("no full-cache variant %r evaluated in this run: no agreement metrics for %s", ref, v.name)
            else:
                row |= self.agreement(v, ts, ref, ref_recs, recs, policy, engine, key)
        atomic_write_json(out_dir / "metrics.json", row)
        return row

    def _eval_dir(self, ts: TestSet, name: str) -> Path:
        return self.store.dir / "eval" / ts.name.replace("/", "_") / name.replace("/", "_")

    def predictions(self, ts: TestSet, name: str) -> list[dict[str, Any]] | None:
        """The predictions of a variant evaluated earlier in this run on ``ts`` (None if it was not)."""
        path = self._eval_dir(ts, name) / "predictions.jsonl"
        if (ts.name, name) not in self.eval_keys or not path.exists():
            return None
        return [p.model_dump() for p in read_jsonl(path, Prediction)]

    def agreement(self, v: EvalVariant, ts: TestSet, ref: str, full: list[dict[str, Any]], recs: list[dict[str, Any]],
                  policy, engine, key: str) -> dict[str, Any]:
        """Token agreement with, and teacher-forced NLL of, the full-cache variant ``ref``'s EOS-ended outputs."""
        from thinkpress.core.engines.base import KVPolicy

        out = kv_agreement(full, recs)
        todo = [f for f in full if f["finish_reason"] == "eos" and f.get("token_ids")]
        if not todo:
            return out
        g = self.cfg.eval.generation
        problems = {p.id: p for p in ts.problems}

        def nll(pol, stage_key: str, desc: str) -> float:
            ctx = StageContext(self.state, "eval", desc, self.store.stage_cache(stage_key), stage_key)

            def run_chunk(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
                qs = [problems[f["problem_id"]].question for f in chunk]
                prompts = [engine.chat_prompt(q, suffix=v.prompt_suffix) + v.response_prefix for q in qs]
                lps = engine.forced_decode(prompts, [f["token_ids"] for f in chunk], kv_policy=pol,
                                           batch_size=g.batch_size)
                return [{"problem_id": f["problem_id"], "nll_sum": -sum(lp), "n": len(lp)} for f, lp in
                        zip(chunk, lps, strict=True)]

            rows = ctx.journal_map(todo, run_chunk, chunk_size=g.batch_size, item_id=lambda f: f["problem_id"],
                                   desc=desc)
            return sum(r["nll_sum"] for r in rows) / max(1, sum(r["n"] for r in rows))

        out["nll_full"] = nll(KVPolicy(), stable_hash("nll-full", self.eval_keys[(ts.name, ref)]), f"nll {ref}")
        out["nll_pruned"] = nll(policy, stable_hash("nll", key), f"nll {v.name}")
        return out
