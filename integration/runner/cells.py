"""The vocabulary of an experiment cell (a JSON config: runs x seeds).

Shared by the driver and its tables: run ids, labels, the entries in run order, and small
formatting helpers.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The id of the centralised reference run (one client holding all the training data).
CEILING_ID = "ceiling"

#: Keys of a run entry that are not :class:`SimConfig` settings: its table label, id,
#: ``seeds`` (the entry runs only at these of the cell's seeds; a reference that is not
#: compared need not cost as much as the compared runs) and ``compared`` (false: a reference
#: run, left out of the paired table and its count of comparisons).
ENTRY_KEYS = ("label", "id", "seeds", "compared")


def seeds_of(config: Mapping[str, Any]) -> list[int]:
    """The cell's seeds, in order (``seeds``: a non-empty list of integers, required)."""
    return [int(s) for s in config["seeds"]]


def runs_at(entry: Mapping[str, Any], seed: int) -> bool:
    """Whether the entry runs at this seed (every seed of the cell unless it lists its own)."""
    return "seeds" not in entry or int(seed) in {int(s) for s in entry["seeds"]}


def cell_name(config: Mapping[str, Any], path: Path) -> str:
    """The cell's name: ``name`` in the config, else the config file's stem."""
    return str(config.get("name") or path.stem)


def entries(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The cell's run entries, in order (the ceiling first, if asked for)."""
    runs = [dict(e) for e in config.get("runs", [])]
    runs += [{"operator": op} for op in config.get("operators", [])]
    ceiling = config.get("ceiling")
    if ceiling:
        # ``"ceiling": {...}`` overrides its settings (e.g. ``client_ranks`` in a cell whose
        # clients' ranks differ); it stays the reference that is not compared.
        extra = dict(ceiling) if isinstance(ceiling, Mapping) else {}
        runs.insert(
            0,
            {"operator": "fedit", "clients": 1, "participation": 1.0, "id": CEILING_ID,
             "label": "centralised, same steps"} | extra | {"id": CEILING_ID},
        )  # fmt: skip
    return runs


def run_id(entry: Mapping[str, Any]) -> str:
    """``id`` of an entry, or its operator with its overrides (``glora-server_rank8``)."""
    if "id" in entry:
        return str(entry["id"])
    extra = [f"{k}{v}" for k, v in sorted(entry.items()) if k not in ("operator", *ENTRY_KEYS)]
    return "-".join([str(entry["operator"]), *extra])


def raw_file(raw: Path, rid: str, seed: int) -> Path:
    """Where run ``rid``'s raw JSON at ``seed`` lives in a cell's raw folder ``raw``."""
    return raw / f"{rid}-seed{int(seed)}.json"


def label(entry: Mapping[str, Any]) -> str:
    """The entry's table label."""
    return str(entry.get("label") or run_id(entry))


def ms(xs: Sequence[float], fmt: str = ".4f") -> str:
    """``mean ± std`` of ``xs`` (one value as it is; ``-`` for none)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:{fmt}}"
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):{fmt}}"


def mean_or_none(xs: Sequence[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` if there are none)."""
    vals = [float(x) for x in xs if x is not None]
    return statistics.mean(vals) if vals else None
