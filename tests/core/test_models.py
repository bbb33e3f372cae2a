import hashlib
import zipfile
from pathlib import Path

import pytest

from thinkpress.core import models
from thinkpress.core.errors import ModelError


def _fake(monkeypatch, tmp_path, content: bytes, sha: str):
    monkeypatch.setenv("THINKPRESS_HOME", str(tmp_path / "home"))
    wheels = tmp_path / "home" / "wheels"
    wheels.mkdir(parents=True)
    for i, part in enumerate([content[:5], content[5:]], 1):
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_part{i}/data/part{i}.bin", part)
            z.writestr(f"fake_part{i}/__init__.py", "raise SystemExit('must never be imported')")
    spec = models.EmbeddedModel(name="fake", description="", wheels=("fake-part1==1.0", "fake-part2==1.0"),
                                members=("fake_part1/data/part1.bin", "fake_part2/data/part2.bin"), sha256=sha,
                                size=len(content), architecture="llama")
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", spec)


def test_parts_are_concatenated_in_order_and_verified(monkeypatch, tmp_path):
    content = b"0123456789abcdef"
    _fake(monkeypatch, tmp_path, content, hashlib.sha256(content).hexdigest())
    path = models.fetch_gguf("fake")
    assert path.read_bytes() == content
    assert models.embedded_state("fake") == "gguf"


def test_sha256_mismatch_is_refused_and_nothing_is_kept(monkeypatch, tmp_path):
    _fake(monkeypatch, tmp_path, b"0123456789abcdef", "0" * 64)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        models.fetch_gguf("fake")
    assert models.embedded_state("fake") == "missing"
    assert not list((tmp_path / "home" / "models" / "fake").glob("*"))


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model_path(str(tmp_path / "empty"))
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_embedded_smollm_is_verified_and_cached_as_safetensors(smollm_path):
    from pathlib import Path

    p = Path(smollm_path)
    assert list(p.glob("*.safetensors")) and not list(p.glob("*.bin")) and not list(p.glob("*.pt"))
    assert models.sha256_file(p.parent / "model.gguf") == models.EMBEDDED_MODELS["smollm2-135m"].sha256
    assert models.embedded_state("smollm2-135m") == "ready"


def test_dtype_auto_is_bf16_only_where_bf16_is_native(monkeypatch, tmp_path):
    import torch

    from thinkpress.core.config import RunConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.resolve_dtype("auto") == "float32" and RunConfig().dtype == "float32"
    assert models.resolve_dtype("bfloat16") == "bfloat16" and RunConfig(dtype="bfloat16").dtype == "bfloat16"
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert models.resolve_dtype("auto") == "float16"
    # the flags are read from /proc/cpuinfo
    monkeypatch.undo()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert models.cpu_has_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_float32_run_on_a_cpu_without_native_bf16_is_told_to_expect_slower_timings(monkeypatch):
    from thinkpress.core import models
    from thinkpress.core.config import build_config

    cfg = build_config(preset="smoke", sets=["dtype=float32", "device=cpu"])
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert "no native bf16" in models.slow_cpu_dtype_note(cfg) and "4x" in models.slow_cpu_dtype_note(cfg)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.slow_cpu_dtype_note(cfg) is None
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.slow_cpu_dtype_note(build_config(preset="smoke", sets=["dtype=bfloat16", "device=cpu"])) is None
