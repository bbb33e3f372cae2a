import pytest

from thinkpress.core.data import Problem
from thinkpress.core.errors import RunStoreError
from thinkpress.core.store import Journal, RunStore, resumable_map


def _items(n):
    return [Problem(id=f"p{i}", question="q", answer=str(i)) for i in range(n)]


def test_resumable_map_resumes_after_last_chunk_without_duplicates(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    calls = []

    def fn(chunk):
        calls.append([p.id for p in chunk])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while working on the third chunk
        return chunk

    with pytest.raises(KeyboardInterrupt):
        resumable_map(journal, _items(7), fn, chunk_size=2, item_id=lambda p: p.id)
    assert calls == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    calls.clear()
    out, reused = resumable_map(journal, _items(7), lambda c: c, chunk_size=2, item_id=lambda p: p.id)
    assert reused == 2
    assert [r["id"] for r in out] == [f"p{i}" for i in range(7)]


def test_journal_ignores_and_truncates_a_torn_last_line(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append("a", [{"x": 1}])
    with open(j.path, "a") as f:
        f.write('{"chunk": "b", "records": [{"x"')  # killed mid-write
    assert j.load() == {"a": [{"x": 1}]}
    j.append("c", [{"x": 3}])
    assert j.load() == {"a": [{"x": 1}], "c": [{"x": 3}]}


def test_run_dir_of_a_different_config_is_never_reused(tmp_path):
    store = RunStore(tmp_path / "run", tmp_path / "cache")
    assert store.claim("seed: 1\n", "h1") is False
    (tmp_path / "run" / "keep.txt").write_text("finished work")
    assert store.claim("seed: 1\n", "h1") is True  # same config: resume
    with pytest.raises(RunStoreError, match="different config"):
        store.claim("seed: 2\n", "h2")
    assert (tmp_path / "run" / "keep.txt").exists()
    assert store.claim("seed: 2\n", "h2", overwrite=True) is False
    assert not (tmp_path / "run" / "keep.txt").exists()


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunStoreError, match="not a thinkpress run"):
        RunStore(tmp_path / "run", tmp_path / "c").claim("x", "h")
