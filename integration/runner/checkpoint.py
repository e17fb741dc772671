"""The runner's checkpoint manifest: its format, hashes, optional signature and checks.

``checkpoint.json`` names the tensor file and its SHA-256 and carries a digest of itself;
with ``GLORA_CHECKPOINT_KEY`` set, an HMAC of that digest too. :func:`_read_manifest` refuses
anything else: another format (no downgrade path), an edit, a path outside the run folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from glora_math.errors import GloraError

from ..federated.server import FederatedServer
from .files import write_atomic, write_text_atomic


class CheckpointError(GloraError):
    """A checkpoint that cannot be resumed: missing, damaged, edited or inconsistent."""


#: Checkpoints written with a manifest (SHA-256 of the tensors, digest of the JSON).
CHECKPOINT_FORMAT = 2
_TENSOR_FILE = re.compile(r"checkpoint-\d+\.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest without its digest and signature (which are made from it)."""
    body = {k: v for k, v in meta.items() if k not in ("digest", "hmac")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _signature(key: str, digest: str) -> str:
    """HMAC-SHA256 of a manifest's digest (which covers the tensors' SHA-256) under ``key``."""
    return hmac.new(key.encode(), digest.encode(), hashlib.sha256).hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    """The checked ``checkpoint.json``: parseable, self-consistent, paths inside the folder."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} is not readable JSON: {err}"[:300]) from None
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    """:func:`_read_manifest` of the bytes ``raw`` read from ``path`` (named in errors).

    Raises
    ------
    CheckpointError
        Unparseable, not a manifest, edited (digest), unsigned under ``GLORA_CHECKPOINT_KEY``,
        a tensor file name outside the folder, or round, metrics and file name that disagree.
    """
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON: {err}"[:300]) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a checkpoint manifest")
    missing = [k for k in ("round", "config", "metrics", "tensors") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    if meta.get("format") != CHECKPOINT_FORMAT:
        # No downgrade path: an older (or unknown) format has fewer checks, so it is refused.
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format', 1)!r} is not this version's "
            f"({CHECKPOINT_FORMAT}); start over in another --out"
        )
    if meta.get("digest") != _digest(meta):
        raise CheckpointError(f"{path} was edited or damaged (its digest does not match)")
    key = os.environ.get("GLORA_CHECKPOINT_KEY")
    if key:
        want = _signature(key, str(meta["digest"]))
        if not isinstance(meta.get("hmac"), str) or not hmac.compare_digest(meta["hmac"], want):
            raise CheckpointError(
                f"{path} is not signed with GLORA_CHECKPOINT_KEY (edited, or written without it)"
            )
    name = meta["tensors"]
    if not isinstance(name, str) or not _TENSOR_FILE.fullmatch(name):
        raise CheckpointError(f"{path}: tensor file {str(name)[:60]!r} is not a checkpoint "
                              "file inside the run folder")  # fmt: skip
    rnd, metrics = meta["round"], meta["metrics"]
    if (isinstance(rnd, bool) or not isinstance(rnd, int) or not isinstance(metrics, list)
            or rnd != len(metrics) or name != f"checkpoint-{rnd}.safetensors"
            or not isinstance(meta["config"], dict)):  # fmt: skip
        raise CheckpointError(f"{path}: round {rnd!r}, {type(metrics).__name__} metrics and "
                              f"tensor file {name!r} do not agree")  # fmt: skip
    return meta


def write_checkpoint(
    folder: Path, round_index: int, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> Path:
    """Write ``checkpoint-<round>.safetensors`` and its signed-if-keyed manifest, atomically.

    ``meta`` holds what else the manifest carries (at least ``config``, ``metrics`` and the
    ``server`` state meta); the tensors go first, then the JSON that points at them, and older
    tensor files are removed. Returns the manifest's path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{round_index}.safetensors"
    write_atomic(path, lambda tmp: save_file(dict(tensors), str(tmp)))
    manifest: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "round": round_index, **meta,
                                "tensors": path.name, "sha256": _sha256(path)}  # fmt: skip
    # The digest is of the manifest as it will be read back: JSON turns integer keys into
    # strings, and sorted string keys are not in numeric order.
    manifest = json.loads(json.dumps(manifest))
    manifest["digest"] = _digest(manifest)
    key = os.environ.get("GLORA_CHECKPOINT_KEY")
    if key:  # a signed manifest: an edit with recomputed hashes is refused on resume
        manifest["hmac"] = _signature(key, manifest["digest"])
    write_text_atomic(folder / "checkpoint.json", json.dumps(manifest, indent=2))
    for old in folder.glob("checkpoint-*.safetensors"):
        if old != path:
            old.unlink()
    return folder / "checkpoint.json"


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """The verified manifest and tensors of ``folder``'s checkpoint, or None if it has none.

    Raises
    ------
    CheckpointError
        Tensors without their manifest, a manifest or tensor file that is damaged or edited
        (digest, SHA-256, HMAC with ``GLORA_CHECKPOINT_KEY``), or an unreadable tensor file.
    """
    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        if any(folder.glob("checkpoint-*.safetensors")):
            raise CheckpointError(
                f"{folder} holds checkpoint tensors but no checkpoint.json: the checkpoint "
                "is damaged; remove the folder or use another output folder to start over"
            )
        return None
    meta = _read_manifest(meta_path)
    tensors = folder / meta["tensors"]
    if not tensors.is_file():
        raise CheckpointError(f"{meta_path} points at {tensors.name}, which is missing")
    if _sha256(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{tensors} does not match the SHA-256 in {meta_path} "
                              "(damaged or edited)")  # fmt: skip
    try:
        flat = load_file(str(tensors))
    except Exception as err:  # safetensors raises its own error type on damaged files
        raise CheckpointError(f"cannot read {tensors}: {err}"[:300]) from None
    return meta, flat


def restore_server(
    server: FederatedServer, meta: Mapping[str, Any], flat: Mapping[str, Tensor], where: Path
) -> None:
    """Restore ``server`` from a verified checkpoint's manifest and tensors, or say why not."""
    state = meta.get("server")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: the checkpoint has no server state")
    try:
        server.restore(flat, state)
    except (GloraError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"cannot restore {where}: {err}"[:300]) from None


__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "parse_manifest",
    "read_checkpoint",
    "restore_server",
    "write_checkpoint",
]
