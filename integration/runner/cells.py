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


#: The paired metrics: name, what it is, and how it is read from one run's rounds. "Best" is
#: the test accuracy of the round with the best validation accuracy (chosen on validation,
#: reported on test). Every metric is "higher is better" except the test loss.
PAIRED_METRICS: tuple[tuple[str, str], ...] = (
    ("final", "final-round test accuracy"),
    ("last3", "mean test accuracy of the last 3 rounds"),
    ("auc", "area under the test-accuracy curve (mean over rounds)"),
    ("best_on_val", "test accuracy at the round of best validation accuracy"),
    ("final_loss", "final-round test loss (lower is better)"),
)

#: The paired metrics where lower is better: a seed is "won" where the run's value is lower.
LOWER_IS_BETTER = frozenset({"final_loss"})


def cell_problems(config: Mapping[str, Any]) -> list[str]:
    """What is wrong with the cell's seeds, its comparisons and the entries' own ``seeds``.

    The cell's ``seeds`` is a non-empty list of integers; the ``reference`` and the
    ``primary`` runs are compared entries of the cell, on a known metric; the runs that
    ``select`` chooses among are runs of the cell; an entry's own seeds are a subset of the
    cell's, and a compared run runs at every seed of the cell; ``other_trajectory`` names a
    cell and a run, and the cell has one run with counterfactual rounds to compare with it.
    """
    seeds = config.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        return [f"'seeds' must be a non-empty list of integers, got {seeds!r}"]
    cell_seeds = set(seeds_of(config))
    ids = [run_id(e) for e in entries(config)]
    primary = config.get("primary") or {}
    compared = [config.get("reference"), *primary.get("runs", [])]
    out = []
    if "reference" in config and config["reference"] not in ids:
        out.append(f"reference {config['reference']!r} is not a run of the cell: {ids}")
    if primary:
        if "reference" not in config:
            out.append("'primary' compares runs with the 'reference', and the cell names none")
        if primary.get("metric") not in dict(PAIRED_METRICS):
            out.append(f"primary: metric {primary.get('metric')!r} is not one of "
                       f"{[n for n, _ in PAIRED_METRICS]}")  # fmt: skip
        others = [run_id(e) for e in compared_entries(config)]
        unknown = [r for r in primary.get("runs", []) if r not in others]
        if unknown or not primary.get("runs"):
            out.append(f"primary: runs {unknown or '[]'} are not compared runs of the cell: "
                       f"{others}")  # fmt: skip
    select = config.get("select")
    if select is not None:
        among = select.get("among") if isinstance(select, Mapping) else None
        if not isinstance(among, list) or not among:
            out.append(f"select: 'among' must be a non-empty list of run ids, got {among!r}")
        elif [r for r in among if r not in ids]:
            out.append(f"select: runs {[r for r in among if r not in ids]} are not runs of the "
                       f"cell: {ids}")  # fmt: skip
    out += _other_trajectory_problems(config)
    for e in entries(config):
        stray = sorted({int(s) for s in e.get("seeds", [])} - cell_seeds)
        if stray:
            out.append(f"{run_id(e)}: its seeds {stray} are not among the cell's "
                       f"{config['seeds']}")  # fmt: skip
        if run_id(e) in compared and "seeds" in e:
            out.append(f"{run_id(e)}: a compared run (the reference or a primary run) runs at "
                       "every seed of the cell; leave out its own 'seeds'")  # fmt: skip
    return out


def _other_trajectory_problems(config: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``other_trajectory`` (nothing where the cell has none)."""
    other = config.get("other_trajectory")
    if other is None:
        return []
    out = []
    own = [e for e in entries(config) if e.get("counterfactual")]
    if not (isinstance(other, Mapping) and set(other) == {"cell", "run"}
            and all(isinstance(v, str) and v for v in other.values())):  # fmt: skip
        out.append("other_trajectory: must be {'cell': <a cell's config or name>, 'run': "
                   f"<its run with counterfactual rounds>}}, got {other!r}")  # fmt: skip
    if len(own) != 1:
        out.append("other_trajectory: compares arm (a) along this cell's trajectory with "
                   "another's, and needs exactly one run with counterfactual rounds here, "
                   f"found {[run_id(e) for e in own]}")  # fmt: skip
    return out


def compared_entries(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The entries compared with the cell's reference.

    Every entry but the reference, the centralised ceiling and those marked
    ``"compared": false``.
    """
    skip = (config.get("reference"), CEILING_ID)
    return [e for e in entries(config) if run_id(e) not in skip and e.get("compared", True)]


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


def count(n: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``: a number with its noun in the singular or plural."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def mean_or_none(xs: Sequence[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` if there are none)."""
    vals = [float(x) for x in xs if x is not None]
    return statistics.mean(vals) if vals else None


#: The cells shipped with the package (``glora experiment a_sst2`` finds ``a_sst2.json`` here).
SHIPPED = Path(__file__).resolve().parents[1] / "experiments"


def find_config(name: str) -> Path:
    """A config file's path, or a shipped cell's by name (``a_sst2``, ``f_sst2_powered``, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{path.stem}.json"
    if not path.suffix and shipped.is_file():
        return shipped
    cells = sorted(q.stem for q in SHIPPED.glob("*.json"))
    raise FileNotFoundError(
        f"{name}: no such config file, and not a shipped cell ({', '.join(cells)})"
    )
