"""`macprovider.core.files.write_atomic`: the one atomic file writer (config --apply, service files, the workload
record, the runtime-baseline cache)."""

from __future__ import annotations

import errno
import os

import pytest

from macprovider.core import files


def test_write_atomic_replaces_the_file_with_the_mode(tmp_path):
    (tmp_path / "dir").mkdir()
    target = tmp_path / "dir" / "config.yaml"
    target.write_bytes(b"old\n")
    files.write_atomic(target, b"new\n", 0o640)
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_write_atomic_removes_its_temp_file_on_error(tmp_path, monkeypatch, failing):
    (tmp_path / "dir").mkdir()
    target = tmp_path / "dir" / "config.yaml"
    target.write_bytes(b"old\n")

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, failing, full_disk)
    with pytest.raises(OSError) as raised:
        files.write_atomic(target, b"new\n")
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.yaml"]
