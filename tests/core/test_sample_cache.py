"""The per-problem sample cache: a run over more problems decodes only the new ones (fake engine)."""

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import thinkpress
from thinkpress.core.config import build_config
from thinkpress.core.context import UI, RunState, StageContext
from thinkpress.core.data import Problem
from thinkpress.core.engines.base import GenParams
from thinkpress.core.engines.fake import FakeEngine
from thinkpress.core.plugins import build_registry
from thinkpress.core.store import RunStore
from thinkpress.toolkit.sampling import sample_problems

PROBLEMS = [Problem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(12)]


@pytest.fixture
def decoded(fake_prompts):
    return fake_prompts


def _sample(tmp_path, name, problems, params, *sets, n=3, seed=0):
    engines = thinkpress.hookimpl(lambda register: register("fake", FakeEngine.factory))
    reg = build_registry(load_entry_points=False, extra_plugins={"fake": SimpleNamespace(register_engines=engines)})
    cfg = build_config(preset="smoke", sets=["engine=fake", f"seed={seed}", *sets], registry=reg)
    state = RunState(cfg, reg, RunStore(tmp_path / name, tmp_path / "cache"), UI(quiet=True))
    ctx = StageContext(run=state, stage="sampler", component="test", workdir=tmp_path / name / "w", key=name)
    samples = sample_problems(problems, ctx, n=n, params=params, batch_size=4)
    return samples, ctx.stats


SAMPLED = GenParams(max_new_tokens=12, temperature=0.8, top_p=0.95)


def test_a_larger_run_decodes_only_the_problems_an_earlier_run_did_not(tmp_path, decoded):
    first, st1 = _sample(tmp_path, "a", PROBLEMS[:5], SAMPLED)
    assert len(decoded) == 5 and "from_sample_cache" not in st1
    decoded.clear()
    second, st2 = _sample(tmp_path, "b", PROBLEMS, SAMPLED)
    assert st2["from_sample_cache"] == 5 and st2["samples"] == 36
    old = [f"What is {i} + {i}?" for i in range(5)]
    assert len(decoded) == 7 and not [p for p in decoded if any(q in p for q in old)]
    assert [s.model_dump() for s in second[:15]] == [s.model_dump() for s in first]
    # the cached problems' samples are the ones decoding them again gives (the fake engine is deterministic)
    decoded.clear()
    fresh, _ = _sample(tmp_path, "c", PROBLEMS, SAMPLED, "sample_cache=false")
    assert len(decoded) == 12 and [s.model_dump() for s in fresh] == [s.model_dump() for s in second]


def test_the_request_decides_reuse_settings_seed_and_model(tmp_path, decoded):
    _sample(tmp_path, "a", PROBLEMS[:4], SAMPLED)
    decoded.clear()
    _, st = _sample(tmp_path, "b", PROBLEMS[:4], GenParams(max_new_tokens=12, temperature=0.5, top_p=0.95))
    assert len(decoded) == 4 and "from_sample_cache" not in st  # other settings
    decoded.clear()
    _, st = _sample(tmp_path, "c", PROBLEMS[:4], SAMPLED, seed=1)
    assert len(decoded) == 4 and "from_sample_cache" not in st  # another seed draws other samples
    decoded.clear()
    _, st = _sample(tmp_path, "d", PROBLEMS[:4], SAMPLED, n=2)
    assert len(decoded) == 4  # fewer samples per problem is another request
    decoded.clear()
    _, st = _sample(tmp_path, "e", PROBLEMS[:4], SAMPLED, "system_prompt=Be brief.")
    assert len(decoded) == 4  # another prompt
    greedy = GenParams(max_new_tokens=12)
    _sample(tmp_path, "f", PROBLEMS[:4], greedy, n=1)
    decoded.clear()
    _, st = _sample(tmp_path, "g", PROBLEMS[:4], greedy, n=1, seed=7)
    assert decoded == [] and st["from_sample_cache"] == 4  # greedy answers do not depend on the seed


def test_an_unreadable_cache_file_is_decoded_again(tmp_path, decoded):
    first, _ = _sample(tmp_path, "a", PROBLEMS[:3], SAMPLED)
    files = sorted((tmp_path / "cache" / "samples").glob("*/*.json"))
    assert len(files) == 3
    entry = json.loads(files[0].read_text())
    assert entry["request"]["n"] == 3 and len(entry["completions"]) == 3
    files[0].write_text('{"completions": [')  # torn
    decoded.clear()
    again, st = _sample(tmp_path, "b", PROBLEMS[:3], SAMPLED)
    assert len(decoded) == 1 and st["from_sample_cache"] == 2
    assert [s.model_dump() for s in again] == [s.model_dump() for s in first]
    assert json.loads(files[0].read_text())["completions"]  # rewritten whole


