"""Kernels: chunked torch reference vs. naive torch for every op (CPU), and Triton vs. naive vs.
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
    from thinkpress.kernels import token_scores
    from thinkpress.kernels.ops.token_scores import token_scores_reference
    impl, n, v, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    x = torch.randn(n, v, device=device).mul_(4)  # in place: no input-sized temporary under the high-water mark
    t = torch.randint(0, v, (n,), device=device)

    def naive():
        lp = torch.log_softmax(x.float(), -1)
        return -lp.gather(1, t[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1), torch.logsumexp(x.float(), -1)

    fns = {"naive": naive, "reference": lambda: token_scores_reference(x, t),
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


# -- the other ops: chunked torch reference (the CPU path) vs. naive torch, one row per op and case ---------------
_OPS_SCRIPT = textwrap.dedent("""
    import json, math, resource, sys, time, torch
    from thinkpress.kernels.ops.key_redundancy import key_redundancy_reference
    from thinkpress.kernels.ops.kl_div import kl_div_reference
    from thinkpress.kernels.ops.window_attention_mass import window_attention_mass_reference
    op, impl, dims = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
    torch.manual_seed(0)
    if op == "kl_div":
        n, v = dims
        p, q = torch.randn(n, v).mul_(4), torch.randn(n, v).mul_(4)

        def naive():
            lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
            return (lp.exp() * (lp - lq)).sum(-1)

        ref = lambda: kl_div_reference(p, q)
    elif op == "window_attention_mass":
        hq, hkv, w, n, d = dims
        qs, ks = torch.randn(1, hq, w, d), torch.randn(1, hkv, n, d)

        def naive():
            k = ks.repeat_interleave(hq // hkv, dim=1)
            sc = torch.einsum("bhwd,bhnd->bhwn", qs, k) / math.sqrt(d)
            qpos = n - w + torch.arange(w)
            sc = sc.masked_fill(torch.arange(n)[None, :] > qpos[:, None], float("-inf"))
            return sc.softmax(-1).reshape(1, hkv, (hq // hkv) * w, n).mean(2)

        ref = lambda: window_attention_mass_reference(qs, ks)
    else:  # key_redundancy with R-KV's recent-copy exemption
        h, n, d = dims
        ks = torch.randn(1, h, n, d)
        ks[:, :, n // 2:] = ks[:, :, : n - n // 2] + 0.05  # repeats to exempt

        def naive():
            kn = torch.nn.functional.normalize(ks, dim=-1)
            s = kn @ kn.transpose(-1, -2)
            s.diagonal(dim1=-2, dim2=-1).zero_()
            idx = torch.arange(n)
            last = torch.where(s > 0.5, idx, -1).amax(-1)  # each row's most recent similar key
            rows = (last >= 0).nonzero(as_tuple=True)
            s[rows + (last[rows],)] = 0.0
            return s.sum(-2) / n

        ref = lambda: key_redundancy_reference(ks, exemption_threshold=0.5)
    if impl == "check":
        torch.testing.assert_close(ref(), naive(), atol=1e-4, rtol=1e-4)
        print(json.dumps({"ok": True}))
        sys.exit(0)
    fn = naive if impl == "naive" else ref
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    t0 = time.perf_counter()
    for _ in range(2):
        fn()
    print(json.dumps({"s": (time.perf_counter() - t0) / 2, "peak_bytes": peak}))
""")

OP_CASES = [("kl_div", "512,151936"), ("kl_div", "4096,49152"),
            ("window_attention_mass", "14,2,32,8192,64"), ("window_attention_mass", "14,2,32,32768,64"),
            ("key_redundancy", "2,2048,64"), ("key_redundancy", "2,8192,64")]


def _run_op(op: str, impl: str, dims: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _OPS_SCRIPT, op, impl, dims], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op, dims", OP_CASES)
def test_cpu_op_chunked_reference_vs_naive(benchmark, op, dims):
    """The same answer (checked first), then time and the extra peak memory of one cold call, each in its process."""
    assert _run_op(op, "check", dims if op != "window_attention_mass" else "4,2,8,256,16")["ok"]
    res = {}

    def run():
        res["naive"] = _run_op(op, "naive", dims)
        res["reference"] = _run_op(op, "reference", dims)
        return res

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(op=op, dims=dims,
                                **{f"{k}_{m}": r[m] for k, r in res.items() for m in ("s", "peak_bytes")})
    print(f"\n{op} ({dims}): naive {res['naive']['s']:.3f}s {res['naive']['peak_bytes'] / 2**20:.0f} MiB | "
          f"chunked {res['reference']['s']:.3f}s {res['reference']['peak_bytes'] / 2**20:.0f} MiB | "
          f"time x{res['reference']['s'] / res['naive']['s']:.2f}, "
          f"memory 1/{res['naive']['peak_bytes'] / max(1, res['reference']['peak_bytes']):.1f}")
