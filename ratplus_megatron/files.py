"""Writing files so that a killed run never leaves half of one (results, reports, data, checkpoint markers)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    """``write(file)`` into a temp file of its own beside ``path``, synced, then renamed into place:
    readers see the old file or the new one, and two processes writing the same file (the shards
    of one NIAH run finishing together) do not mix. The file gets the usual umask permissions
    (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
