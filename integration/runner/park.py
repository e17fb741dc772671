"""Unfinished runs parked in the repository: a fresh machine loses no finished round.

A study (docs/experiments.md) needs more hours than one machine is held, and a fresh machine
starts with an empty output folder. :func:`park_run` copies an unfinished run's checkpoint into
a folder that is committed; :func:`unpark_run` puts it back where the run looks for it, so that
the run resumes from the parked round instead of round 0. ``glora experiment CONFIG --park DIR``
and ``--unpark DIR`` do this for every run of a cell (:mod:`integration.runner.experiment`).

A parked tensor file is LZMA-compressed. Nothing is written before it is checked: the
manifest's digest (and its HMAC under ``GLORA_CHECKPOINT_KEY``), the tensors' SHA-256, and
the run's settings (a checkpoint made with other settings, or past the rounds asked for, is
not this run's). Files are replaced as a run writes its checkpoints: the tensors first, then
the manifest that points at them, then the older tensors, so that a kill at any point leaves
a whole checkpoint; one park at a time writes a cell's parking folder.
"""

from __future__ import annotations

import hashlib
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glora_math.errors import GloraError

from .checkpoint import CheckpointError, parse_manifest
from .config import SimConfig, differences
from .files import FolderInUseError, held, write_atomic

_MANIFEST = "checkpoint.json"
_RESULTS = "results.json"
#: A parked tensor file is LZMA-compressed: clients that hold the same broadcast adapter
#: make most of a checkpoint repeat itself (a study F checkpoint: 3.3 MB, 0.22 MB packed).
_PACKED = ".xz"
#: The most a parked tensor file may decompress to (a bomb is refused, not expanded).
_MAX_BYTES = 1 << 31


class ParkError(GloraError):
    """A parked copy, or a run's checkpoint restored from one, that could not be written."""


@dataclass(frozen=True)
class _Checkpoint:
    """A checkpoint read whole and checked: its manifest's bytes and fields, its tensors."""

    manifest: bytes
    meta: dict[str, Any]
    tensors: bytes

    @property
    def round(self) -> int:
        return int(self.meta["round"])


def _load(path: Path) -> bytes:
    """The bytes of ``path`` (one place to read a tensor file, so tests can interleave)."""
    return path.read_bytes()


def _read(folder: Path) -> _Checkpoint | None:
    """``folder``'s checkpoint, packed or not, checked (None without a manifest).

    Raises
    ------
    CheckpointError
        A manifest that is damaged, edited or unsigned under the key; tensors that do not
        decompress or do not match its SHA-256 (each names the file).
    FileNotFoundError
        If the tensor file it names is gone (a run that wrote its next round meanwhile).
    """
    path = folder / _MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    meta = parse_manifest(raw, path)
    name = str(meta["tensors"])
    packed = folder / (name + _PACKED)
    where = packed if packed.is_file() else folder / name
    if where == packed:
        unpack = lzma.LZMADecompressor()
        try:
            data = unpack.decompress(_load(packed), max_length=_MAX_BYTES)
        except lzma.LZMAError as err:
            raise CheckpointError(f"{packed} is damaged: {err}") from None
        if not unpack.eof:
            raise CheckpointError(f"{packed} is damaged or decompresses past {_MAX_BYTES} bytes")
    else:
        data = _load(where)
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{where} does not match the SHA-256 in {path} (damaged or edited)")
    return _Checkpoint(raw, meta, data)


def _other_run(meta: dict[str, Any], cfg: SimConfig) -> str | None:
    """Why a checkpoint is not ``cfg``'s run (None: it is): other settings, or past its rounds."""
    diff = differences(meta["config"], cfg, ignore=("rounds",))
    if diff:
        return f"made with other settings: {'; '.join(diff[:3])}"
    if int(meta["round"]) > cfg.rounds:
        return f"at round {meta['round']}, past the {cfg.rounds} rounds asked for"
    return None


def _write(folder: Path, ckpt: _Checkpoint, *, pack: bool) -> None:
    """Write ``ckpt`` into ``folder`` as a run writes: tensors, manifest, then older tensors."""
    name = str(ckpt.meta["tensors"]) + (_PACKED if pack else "")
    data = lzma.compress(ckpt.tensors) if pack else ckpt.tensors
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / name, lambda tmp: tmp.write_bytes(data))
        write_atomic(folder / _MANIFEST, lambda tmp: tmp.write_bytes(ckpt.manifest))
        for old in folder.glob("checkpoint-*.safetensors*"):
            if old.name != name and not old.name.startswith("."):
                old.unlink()
    except OSError as err:
        raise ParkError(f"cannot write the checkpoint into {folder}: {err}") from None


def forget_parked(dest: Path) -> bool:
    """Remove the parked copy ``dest`` of a run that has finished (True if there was one)."""
    if not dest.is_dir():
        return False
    with held(dest.parent, wait=True):
        return _forget(dest)


