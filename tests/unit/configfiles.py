"""Writing config files in tests: text by lines, files with an exact mode."""

from __future__ import annotations

import os
from pathlib import Path


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)  # after writing: the umask must not decide the test
    return path


def conf(*lines: str) -> str:
    """One argument per line, so a case's line numbers can be read off its position."""
    return "\n".join(lines) + "\n"
