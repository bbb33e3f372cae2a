"""Peak memory of DPO-L: the full [batch, tokens, vocab] logits vs. log-probs chunked over positions.

Each configuration runs in a fresh process on the same batch: reference log-probs for 4 pairs, then one
micro-batch of 2 pairs (4 sequences of prompt 128 + completion 256/448 tokens) forward and backward.
It prints the loss (equal within 1e-4 across configurations, checked) and the peak RSS over the
loaded model.

    BENCH_MODEL=qwen2.5-coder-0.5b .venv/bin/python -m pytest benchmarks/test_dpo_memory.py --benchmark-only -s
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

MODEL = os.environ.get("BENCH_MODEL", "smollm2-135m")
RESULTS: dict = {}

_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch
    from types import SimpleNamespace
    from accelerate import Accelerator
    from thinkpress.api import PreferencePair
    from thinkpress.plugins.tokensqueeze.dpo import DPOLConfig, DPOTask
    from thinkpress.toolkit import lora
    chunk, ckpt = int(sys.argv[2]), sys.argv[3] == "1"
    cfg = DPOLConfig(logit_chunk=chunk, gradient_checkpointing=ckpt, batch_size=2, max_length=640, dropout=0.0)
    ctx = SimpleNamespace(config=SimpleNamespace(model=sys.argv[1], trust_remote_code=False), adapter=None)
    model, tok = lora.load_trainable(ctx, cfg)
    words = "seven apples and three pears make ten fruits in all so the answer is ten ".split()
    text = lambda n: " ".join(words[i % len(words)] for i in range(n))
    pairs = [PreferencePair(id=str(i), problem_id=str(i), prompt=text(128 + i), chosen=text(256), rejected=text(448))
             for i in range(4)]
    acc = Accelerator(cpu=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    task = DPOTask(pairs, tok, cfg)
    task.compute_reference(model, acc)
    model.train()
    torch.manual_seed(0)
    loss, logs = task.loss(model, [0, 1], "cpu")
    loss.backward()
    dt = time.perf_counter() - t0
    print(json.dumps({"s": dt, "loss": loss.item(),
                      "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}))
""")


@pytest.mark.parametrize(("chunk", "checkpointing"), [(0, False), (128, False), (128, True)])
def test_dpo_l_step_memory(benchmark, chunk, checkpointing):
    def run():
        out = subprocess.run([sys.executable, "-c", _SCRIPT, MODEL, str(chunk), "1" if checkpointing else "0"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS[(chunk, checkpointing)] = res
    benchmark.extra_info.update(model=MODEL, chunk=chunk, checkpointing=checkpointing, **res)
    full = RESULTS.get((0, False))
    ratio = f", {res['peak_bytes'] / full['peak_bytes']:.2f} of the full logits' peak" if full else ""
    print(f"\n{MODEL} DPO-L step, logit_chunk={chunk}, checkpointing={checkpointing}: {res['s']:.1f} s, "
          f"loss {res['loss']:.6f}, +{res['peak_bytes'] / 2**30:.2f} GiB over the loaded model{ratio}")
    if full:
        assert abs(res["loss"] - full["loss"]) < 1e-4
