"""Writing files so that a crash or a full disk never leaves half of one."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) via a temporary file and a rename; return ``path``.

    A reader never sees half a file, and a failed write (a full disk, no permission)
    removes the temporary file and leaves the previous file as it was. A path that is
    not a regular file (a device such as ``/dev/stdout``, a pipe) is written directly:
    renaming over it would replace it.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(path.stat().st_mode):
            path.write_text(text, encoding="utf-8")
            return path
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path
