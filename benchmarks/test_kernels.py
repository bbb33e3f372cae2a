"""Token-score kernels: chunked torch reference vs. naive torch (CPU), and Triton vs. naive vs.
torch.compile (CUDA, skipped without a GPU).

    .venv/bin/python -m pytest benchmarks/test_kernels.py --benchmark-only -s

Peak memory is measured in a fresh subprocess per case: the high-water mark of the process (CPU:
ru_maxrss; CUDA: max_memory_allocated) after the input is allocated, minus the mark before the call.
Compare cases as ratios within one run (shared, noisy machines).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

CASES = [(512, 49152), (512, 151936), (4096, 49152), (4096, 151936)]

_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch
    from thinkpress.kernels import reference, token_scores
    impl, n, v, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    x = torch.randn(n, v, device=device).mul_(4)  # in place: no input-sized temporary under the high-water mark
    t = torch.randint(0, v, (n,), device=device)

    def naive():
        lp = torch.log_softmax(x.float(), -1)
        return -lp.gather(1, t[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1), torch.logsumexp(x.float(), -1)

    fns = {"naive": naive, "reference": lambda: reference.token_scores(x, t),
           "triton": lambda: token_scores(x, t, backend="triton"),
           "compile": torch.compile(naive) if impl == "compile" else None}
    fn = fns[impl]
    if device == "cuda":
        fn()  # warm-up (compilation, allocator), then the peak of one call
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        fn(); torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is a high-water mark: take the first call's, above the input's
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    reps = 5 if device == "cuda" else 2
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    print(json.dumps({"s": dt, "peak_bytes": peak, "bytes_read": x.numel() * x.element_size()}))
""")


def _measure(impl: str, n: int, v: int, device: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, impl, str(n), str(v), device], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n, v", CASES)
def test_cpu_chunked_reference_vs_naive(benchmark, n, v):
    """Both peaks are the extra memory of one cold call above the input, each in its own process."""
    res = {}

    def run():
        res["naive"] = _measure("naive", n, v, "cpu")
        res["reference"] = _measure("reference", n, v, "cpu")
        return res

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(n=n, v=v, **{f"{k}_{m}": r[m] for k, r in res.items() for m in ("s", "peak_bytes")})
    ratio_t = res["reference"]["s"] / res["naive"]["s"]
    ratio_m = res["naive"]["peak_bytes"] / max(1, res["reference"]["peak_bytes"])
    print(f"\nN={n} V={v}: naive {res['naive']['s']:.3f}s {res['naive']['peak_bytes'] / 2**20:.0f} MiB | "
          f"chunked {res['reference']['s']:.3f}s {res['reference']['peak_bytes'] / 2**20:.0f} MiB | "
          f"time x{ratio_t:.2f}, memory 1/{ratio_m:.1f}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, v", CASES)
def test_cuda_triton_vs_naive_vs_compile(benchmark, n, v):
    res = {}

    def run():
        for impl in ("naive", "compile", "triton"):
            res[impl] = _measure(impl, n, v, "cuda")
        return res

    benchmark.pedantic(run, rounds=1, iterations=1)
    bw = {k: r["bytes_read"] / r["s"] / 1e9 for k, r in res.items()}
    benchmark.extra_info.update(n=n, v=v, device=torch.cuda.get_device_name(0), torch=torch.__version__,
                                **{f"{k}_GBps": b for k, b in bw.items()},
                                **{f"{k}_{m}": r[m] for k, r in res.items() for m in ("s", "peak_bytes")})
    print(f"\nN={n} V={v} on {torch.cuda.get_device_name(0)}: " +
          ", ".join(f"{k} {r['s'] * 1e3:.2f} ms ({bw[k]:.0f} GB/s, peak {r['peak_bytes'] / 2**20:.0f} MiB)"
                    for k, r in res.items()))
