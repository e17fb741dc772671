"""Run an experiment cell (a JSON config: runs x seeds) resumably, and write its table.

``glora experiment integration/experiments/a_sst2.json`` (or ``glora experiment a_sst2``, a
cell shipped with the package; ``python -m integration.experiment`` in a checkout) runs every
(seed, entry) of the cell in order (all entries of the first seed, then the next seed, so
partial results are useful), each in its own folder ``<out>/<id>-seed<k>/``: a finished run
(``results.json`` present) is skipped, an interrupted one resumes from its checkpoint. After
each run it writes the run's small raw JSON (config and per-round metrics) to
``<docs>/raw/<cell>/<id>-seed<k>.json`` and regenerates the table ``<docs>/<cell>.md``.

``python -m integration.experiment --table integration/experiments/a_sst2.json`` only
regenerates the table from the raw JSON files (final and best accuracy mean ± std over seeds,
mean per-round aggregation error and certified residual, seconds per round; the floor, i.e.
the majority-class rate of the evaluation set, and the ceiling, a centralised run, beside it).

Config keys: ``name`` (the cell; default: the file's stem), ``description``, ``seeds``,
``base`` (:class:`integration.simulate.SimConfig` fields), ``runs`` (entries, most important
first: ``{"operator": ..., "label": ..., "id": ..., "seeds": [...], <SimConfig overrides>}``;
``seeds``, a subset of the cell's, runs the entry only at those), ``ceiling``
(true: add a centralised run, one client holding all the training data with the same number
of optimizer steps, ``rounds * local_steps``, as each federated client; a mapping: the same
with these settings overridden, e.g. ``{"client_ranks": [8]}`` or ``{"seeds": [0, 1]}``),
``out`` (run folders; cells may share one, so that identical runs are done once). The older
form with an ``operators`` list is accepted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from .cells import (
    CEILING_ID,
    ENTRY_KEYS,
    cell_name,
    entries,
    label,
    raw_file,
    run_id,
    runs_at,
    seeds_of,
)
from .config import SimConfig, results_config
from .simulate import Simulation
from .stats import paired
from .tables import PAIRED_METRICS, table, write_table

#: Per-round metrics kept in the raw JSON.
ROUND_KEYS = (
    "round",
    "accuracy",
    "eval_loss",
    "test_accuracy",
    "test_loss",
    "mcc",
    "aggregation_error",
    "aggregation_error_max",
    "certified_residual",
    "certified_residual_max",
    "server_rank",
    "server_rank_mean",
    "sides",
    "seconds",
    "eval_seconds",
    "counterfactual",
    "counterfactual_next",
    "broadcast_split",
)


def run_config(
    config: Mapping[str, Any], entry: Mapping[str, Any], seed: int, out: Path, device: str
) -> SimConfig:
    """The :class:`SimConfig` of one (entry, seed)."""
    over = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    kw = dict(config["base"]) | over | {"seed": seed, "device": device}
    kw["out"] = str(out / f"{run_id(entry)}-seed{seed}")
    return SimConfig(**kw)


def plan(
    config: Mapping[str, Any], out: Path, device: str = "cpu"
) -> list[tuple[dict[str, Any], int, SimConfig]]:
    """Every (entry, seed, config) in run order: all entries of a seed, then the next seed."""
    return [
        (e, int(seed), run_config(config, e, int(seed), out, device))
        for seed in seeds_of(config)
        for e in entries(config)
        if runs_at(e, int(seed))
    ]


def entry_problems(config: Mapping[str, Any]) -> list[str]:
    """What is wrong with the cell's seeds, its comparisons and the entries' own ``seeds``.

    The cell's ``seeds`` is a non-empty list of integers; the ``reference`` and the
    ``primary`` runs are compared entries of the cell, on a known metric; an entry's own
    seeds are a subset of the cell's, and a compared run runs at every seed of the cell.
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
        skip = (config.get("reference"), CEILING_ID)
        others = [i for i, e in zip(ids, entries(config), strict=True)
                  if i not in skip and e.get("compared", True)]  # fmt: skip
        unknown = [r for r in primary.get("runs", []) if r not in others]
        if unknown or not primary.get("runs"):
            out.append(f"primary: runs {unknown or '[]'} are not compared runs of the cell: "
                       f"{others}")  # fmt: skip
    for e in entries(config):
        stray = sorted({int(s) for s in e.get("seeds", [])} - cell_seeds)
        if stray:
            out.append(f"{run_id(e)}: its seeds {stray} are not among the cell's "
                       f"{config['seeds']}")  # fmt: skip
        if run_id(e) in compared and "seeds" in e:
            out.append(f"{run_id(e)}: a compared run (the reference or a primary run) runs at "
                       "every seed of the cell; leave out its own 'seeds'")  # fmt: skip
    return out


def _check_folder(cfg: SimConfig) -> dict[str, Any] | None:
    """The finished results of a run folder (None if unfinished); its config must match."""
    folder = Path(cfg.out)
    for name in ("results.json", "checkpoint.json"):
        path = folder / name
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        if results_config(saved["config"]) != results_config(asdict(cfg)):
            raise SystemExit(
                f"{path} was written with another config; remove {folder} to rerun it "
                "with the current settings"
            )
        if name == "results.json":
            out: dict[str, Any] = saved
            return out
    return None


