"""Atomic writes: an output file is either complete or absent, never half-written.

Each writer writes a temporary file beside the target (same folder, so the same filesystem), then
`os.replace`s it over the target, which POSIX and Windows do in one step. An interrupted or failed
run leaves the old file (or none) and no temporary behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)`, then rename the temporary over `path`. The temporary keeps `path`'s
    suffix, so writers that choose a format by extension (PIL, matplotlib) choose the same one."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file name to write to (e.g. {path / 'out.png'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary behind
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text))
