"""The run manifest: versions, hardware, threads, git state, and what can make two runs differ."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from thinkpress.core.config import RunConfig


def git_state() -> dict[str, Any]:
    """The commit of the source tree thinkpress runs from, and whether it has uncommitted changes."""
    try:
        root = Path(__file__).resolve().parents[3]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {}


def manifest(cfg: RunConfig) -> dict[str, Any]:
    """Versions, hardware, thread counts, seed, config hash and git state at the start of a run."""
    import torch
    import transformers

    from thinkpress import __version__

    return {
        "thinkpress": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "seed": cfg.seed, "config_hash": cfg.config_hash(), "git": git_state(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def nondeterminism(cfg: RunConfig, engine_factories: dict[str, Any]) -> list[str]:
    """Known sources of run-to-run differences for this config (empty: same config, same numbers).

    An engine factory declares ``deterministic = True`` when the same inputs give the same tokens on
    CPU for a fixed thread count (the hf engine: greedy evaluation, per-problem sampling seeds, seeded
    training; tested by running the smoke config twice).
    """
    import torch

    notes = []
    for name, factory in engine_factories.items():
        if not getattr(factory, "deterministic", False):
            notes.append(f"engine {name!r}: run-to-run determinism not established")
    if torch.cuda.is_available() and not cfg.device.startswith("cpu"):
        notes.append("CUDA: cuBLAS/SDPA kernels and atomics can change low bits between runs, and so greedy "
                     "tokens near ties")
    return notes


def adapter_identity(path: str) -> list[str]:
    """Content hash of a saved adapter's files (the cache key of its evaluations)."""
    import hashlib

    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return [f"{p.relative_to(path)}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in files]


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
