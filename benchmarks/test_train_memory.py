"""Peak memory and time of one LoRA SFT step (batch 4 x 512 tokens) with and without gradient
checkpointing, each in a fresh process.

    BENCH_MODEL=qwen2.5-coder-0.5b .venv/bin/python -m pytest benchmarks/test_train_memory.py --benchmark-only -s
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

MODEL = os.environ.get("BENCH_MODEL", "smollm2-135m")

_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch
    from types import SimpleNamespace
    from thinkpress.core.models import ensure_embedded
    from thinkpress.toolkit import lora as sft
    ckpt = sys.argv[2] == "1"
    cfg = sft.SFTConfig(gradient_checkpointing=ckpt)
    ctx = SimpleNamespace(config=SimpleNamespace(model=sys.argv[1], trust_remote_code=False))
    model, tok = sft.load_trainable(ctx, cfg)
    model.train()  # checkpointing (and dropout) act only in training mode
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (4, 512))
    labels = ids.clone(); labels[:, :128] = -100
    mask = torch.ones_like(ids)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sft.completion_loss(model, ids, mask, labels)
    loss.backward()
    dt = time.perf_counter() - t0
    print(json.dumps({"s": dt, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}))
""")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_step_memory(benchmark, checkpointing):
    def run():
        out = subprocess.run([sys.executable, "-c", _SCRIPT, MODEL, "1" if checkpointing else "0"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(model=MODEL, checkpointing=checkpointing, **res)
    print(f"\n{MODEL} 4x512 LoRA step, checkpointing={checkpointing}: {res['s']:.1f} s, "
          f"+{res['peak_bytes'] / 2**30:.2f} GiB over the loaded model")
