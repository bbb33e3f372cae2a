"""Crash-safe writes: the final name holds a complete old or new copy, never a partial one."""

import pytest

from thinkpress.core.files import atomic_dir, atomic_file, atomic_write_json


def test_a_failed_file_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write('{"v": 2, "half": ')
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_file(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_dir(dest) as d:
        (d / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dest) as d:
        (d / "weights").write_text("new, half written")
        raise RuntimeError("killed mid-save")
    assert (dest / "weights").read_text() == "old"
    with atomic_dir(dest) as d:
        (d / "weights").write_text("new")
        (d / "step.json").write_text("{}")
    assert sorted(p.name for p in dest.iterdir()) == ["step.json", "weights"]
    assert (dest / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp or old copy left behind