def run_state(cfg: SimConfig) -> str:
    """Where a run stands: ``finished``, ``round k of n`` (its checkpoint) or ``not started``.

    Read from the run folder's files alone (no model is loaded, nothing is verified).
    """
    folder = Path(cfg.out)
    if (folder / "results.json").is_file():
        return "finished"
    try:
        done = int(json.loads((folder / "checkpoint.json").read_text())["round"])
    except FileNotFoundError:
        return "not started"
    except (OSError, ValueError, KeyError, TypeError):
        return "checkpoint unreadable (the run will say why when it resumes)"
    return f"round {done} of {cfg.rounds}"


def raw_record(
    cell: str, entry: Mapping[str, Any], seed: int, results: Mapping[str, Any]
) -> dict[str, Any]:
    """The small JSON kept in docs: config and per-round metrics of one run."""
    rounds = []
    for m in results["metrics"]:
        row = {k: m[k] for k in ROUND_KEYS if k in m}
        row["warnings"] = len(m.get("warnings", []))
        rounds.append(row)
    return {
        "cell": cell,
        "id": run_id(entry),
        "label": label(entry),
        "seed": seed,
        "config": {k: v for k, v in results["config"].items() if k not in ("out",)},
        # what computed the numbers (absent from runs recorded before 2026-12-06)
        "versions": dict(results.get("versions") or {}),
        "rounds": rounds,
    }


def run_cell(
    config: Mapping[str, Any],
    cell: str,
    out: Path,
    docs: Path,
    device: str,
    *,
    seeds: Sequence[int] | None = None,
) -> None:
    """Run (or resume, or skip) every (seed, entry) in order; raw JSON and table after each.

    ``seeds`` restricts what runs now to a subset of the config's seeds; the table is always
    written for the whole config (every finished seed).
    """
    raw = docs / "raw" / cell
    raw.mkdir(parents=True, exist_ok=True)
    todo = config if seeds is None else dict(config) | {"seeds": list(seeds)}
    for entry, seed, cfg in plan(todo, out, device):
        results = _check_folder(cfg)
        if results is None:
            print(f"[{cell}] running {run_id(entry)} seed {seed} -> {cfg.out}", flush=True)
            Simulation(cfg).run(resume=True)
            results = _check_folder(cfg)
            assert results is not None
        rec = raw_record(cell, entry, seed, results)
        write_text_atomic(raw_file(raw, run_id(entry), seed), json.dumps(rec, indent=1) + "\n")
        write_table(config, cell, docs)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="glora experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", help="a config file, or the name of a shipped cell (e.g. a_sst2)")
    p.add_argument("--table", action="store_true", help="only regenerate the table")
    p.add_argument("--list", action="store_true", help="print the run order, where each run "
                   "stands (finished, the round it reached, not started), and exit")  # fmt: skip
    p.add_argument("--out", default=None, help="everything under this folder: the runs in "
                   "OUT/runs, the table and raw JSON in OUT (default: the runs in the config's "
                   "'out', the tables in --docs)")  # fmt: skip
    p.add_argument("--docs", default=None, help="tables and raw JSON (default: OUT with --out, "
                   "else docs/experiments, the source checkout's record)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="ignored: runs always resume")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated subset of the config's seeds to run now (e.g. 0); the table "
        "still reports every finished seed",
    )
    args = p.parse_args(argv)
    try:
        path = find_config(args.config)
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        p.error(str(err))
    for msg in entry_problems(config):
        p.error(msg)
    wanted: list[int] | None = None
    if args.seeds is not None:
        try:
            wanted = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
        unknown = sorted(set(wanted) - set(seeds_of(config)))
        if unknown:
            p.error(f"--seeds {unknown} not in the config's seeds {config['seeds']}")
    cell = cell_name(config, path)
    if args.out is not None:
        out, docs = Path(args.out) / "runs", Path(args.docs or args.out)
    else:
        out = Path(config.get("out") or f"out/experiments/{cell}")
        docs = Path(args.docs or "docs/experiments")
    problems = [f"{run_id(e)} seed {s}: {msg}" for e, s, cfg in plan(config, out, args.device)
                for msg in cfg.problems()][:5]  # fmt: skip
    if problems:
        p.error("; ".join(problems))
    if args.list:
        listed = config if wanted is None else dict(config) | {"seeds": wanted}
        states = [(entry, seed, cfg, run_state(cfg))
                  for entry, seed, cfg in plan(listed, out, args.device)]  # fmt: skip
        for entry, seed, cfg, state in states:
            print(f"{run_id(entry)} seed {seed}: {cfg.out} [{state}]")
        finished = sum(state == "finished" for *_, state in states)
        started = sum(state.startswith("round") for *_, state in states)
        print(f"{finished} of {len(states)} runs finished, {started} in progress")
        return 0
    if not args.table:
        run_cell(config, cell, out, docs, args.device, seeds=wanted)
    print(write_table(config, cell, docs).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CEILING_ID",
    "ROUND_KEYS",
    "Simulation",
    "cell_name",
    "entries",
    "label",
    "main",
    "paired",
    "plan",
    "raw_record",
    "run_cell",
    "run_config",
    "run_id",
    "table",
    "write_table",
]
