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

from glora_math.errors import GloraError


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
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as err:
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


__all__ = ["CHECKPOINT_FORMAT", "CheckpointError"]
