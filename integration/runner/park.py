"""Unfinished runs parked in the repository: a fresh machine loses no finished round.

A study (docs/experiments.md) needs more hours than one machine is held, and a fresh machine
starts with an empty output folder. :func:`park_run` copies an unfinished run's checkpoint into
a folder that is committed; :func:`unpark_run` puts it back where the run looks for it, so that
the run resumes from the parked round instead of round 0. ``glora experiment CONFIG --park DIR``
and ``--unpark DIR`` do this for every run of a cell (:mod:`integration.runner.experiment`).

A parked tensor file is LZMA-compressed. Both directions check the manifest's digest and the
tensors' SHA-256 before anything is kept, so a checkpoint caught in the middle of a write is
left for the next park and a damaged parked copy is refused by name. The resumed run then
checks the configuration against its own, as it does for any checkpoint.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, _read_manifest
from .files import FolderInUseError, held

_MANIFEST = "checkpoint.json"
#: A parked tensor file is LZMA-compressed: clients that hold the same broadcast adapter
#: make most of a checkpoint repeat itself (a study F checkpoint: 3.3 MB, 0.22 MB packed).
_PACKED = ".xz"
_TMP = ".park-"


def _tensors(folder: Path, meta: dict[str, Any]) -> bytes:
    """The checked bytes of the tensor file ``meta`` names in ``folder`` (packed or not).

    Raises
    ------
    CheckpointError
        If the file does not decompress or does not match the manifest's SHA-256.
    OSError
        If it is missing (a run that moved on to its next round removes its old file).
    """
    name = str(meta["tensors"])
    packed = folder / (name + _PACKED)
    where = packed if packed.is_file() else folder / name
    try:
        data = lzma.decompress(packed.read_bytes()) if packed.is_file() else where.read_bytes()
    except lzma.LZMAError as err:
        raise CheckpointError(f"{where} is damaged: {err}") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{where} does not match the SHA-256 in {folder / _MANIFEST} "
                              "(damaged or edited)")  # fmt: skip
    return data


def _round(folder: Path) -> int:
    """The round of ``folder``'s verified checkpoint, packed or not (0 without one).

    Raises
    ------
    CheckpointError
        If the checkpoint is damaged or edited, or its tensor file is missing (named).
    """
    if not (folder / _MANIFEST).is_file():
        return 0
    meta = _read_manifest(folder / _MANIFEST)
    try:
        _tensors(folder, meta)
    except OSError:
        raise CheckpointError(f"{folder / _MANIFEST} points at {meta['tensors']}, which is "
                              "missing") from None  # fmt: skip
    return int(meta["round"])


def _copy_checkpoint(src: Path, dest: Path, *, pack: bool) -> int | None:
    """Copy ``src``'s checkpoint into the new folder ``dest`` (``pack``: compressed), checked.

    The manifest is copied first, then the tensor file it names, checked against it. Returns
    the copy's round, or None when ``src`` moved on to its next round between the two copies
    (``dest`` is removed; the next call finds the checkpoint whole).

    Raises
    ------
    CheckpointError
        If ``src``'s checkpoint itself is damaged or edited.
    """
    dest.mkdir(parents=True)
    try:
        shutil.copy2(src / _MANIFEST, dest / _MANIFEST)
        meta = _read_manifest(dest / _MANIFEST)
        data = _tensors(src, meta)
        name = str(meta["tensors"])
        if pack:
            (dest / (name + _PACKED)).write_bytes(lzma.compress(data))
        else:
            (dest / name).write_bytes(data)
        return int(meta["round"])
    except (OSError, CheckpointError):
        shutil.rmtree(dest, ignore_errors=True)
        _round(src)  # a damaged source is said by name
        return None


def forget_parked(dest: Path) -> bool:
    """Remove the parked copy ``dest`` of a run that has finished (True if there was one)."""
    if not dest.exists():
        return False
    shutil.rmtree(dest)
    return True


def park_run(run: Path, dest: Path) -> str | None:
    """Park ``run``'s checkpoint in ``dest`` if it is later than the one parked there.

    A finished run (its ``results.json`` written) has its parked copy removed instead. Returns
    a line saying what changed, or None if nothing did (no checkpoint, or the same round).

    Raises
    ------
    CheckpointError
        If ``run``'s own checkpoint is damaged or edited (named); nothing of it is parked.
    """
    if (run / "results.json").is_file():
        return (
            f"{run.name}: finished; its parked checkpoint removed" if forget_parked(dest) else None
        )
    if not (run / _MANIFEST).is_file():
        return None
    try:
        parked = _round(dest)
    except CheckpointError:
        parked = -1  # a damaged parked copy: the run's own checkpoint replaces it
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP, dir=dest.parent))
    try:
        got = _copy_checkpoint(run, tmp / "new", pack=True)
        if got is None:
            return f"{run.name}: being written; left for the next park"
        if got < parked:
            return f"{run.name}: round {got} here, round {parked} parked; the parked one kept"
        if got == parked:
            return None
        if dest.exists():
            dest.rename(tmp / "old")
        (tmp / "new").rename(dest)
        return f"{run.name}: round {got} parked"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpark_run(parked: Path, run: Path) -> str | None:
    """Put the checkpoint parked in ``parked`` into ``run`` if ``run`` is behind it.

    A run that has finished, is running (its folder is held), or has reached the parked round
    is left as it is. Returns a line saying what was done, or None if nothing is parked.

    Raises
    ------
    CheckpointError
        If the parked checkpoint is damaged or edited (named); nothing of it is copied.
    """
    if not (parked / _MANIFEST).is_file() or (run / "results.json").is_file():
        return None
    want = _round(parked)
    try:
        with held(run, wait=False):
            try:
                here = _round(run)
            except CheckpointError:
                here = -1  # damaged here: the verified parked copy replaces it
            if here >= want:
                return f"{run.name}: round {here} here, round {want} parked; left as it is"
            tmp = Path(tempfile.mkdtemp(prefix=_TMP, dir=run))
            try:
                got = _copy_checkpoint(parked, tmp / "new", pack=False)
                if got is None:  # pragma: no cover - nothing writes a parked folder
                    raise CheckpointError(f"{parked} changed while it was copied")
                name = f"checkpoint-{got}.safetensors"
                # the tensors first, then the manifest that points at them (as written)
                (tmp / "new" / name).replace(run / name)
                (tmp / "new" / _MANIFEST).replace(run / _MANIFEST)
                for old in run.glob("checkpoint-*.safetensors"):
                    if old.name != name:
                        old.unlink()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return f"{run.name}: round {got} unparked from {parked}"
    except FolderInUseError:
        return f"{run.name}: in use by another process; left as it is"


__all__ = ["forget_parked", "park_run", "unpark_run"]
