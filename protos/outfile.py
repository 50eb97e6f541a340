"""Output files (``--save``, ``ps-export --out``): written whole or not at all, and never
in place of something that is not a regular file.

A file is written as a new one beside the path, then renamed over it; a rename
replaces whatever the path names, so a path naming a device (``/dev/null``),
a FIFO, a socket, a directory or a symbolic link is refused instead, in one
line, before any work (``check``) and again just before the rename.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class OutFileError(OSError):
    """An output path that must not be written; the message says why, in one line."""


def check(path: Path, what: str) -> None:
    """OutFileError when ``path`` exists and is not a regular file (a symbolic link is
    refused too, whatever it points at: the rename would replace the link); ``what``
    names the flag in the message."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
    raise OutFileError(f"{what} {path}: is {kind}; give the path of a regular file or of none yet")


def write(path: Path, what: str, writer: Callable[[str], None]) -> None:
    """``writer(tmp)`` writes the file at a new path beside ``path``; then it replaces
    ``path``, which is checked (``check``) before and again just before the rename."""
    check(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # ours, and new
    try:
        writer(str(tmp))
        check(path, what)  # the writing took time: the path may name something else now
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
