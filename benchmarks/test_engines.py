"""Generation throughput: thinkpress's vllm engine vs its hf engine vs raw vLLM, side by side in one run.

    .venv/bin/python -m pytest benchmarks/test_engines.py --benchmark-only -s
    BENCH_ENGINE_MODEL=smollm2-135m BENCH_ENGINE_PROMPTS=8 ...   (a quick check)

The default model (Qwen2.5-Coder-0.5B, bf16), 48 GSM8K test prompts, 256 new tokens per sequence
(EOS ignored, so every engine decodes the same number of tokens): greedy, and n = 8 samples per
prompt at temperature 0.9. hf decodes in batches of 16 sequences (the default preset's batch, the
fastest measured on 2 cores), vllm gets all prompts in one call (it batches continuously). Raw vLLM
is ``LLM.generate`` on the same loaded model with the same sampling parameters and token ids: the
difference to the vllm engine is what thinkpress adds. Each of the three runs in its own process (vLLM
binds its threads); the two vLLM ones start with the same small warm-up calls.
Compare only the ratios: the machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

MODEL = os.environ.get("BENCH_ENGINE_MODEL", "qwen2.5-coder-0.5b")
PROMPTS = int(os.environ.get("BENCH_ENGINE_PROMPTS", "48"))
TOKENS = int(os.environ.get("BENCH_ENGINE_TOKENS", "256"))

_SCRIPT = textwrap.dedent("""
    import json, sys, time
    if __name__ == "__main__":
        from thinkpress.core.config import build_config
        from thinkpress.core.datasets import BUILTIN_DATASETS
        from thinkpress.core.engines.base import GenParams
        from thinkpress.core.plugins import get_registry

        which, model, n_prompts, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        cfg = build_config(sets=[f"model={model}", f"engine={'hf' if which == 'hf' else 'vllm'}"])
        engine = get_registry().engine(cfg.engine)(cfg)
        probs = BUILTIN_DATASETS["gsm8k"]("test", limit=n_prompts, seed=0, shuffle=True)
        prompts = [engine.chat_prompt(p.question) for p in probs]
        cases = {"greedy": (GenParams(max_new_tokens=tokens, ignore_eos=True), 1),
                 "sampled": (GenParams(max_new_tokens=tokens, temperature=0.9, ignore_eos=True), 8)}
        seeds = list(range(len(prompts)))
        out = {}
        if which != "hf":
            engine.generate(prompts[:4], GenParams(max_new_tokens=16))  # warm-up
            engine.generate(prompts[:2], GenParams(max_new_tokens=16, temperature=0.9), n=2, seeds=[0, 1])
        for case, (params, n) in cases.items():
            if which == "vllm-raw":
                from thinkpress.core.engines.vllm import _sampling_params
                llm = engine.backend.get().llm
                sps = [_sampling_params(params, n, None if params.greedy else s, False, engine.eos_ids) for s in seeds]
                reqs = [{"prompt_token_ids": engine._encode(p)} for p in prompts]
                t0 = time.perf_counter()
                res = llm.generate(reqs, sps, use_tqdm=False)
                wall = time.perf_counter() - t0
                toks = sum(len(c.token_ids) for o in res for c in o.outputs)
            else:
                t0 = time.perf_counter()
                res = engine.generate(prompts, params, n=n, seeds=seeds, batch_size=16)
                wall = time.perf_counter() - t0
                toks = sum(c.n_tokens for r in res for c in r)
            out[case] = {"tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall}
        print(json.dumps(out))
""")


def _measure(which: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _SCRIPT, which, MODEL, str(PROMPTS), str(TOKENS)], capture_output=True,
                       text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_vllm_engine_vs_hf_engine_vs_raw_vllm(benchmark):
    from thinkpress.core.engines.vllm import vllm_version

    if vllm_version() is None:
        pytest.skip("vLLM is not importable")
    res: dict[str, dict] = {}

    def run():
        res["hf"] = _measure("hf")
        res["vllm"] = _measure("vllm")
        res["vllm-raw"] = _measure("vllm-raw")
        return res

    benchmark.pedantic(run, rounds=1, iterations=1)
    for case in ("greedy", "sampled"):
        hf, v, raw = (res[k][case]["tokens_per_s"] for k in ("hf", "vllm", "vllm-raw"))
        assert res["hf"][case]["tokens"] == res["vllm"][case]["tokens"] == res["vllm-raw"][case]["tokens"]
        benchmark.extra_info[case] = {"hf": hf, "vllm": v, "vllm_raw": raw, "vllm_vs_hf": v / hf,
                                      "vllm_vs_raw": v / raw}
        print(f"\n{MODEL} {PROMPTS} prompts x {TOKENS} tokens, {case}: hf {hf:.1f} tok/s, vllm engine {v:.1f} tok/s, "
              f"raw vLLM {raw:.1f} tok/s; vllm/hf {v / hf:.2f}x, vllm/raw {v / raw:.1%}")