def _forget(dest: Path) -> bool:
    """:func:`forget_parked` once the cell's parking folder is held."""
    files = [p for p in (dest / _MANIFEST, *dest.glob("checkpoint-*")) if p.is_file()]
    for p in files:  # the manifest first: what is left is no checkpoint, never a wrong one
        p.unlink()
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    return bool(files)


def parked_round(parked: Path, cfg: SimConfig) -> int:
    """The round a run of ``cfg`` would resume from ``parked`` (0: nothing usable there)."""
    try:
        ckpt = _read(parked)
    except (CheckpointError, OSError):
        return 0
    return 0 if ckpt is None or _other_run(ckpt.meta, cfg) else ckpt.round


def park_run(run: Path, dest: Path, cfg: SimConfig) -> str | None:
    """Park the checkpoint of ``cfg``'s run (in ``run``) in ``dest``, if it is later.

    A finished run (its ``results.json`` written) has its parked copy removed instead. A
    parked copy is replaced by a later round of the run, or when it is damaged or not this
    run's; never by an earlier round. Returns a line saying what changed (None: nothing did).

    Raises
    ------
    CheckpointError
        If the run's own checkpoint is damaged or edited (named); nothing of it is parked.
    ParkError
        If the parked copy cannot be written.
    """
    finished = (run / _RESULTS).is_file()
    if not (dest / _MANIFEST).is_file() and (finished or not (run / _MANIFEST).is_file()):
        return None  # nothing to park or remove (and no empty folder made)
    with held(dest.parent, wait=True):  # one park at a time per cell: no round goes back
        if finished:
            removed = _forget(dest)
            return f"{run.name}: finished; its parked checkpoint removed" if removed else None
        return _park_held(run, dest, cfg)


def _read_settled(folder: Path) -> _Checkpoint | None:
    """:func:`_read` of a run's folder, once more if its tensor file went meanwhile.

    A run that writes its next round between the reads of its manifest and of its tensors
    removes the file the first manifest named; the second read finds the new round whole.

    Raises
    ------
    CheckpointError
        If the manifest names a tensor file that is still missing (a damaged checkpoint).
    """
    try:
        return _read(folder)
    except FileNotFoundError:
        pass
    try:
        return _read(folder)
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder / _MANIFEST} points at {err.filename}, which is "
                              "missing") from None  # fmt: skip


def _park_held(run: Path, dest: Path, cfg: SimConfig) -> str | None:
    """:func:`park_run` once the cell's parking folder is held."""
    mine = _read_settled(run)
    if mine is None:
        return None
    why = _other_run(mine.meta, cfg)
    if why:
        return f"{run.name}: its checkpoint was {why}; not parked"
    try:
        there = _read(dest)
        stale = None if there is None else _other_run(there.meta, cfg)
    except (CheckpointError, OSError) as err:
        there, stale = None, f"damaged ({err})"
    if there is not None and stale is None and mine.round <= there.round:
        if mine.round == there.round:
            return None
        return (f"{run.name}: round {mine.round} here, round {there.round} parked; "
                "the parked one kept")  # fmt: skip
    _write(dest, mine, pack=True)
    note = f" (the parked copy was {stale}; replaced)" if stale else ""
    return f"{run.name}: round {mine.round} parked{note}"


def unpark_run(parked: Path, run: Path, cfg: SimConfig) -> str | None:
    """Put the checkpoint parked in ``parked`` into ``run`` if it is ``cfg``'s and further.

    A run that has finished, is running (its folder is held by another process), or has
    reached the parked round is left as it is; so is the run when the parked copy is damaged,
    unsigned under ``GLORA_CHECKPOINT_KEY`` or not this run's (the line says why, and the run
    goes on from its own folder: a long queue is not stopped by one parked file). Returns a
    line saying what was done (None: nothing is parked, or the run has finished).

    Raises
    ------
    ParkError
        If the checkpoint cannot be written into ``run``.
    """
    if not (parked / _MANIFEST).is_file() or (run / _RESULTS).is_file():
        return None
    try:
        with held(parked.parent, wait=True):  # not while a park replaces it
            there = _read(parked)
    except (CheckpointError, OSError) as err:
        return f"{run.name}: the parked checkpoint is refused ({err}); the run goes on from its own"
    why = None if there is None else _other_run(there.meta, cfg)
    if there is None or why:
        return None if there is None else f"{run.name}: the parked checkpoint was {why}; left"
    try:
        with held(run, wait=False):
            try:
                mine = _read(run)
                here = 0 if mine is None else mine.round
            except (CheckpointError, OSError):
                here = -1  # damaged here: the checked parked copy replaces it
            if here >= there.round:
                return f"{run.name}: round {here} here, round {there.round} parked; left as it is"
            _write(run, there, pack=False)
            return f"{run.name}: round {there.round} unparked from {parked}"
    except FolderInUseError:
        return f"{run.name}: in use by another process; left as it is"


__all__ = ["ParkError", "forget_parked", "park_run", "parked_round", "unpark_run"]
