"""Files replaced whole: whoever reads one sees the old content or the new, never a mix.

The state file, the invites, the enrolled peers' files and the metrics file are all written
this way (a temporary file beside the target, then a rename over it)."""

from __future__ import annotations

import os
import tempfile


def temp_prefix(path: str | os.PathLike[str]) -> str:
    """How the temporary files for `path` begin (they end in TEMP_SUFFIX), for a cleanup."""
    return f".{os.path.basename(path)}."


TEMP_SUFFIX = ".tmp"


def replace_file(path: str | os.PathLike[str], data: bytes, mode: int, *, durable: bool = True) -> None:
    """Put `data` at `path` with `mode`, whatever the umask; `durable` also fsyncs the data and
    the rename, so a crash right after leaves the new file (metrics need not be)."""
    directory = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        unlink_quietly(temp)
        raise
    if durable:
        fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename or an unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
