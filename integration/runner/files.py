"""Files that several processes read and write: replaced whole, and folders held by one writer.

Every result file of the runner and of the Flower app (raw per-run JSON, tables, plots,
``results.json``, checkpoints) is written with :func:`write_atomic`, so a reader sees the old
file or the new one and never a part. :func:`held` serialises the writers of one folder (the
two chains of an experiment cell rebuild the same table) and lets a run refuse a run folder
that another live process is using; :func:`busy` asks whether one is held, without waiting.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from glora_math.errors import GloraError

if sys.platform != "win32":  # POSIX locks; on Windows nothing is locked (see ``held``)
    import fcntl


class FolderInUseError(GloraError):
    """The folder is held: by another live process, or already by this one."""


#: The folders this process holds now (``held`` is not re-entrant: a second hold would wait
#: for itself forever, so it is refused instead).
_HELD: set[Path] = set()


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` so that a reader sees the old file or the new one, never a part.

    ``write`` writes a temporary file beside ``path`` (a hidden name of this process and a
    random token, so two writers of one file never share it), which then replaces ``path``.
    A write that fails leaves ``path`` as it was and no temporary file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` of a text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


@contextmanager
def held(folder: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold ``folder`` (created if absent) against other processes that hold it.

    An advisory lock on the folder itself, released when the block ends or the process dies
    (nothing to clean up after a crash). ``wait=True`` waits for another holder to finish;
    ``wait=False`` raises :class:`FolderInUseError` at once instead. Not re-entrant: a process
    that holds a folder and asks for it again is refused (it would wait for itself). On
    Windows (no ``fcntl``) nothing is locked.

    Raises
    ------
    FolderInUseError
        If this process holds ``folder`` already, or (``wait=False``) another process does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        raise FolderInUseError(f"{folder} is held by this process already (a nested hold)")
    if sys.platform == "win32":  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise FolderInUseError(
                f"{folder} is in use by another process (a second run of the same run "
                "folder?); wait for it to finish, or run in another output folder"
            ) from None
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def busy(folder: Path) -> bool:
    """Whether another process holds ``folder`` now (never waits, creates nothing).

    False for a folder that does not exist. On Windows (where nothing is locked) only a
    folder this process holds is busy.
    """
    if not folder.is_dir():
        return False
    try:
        with held(folder, wait=False):  # a probe: released at once
            return False
    except FolderInUseError:
        return True


__all__ = ["FolderInUseError", "busy", "held", "write_atomic", "write_text_atomic"]
