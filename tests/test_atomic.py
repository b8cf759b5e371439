"""Atomic writes: complete or absent."""

from __future__ import annotations

import pytest

from autoseg.atomic import TMP_PREFIX, atomic_path


def test_success_renames(tmp_path):
    target = tmp_path / "a.json"
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(TMP_PREFIX) and tmp.name.endswith("-a.json") and tmp.parent == tmp_path
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