def test_exported_samples_fill_another_machines_cache_and_a_bad_file_adds_nothing(tmp_path, decoded):
    from conftest import run_cli

    first, _ = _sample(tmp_path, "a", PROBLEMS[:4], SAMPLED)
    src = tmp_path / "cache"
    dump = tmp_path / "cots.jsonl.gz"
    out = run_cli(["samples", "export", str(dump), "--cache-dir", str(src), "--model", "smollm2"])
    assert out.returncode == 0 and "wrote 4 " in out.stdout, out.stderr
    assert run_cli(["samples", "export", str(tmp_path / "none.jsonl"), "--cache-dir", str(src), "--model",
                    "no-such-model"]).stdout.startswith("wrote 0 ")
    # "another machine": an empty cache, filled by import; its run decodes nothing and gets the same samples
    other = tmp_path / "other"
    out = run_cli(["samples", "import", str(dump), "--cache-dir", str(other / "cache")])
    assert out.returncode == 0 and "added 4 " in out.stdout and "(0 already there)" in out.stdout, out.stderr
    decoded.clear()
    again, st = _sample(other, "b", PROBLEMS[:4], SAMPLED)
    assert decoded == [] and st["from_sample_cache"] == 4
    assert [s.model_dump() for s in again] == [s.model_dump() for s in first]
    assert "added 0 " in run_cli(["samples", "import", str(dump), "--cache-dir", str(other / "cache")]).stdout
    # an edited request no longer hashes to its key: refused with its line, and the sound lines before it are not added
    lines = gzip.decompress(dump.read_bytes()).decode().splitlines()
    bad = json.loads(lines[2])
    bad["request"]["prompt"] += " (edited)"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([*lines[:2], json.dumps(bad), lines[3]]) + "\n")
    out = run_cli(["samples", "import", str(edited), "--cache-dir", str(tmp_path / "third")])
    assert out.returncode != 0 and "line 3" in out.stderr and "nothing was imported" in out.stderr
    assert not list((tmp_path / "third").rglob("*.json"))
    missing = dict(json.loads(lines[0]), completions=[])
    edited.write_text(json.dumps(missing) + "\n")
    out = run_cli(["samples", "import", str(edited), "--cache-dir", str(tmp_path / "third")])
    assert out.returncode != 0 and "asks for 3 completions and it has 0" in out.stderr
    edited.write_bytes(b"\x1f\x8b not gzip")
    out = run_cli(["samples", "import", str(edited), "--cache-dir", str(tmp_path / "third")])
    assert out.returncode != 0 and "not a sample export" in out.stderr


def test_the_committed_gsm8k_cots_import_for_the_embedded_default(tmp_path):
    """studies/samples holds the default model's greedy GSM8K train answers (docs/tokenskip.md): they must stay
    importable (a change of the key format makes this fail: re-export them) and be what their requests say."""
    from thinkpress.core.datasets import load_gsm8k
    from thinkpress.core.models import model_identity
    from thinkpress.core.store import SampleCache

    src = Path(__file__).parents[2] / "studies" / "samples" / "qwen2.5-coder-0.5b-gsm8k-train320-greedy.jsonl.gz"
    cache = SampleCache(tmp_path / "samples")
    assert cache.import_file(src) == (320, 0)
    entries = list(cache.entries())
    train = {p.question for p in load_gsm8k("train")}
    for e in entries:
        req = e["request"]
        assert req["model"] == model_identity("qwen2.5-coder-0.5b") and req["engine"] == "vllm"
        assert req["params"]["temperature"] == 0.0 and req["seed"] is None and len(e["completions"]) == 1
        question = req["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert question in train
    # the first 320 of the seeded shuffle, as `train_data: {name: gsm8k, limit: 320, shuffle: true}` loads them
    first = {p.question for p in load_gsm8k("train", limit=320, shuffle=True, seed=0)}
    assert {e["request"]["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for e in entries} == first


def test_import_notes_samples_this_machine_would_not_reuse():
    """Sample keys hold the engine and dtype: bf16 samples are not reused on a CPU where dtype auto means fp32.
    The import says so, with the --set that makes a run reuse them."""
    from thinkpress.core.cli import _foreign_samples_note
    from thinkpress.core.config import build_config

    here = build_config(sets=["engine=auto", "dtype=auto"])
    mine = {"engine": here.engine, "dtype": here.dtype}
    assert _foreign_samples_note([mine, mine]) is None
    other_dtype = "float16" if here.dtype != "float16" else "float32"
    note = _foreign_samples_note([mine, {**mine, "dtype": other_dtype}, {"engine": "fake", "dtype": here.dtype}])
    lines = note.splitlines()
    assert len(lines) == 2
    assert any(f"1 of them were decoded with engine {here.engine!r} in {other_dtype}" in ln
               and ln.endswith(f"only with --set dtype={other_dtype}") for ln in lines)
    assert any(ln.endswith("only with --set engine=fake") for ln in lines)
