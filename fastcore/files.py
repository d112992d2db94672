"""Files written so that an interruption (a kill, a full disk) never leaves a half-written one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, flush it to disk, then rename it onto ``path``:
    readers see the old file or the new one, never part of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
