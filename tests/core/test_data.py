import pytest
from conftest import SHARED_DATA

from thinkpress.core.data import Sample, read_jsonl, write_jsonl
from thinkpress.core.datasets import load_arith, load_gsm8k, load_jsonl, load_math500
from thinkpress.core.errors import DataError
from thinkpress.core.evaluation import is_equivalent


def test_arith_is_seeded_exact_and_split():
    a, b = load_arith("train", limit=40), load_arith("train", limit=40)
    assert a == b
    assert load_arith("train", limit=40, seed=1) != a
    test_ids = {p.id for p in load_arith("test")}
    assert not test_ids & {p.id for p in load_arith("train")}
    assert {p.difficulty for p in a} == {1, 2, 3, 4}
    assert all(int(p.answer) >= 0 for p in a)
    # recompute one-step answers from the text: "X has A items. ... B ..." for additions
    for p in a:
        if p.difficulty == 1 and ("buys" in p.question or "finds" in p.question):
            nums = [int(t) for t in p.question.replace(".", " ").split() if t.isdigit()]
            assert int(p.answer) == nums[0] + nums[1]


def test_gsm8k_is_bundled_offline_and_sha256_checked(tmp_path, monkeypatch):
    from thinkpress.core import datasets

    g = load_gsm8k("test", limit=5)
    assert len(g) == 5 and g[0].answer == "18" and "####" in g[0].solution
    assert len(load_gsm8k("train")) == 6973 and len(load_gsm8k("test")) == 1319
    # a seeded subset: the same seed gives the same problems, another seed others
    a, b = load_gsm8k("test", limit=50, shuffle=True, seed=0), load_gsm8k("test", limit=50, shuffle=True, seed=0)
    assert a == b and a != load_gsm8k("test", limit=50, shuffle=True, seed=1)
    # a changed file is refused
    bad = tmp_path / "gsm8k"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    monkeypatch.setattr(datasets, "BUNDLED_DIR", tmp_path)
    with pytest.raises(DataError, match="sha256"):
        load_gsm8k("test")


def test_gsm8k_validation_is_carved_from_train_and_disjoint():
    train, val = load_gsm8k("train"), load_gsm8k("validation")
    assert len(val) == 500 and len(train) + len(val) == 7473
    ids_t, ids_v = {p.id for p in train}, {p.id for p in val}
    assert not ids_t & ids_v and all(i.startswith("gsm8k-train-") for i in ids_v)
    # the carve does not move with the run's seed; shuffling and limits act inside each split
    assert {p.id for p in load_gsm8k("validation", seed=3, shuffle=True)} == ids_v
    assert {p.id for p in load_gsm8k("train", limit=200, shuffle=True, seed=3)} <= ids_t
    with pytest.raises(DataError, match="validation"):
        load_gsm8k("dev")


@pytest.mark.skipif(not (SHARED_DATA / "math500").is_dir(), reason=f"no shared data folder at {SHARED_DATA}")
def test_gsm8k_and_math500_from_a_path():
    assert load_gsm8k("test", path=SHARED_DATA / "gsm8k") == load_gsm8k("test")
    m = load_math500("test", path=SHARED_DATA / "math500")
    assert len(m) == 500 and m[0].difficulty == 2 and is_equivalent("(3, \\frac{\\pi}{2})", m[0].answer)


def test_malformed_row_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: malformed JSONL row"):
        load_jsonl("test", path=tmp_path)
    stats = {}
    probs = load_jsonl("test", path=tmp_path, skip_invalid=True, stats=stats)
    assert [p.answer for p in probs] == ["2", "4"] and stats == {"skipped": 1}


def test_missing_field_and_missing_file(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "no answer here"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: invalid row \(KeyError"):
        load_gsm8k("test", path=f)
    with pytest.raises(DataError, match="not found"):
        load_gsm8k("test", path=tmp_path / "nope")


def test_jsonl_roundtrip_validates(tmp_path):
    s = Sample(problem_id="a", index=0, prompt="p", completion="c", n_tokens=1, finish_reason="eos")
    write_jsonl(tmp_path / "s.jsonl", [s])
    assert read_jsonl(tmp_path / "s.jsonl", Sample) == [s]
    (tmp_path / "s.jsonl").write_text('{"problem_id": "a"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:1: invalid Sample"):
        read_jsonl(tmp_path / "s.jsonl", Sample)
