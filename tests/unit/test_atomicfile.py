"""The one way tunvpn replaces a file: whole, with its mode, and nothing left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from tunvpn.io.atomicfile import TEMP_SUFFIX, replace_file, temp_prefix


@pytest.mark.parametrize("durable", [True, False])
def test_the_new_content_replaces_the_old_with_the_mode_asked_for(tmp_path, durable):
    target = tmp_path / "state.json"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        replace_file(target, b"new", 0o644, durable=durable)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not what the umask would give
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "invites.json"
    target.write_text("old")

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        replace_file(target, b"new", 0o600)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["invites.json"]


def test_temporaries_are_named_for_a_cleanup(tmp_path):
    assert temp_prefix(tmp_path / "state.json") == ".state.json."
    assert TEMP_SUFFIX == ".tmp"
