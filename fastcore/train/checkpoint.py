"""Checkpoints: written atomically, the last K kept, loaded with ``weights_only=True``."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fastcore.files import write_atomic

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the run; the message names the file."""


def describe(exc: Exception) -> str:
    """``Type: first line of the message``: an exception quoted inside a one-line error."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (temporary files are not listed)."""
    d = Path(directory)
    found = [(int(m.group(1)), p) for p in d.glob("step_*.pt") if (m := _NAME.match(p.name))] if d.is_dir() else []
    return [p for _, p in sorted(found)]


def save(directory: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as ``directory/step_<step>.pt``: to a temporary file, flushed to disk, then
    renamed, so an interrupted write leaves the previous checkpoints as they were. Keeps the last ``keep``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".step_*.pt.tmp-*"):  # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    path = d / f"step_{step:08d}.pt"
    write_atomic(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))
    fd = os.open(d, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike) -> dict:
    """A checkpoint's contents, on the CPU; ``CheckpointError`` naming the file when it is unreadable."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, not a torch file, or holding disallowed objects
        raise CheckpointError(f"checkpoint {path} cannot be read ({describe(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fastcore checkpoint of format {FORMAT}")
    return state


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory (``DIR/ckpt``) or checkpoint directory."""
    p = Path(path)
    if p.is_file():
        return p
    for d in (p / "ckpt", p):
        found = checkpoints(d)
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint found at {p} (expected a step_*.pt file or a run directory)")
