"""Atomic writes: a failed write leaves the old file intact and no temporary file behind."""

import numpy as np
import pytest

from oodcore.store.atomic import atomic_open, load_npz, read_json, write_json, write_npz


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as fh:
            fh.write('{"v": 2')  # half a file...
            raise RuntimeError("killed mid-write")
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_npz_round_trip_refuses_pickles(tmp_path):
    write_npz(tmp_path / "x.npz", {"a": np.arange(3), "s": np.asarray(["p/q.jpg"])})
    out = load_npz(tmp_path / "x.npz")
    assert out["a"].tolist() == [0, 1, 2] and out["s"].tolist() == ["p/q.jpg"]
    with pytest.raises(TypeError, match="no pickles"):
        write_npz(tmp_path / "y.npz", {"o": np.asarray([{"a": 1}], dtype=object)})
    assert not (tmp_path / "y.npz").exists()


def test_files_are_readable_by_others(tmp_path):
    write_json(tmp_path / "r.json", {})
    assert (tmp_path / "r.json").stat().st_mode & 0o044  # not mkstemp's 0600
