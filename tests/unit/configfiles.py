"""Writing config files in tests: text by lines, files with an exact mode; users and groups as errors name them."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)  # after writing: the umask must not decide the test
    return path


def conf(*lines: str) -> str:
    """One argument per line, so a case's line numbers can be read off its position."""
    return "\n".join(lines) + "\n"


def user_name(uid: int) -> str:
    """A user as config errors name it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    """A group as config errors name it."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def own_group() -> str:
    """The group of the files this process makes: the daemon's own group, unless a test says otherwise."""
    return group_name(os.getegid())
