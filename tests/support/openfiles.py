"""Which files a process holds open, deleted and unnamed ones included (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path


def open_descriptors_under(directory: Path, pid: int | str = "self") -> dict[int, str]:
    """Descriptors of process ``pid`` open on files under ``directory``, with their paths:
    an unnamed temporary file shows as ``DIRECTORY/#INODE (deleted)``."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile (the descriptor listdir itself used)
            continue
        if target.startswith(str(directory)):
            found[int(fd)] = target
    return found


def open_files_under(directory: Path, pid: int | str = "self") -> list[str]:
    """The paths of the files process ``pid`` holds open under ``directory``."""
    return list(open_descriptors_under(directory, pid).values())
