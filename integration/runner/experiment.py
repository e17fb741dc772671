"""Run an experiment cell (a JSON config: runs x seeds) resumably, and write its table.

``glora experiment integration/experiments/a_sst2.json`` (or ``glora experiment a_sst2``, a
cell shipped with the package; ``python -m integration.experiment`` in a checkout) runs every
(seed, entry) of the cell in order (all entries of the first seed, then the next seed, so
partial results are useful), each in its own folder ``<out>/<id>-seed<k>/``: a finished run
(``results.json`` present) is skipped, an interrupted one resumes from its checkpoint. After
each run it writes the run's small raw JSON (config and per-round metrics) to
``<docs>/raw/<cell>/<id>-seed<k>.json`` and regenerates the table ``<docs>/<cell>.md``. A run
whose raw JSON is already there, complete and written with the same settings, is recorded and
skipped too: a fresh clone continues a cell from its committed record instead of redoing hours
of runs (to recompute, give a fresh ``--out`` without ``--docs``: the record is then
``--out``'s own). A record that is not a finished run of the cell's config
(:mod:`integration.runner.records`) stops the driver before it runs anything, and ``--table``.

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
``out`` (run folders; cells may share one, so that identical runs are done once),
``other_trajectory`` (``{"cell": <config or shipped cell>, "run": <id>}``: arm (a) of this
cell's counterfactual run compared, seed by seed, with the same arm along that run's
trajectory; :func:`~integration.runner.tables.trajectory_table`). The older form with an
``operators`` list is accepted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glora_math.errors import GloraError

from .cells import (
    CEILING_ID,
    cell_name,
    cell_problems,
    count,
    entries,
    find_config,
    label,
    raw_file,
    run_id,
    runs_at,
    seeds_of,
)
from .checkpoint import CheckpointError
from .config import SimConfig, differences
from .files import FolderInUseError, busy, write_text_atomic
from .park import forget_parked, park_run, parked_round, unpark_run
from .records import ROUND_KEYS, RecordError, read_record, record_problems, run_config
from .simulate import Simulation
from .stats import paired
from .tables import CellRaw, table, trajectory_table, write_table


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


class RunFolderError(GloraError):
    """A run folder that cannot be taken for its run: written with other settings, or unreadable.

    Nothing in the folder is run, overwritten or removed; the message names the file, what is
    wrong, and what to do (remove the folder to rerun the run with the current settings).
    """


def _check_folder(cfg: SimConfig) -> dict[str, Any] | None:
    """The finished results of a run folder (None if unfinished); its config must match.

    Raises
    ------
    RunFolderError
        If the folder's ``results.json`` or ``checkpoint.json`` was written with other
        settings (for a checkpoint, other than a number of rounds it has not passed: a run
        may be extended), or its ``results.json`` is unreadable or holds no config or
        metrics. An unreadable checkpoint is left to the resume, which refuses it naming what
        is wrong (``CheckpointError``).
    """
    folder = Path(cfg.out)
    for name in ("results.json", "checkpoint.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
            # a checkpoint's run may be extended (Simulation.load): its rounds may differ
            ignore = ("rounds",) if name == "checkpoint.json" else ()
            diff = differences(saved["config"], cfg, ignore=ignore)
            if name == "results.json" and not isinstance(saved.get("metrics"), list):
                raise KeyError("metrics")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            if name == "checkpoint.json":
                return None
            what = f"{type(err).__name__}: {err}"[:200]
            raise RunFolderError(f"{path} is unreadable or holds no config or metrics ({what}); "
                                 f"remove {folder} to rerun the run") from None  # fmt: skip
        if name == "checkpoint.json":
            reached = saved.get("round")
            if not diff and isinstance(reached, int) and reached > cfg.rounds:
                raise RunFolderError(
                    f"{path} has reached round {reached}, past the {cfg.rounds} rounds the run "
                    f"now asks for; remove {folder} to rerun it with the current settings"
                )
        if diff:
            raise RunFolderError(
                f"{path} was written with another config ({'; '.join(diff[:3])}); remove "
                f"{folder} to rerun it with the current settings"
            )
        if name == "results.json":
            out: dict[str, Any] = saved
            return out
    return None


def recorded(cfg: SimConfig, record: Path) -> bool:
    """Whether ``record`` (a run's raw JSON in the cell's record) holds this very run.

    False where there is no such file; True where it is the finished run ``cfg``
    (:func:`~integration.runner.records.read_record`: the same result-defining settings, the
    device not being one; every round, with finite metrics).

    Raises
    ------
    RecordError
        If the record is of the same run with other settings, incomplete, damaged or
        unreadable: it is not silently taken for this run, and the driver, which writes a
        record only after its run has finished in a run folder, does not replace it unasked.
    """
    return read_record(record, cfg) is not None


@dataclass(frozen=True)
class RunState:
    """Where one run of a cell stands (``str()`` is the line ``--list`` prints).

    ``status`` is ``finished``, ``recorded`` (no finished run folder, but the cell's record
    holds the run's complete raw JSON with the same settings), ``running`` (a process holds
    its folder), ``stopped`` (it resumes when run again), ``not started`` or ``unreadable``
    (its checkpoint; the run says why when it resumes). ``done`` is the rounds saved of the
    ``rounds`` asked for: all of them once finished, the checkpoint's round while running or
    stopped, 0 otherwise. ``record`` is the record that holds a ``recorded`` run (only then).
    """

    status: Literal["finished", "recorded", "running", "stopped", "not started", "unreadable"]
    rounds: int
    done: int = 0
    record: Path | None = None

    def __post_init__(self) -> None:
        if (self.status == "recorded") != (self.record is not None):
            raise ValueError(f"RunState: status {self.status!r} with record {self.record!r}")

    @property
    def finished(self) -> bool:
        """Finished in its run folder or in the cell's record."""
        return self.status in ("finished", "recorded")

    def __str__(self) -> str:
        if self.status == "finished":
            return "finished"
        if self.status == "recorded":
            return f"finished (recorded in {self.record})"
        if self.status == "unreadable":
            return "checkpoint unreadable (the run will say why when it resumes)"
        if self.status == "not started":
            return "not started"
        return f"round {self.done} of {self.rounds}, {self.status}"


def run_state(cfg: SimConfig, record: Path | None = None) -> RunState:
    """Where a run stands (:class:`RunState`), read from its run folder and record alone.

    No model is loaded and nothing is verified. A record with other settings, an incomplete,
    damaged or unreadable one raises ``RecordError`` (:func:`recorded`); a run folder written
    with other settings, or with an unreadable ``results.json``, raises ``RunFolderError``.
    """
    folder = Path(cfg.out)
    if _check_folder(cfg) is not None:
        return RunState("finished", cfg.rounds, cfg.rounds)
    if record is not None and recorded(cfg, record):
        return RunState("recorded", cfg.rounds, cfg.rounds, record)
    try:
        done = int(json.loads((folder / "checkpoint.json").read_text())["round"])
    except FileNotFoundError:
        return RunState("running" if busy(folder) else "not started", cfg.rounds)
    except (OSError, ValueError, KeyError, TypeError):
        return RunState("unreadable", cfg.rounds)
    return RunState("running" if busy(folder) else "stopped", cfg.rounds, done)


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
        # what computed the numbers (absent from the raw JSON of cells (a)-(e) and the trap,
        # whose run folders are gone; added to study F's from each run's results.json)
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
    unpark: Path | None = None,
) -> None:
    """Run (or resume, or skip) every (seed, entry) in order; raw JSON and table after each.

    ``seeds`` restricts what runs now to a subset of the config's seeds; the table is always
    written for the whole config (every finished seed). A run that another process is running
    is skipped (that process records it), so several processes can share a cell's runs.
    ``unpark``: a folder of parked checkpoints (:func:`park_cell`); a run resumes from its
    parked round where that is further than its own folder's.
    """
    raw = docs / "raw" / cell
    raw.mkdir(parents=True, exist_ok=True)
    cr = CellRaw(config, cell, docs)
    for entry in entries(config):  # a damaged record stops the driver now, not after a run
        cr.records(run_id(entry))
    trajectory_table(config, cell, docs, cr=cr)  # so does the other trajectory's, if any
    todo = config if seeds is None else dict(config) | {"seeds": list(seeds)}
    for entry, seed, cfg in plan(todo, out, device):
        results = _check_folder(cfg)
        record = raw_file(raw, run_id(entry), seed)
        if results is None and cr.record(run_id(entry), seed) is not None:  # read above
            print(f"[{cell}] {run_id(entry)} seed {seed} is recorded in {record}; skipping it",
                  flush=True)  # fmt: skip
            continue
        if results is None:
            if busy(Path(cfg.out)):
                print(f"[{cell}] skipping {run_id(entry)} seed {seed}: another process is "
                      f"running it in {cfg.out}", flush=True)  # fmt: skip
                continue
            if unpark is not None:
                said = unpark_run(parked_folder(unpark, cell, cfg), Path(cfg.out), cfg)
                if said:
                    print(f"[{cell}] {said}", flush=True)
            print(f"[{cell}] running {run_id(entry)} seed {seed} -> {cfg.out}", flush=True)
            try:
                Simulation(cfg).run(resume=True)
            except FolderInUseError:  # taken by another process since the check above
                print(f"[{cell}] skipping {run_id(entry)} seed {seed}: another process took "
                      "it", flush=True)  # fmt: skip
                continue
            results = _check_folder(cfg)
            assert results is not None
        rec = raw_record(cell, entry, seed, results)
        problems = record_problems(rec, cfg)
        if problems:  # never write a record that every reader would refuse
            raise RecordError(f"the run in {cfg.out} makes a record that is not a finished "
                              f"run of its config ({'; '.join(problems)}); nothing was "
                              f"written to {record}")  # fmt: skip
        write_text_atomic(record, json.dumps(rec, indent=1) + "\n")
        write_table(config, cell, docs)


def parked_folder(store: Path, cell: str, cfg: SimConfig) -> Path:
    """Where ``store`` parks the run of ``cfg`` (one folder per cell, named as the run's)."""
    return store / cell / Path(cfg.out).name


def park_cell(
    config: Mapping[str, Any], cell: str, out: Path, docs: Path, *, store: Path, device: str = "cpu"
) -> Iterator[str]:
    """Park the checkpoint of every unfinished run of the cell in ``store`` (a committed folder).

    A later round replaces a parked one (:func:`~integration.runner.park.park_run`); a run
    that has finished (``results.json``) or is recorded (its raw JSON in ``docs``) has its
    parked copy removed. Yields one line per change as it is made; a run whose checkpoint is
    damaged is named in its line and the other runs are still parked. A fresh machine
    resumes the parked rounds with ``run_cell(..., unpark=store)``.
    """
    cr = CellRaw(config, cell, docs)
    for entry, seed, cfg in plan(config, out, device):
        dest = parked_folder(store, cell, cfg)
        if cr.record(run_id(entry), seed) is not None:
            gone = forget_parked(dest)
            line = f"{dest.name}: recorded; its parked checkpoint removed" if gone else None
        else:
            try:
                line = park_run(Path(cfg.out), dest, cfg)
            except CheckpointError as err:
                line = f"{dest.name}: not parked, its checkpoint is damaged: {err}"
        if line:
            yield f"[{cell}] {line}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="glora experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", help="a config file, or the name of a shipped cell (e.g. a_sst2)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--table", action="store_true", help="only regenerate the table")
    what.add_argument("--list", action="store_true", help="print the run order, where each run "
                      "stands (finished, the round it reached, not started), and exit")  # fmt: skip
    what.add_argument("--park", default=None, metavar="DIR", help="copy the checkpoint of "
                      "every unfinished run of the cell (of --seeds, if given) into "
                      "DIR/<cell>/<run>/ (compressed, checked; meant to be committed), remove "
                      "finished runs' copies, and exit")  # fmt: skip
    p.add_argument("--out", default=None, help="everything under this folder: the runs in "
                   "OUT/runs, the table and raw JSON in OUT (default: the runs in the config's "
                   "'out', the tables in --docs)")  # fmt: skip
    p.add_argument("--docs", default=None, help="tables and raw JSON (default: OUT with --out, "
                   "else docs/experiments, the source checkout's record)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--unpark", default=None, metavar="DIR", help="before each run, restore "
                   "its checkpoint parked in DIR/<cell>/<run>/ where that is this run's and "
                   "further than its own folder's; with --list, say which runs will")  # fmt: skip
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
    for msg in cell_problems(config):
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
    try:
        return _act(args, config, cell, out, docs, wanted=wanted)
    except GloraError as err:  # bad data, a damaged checkpoint or raw record, a refused round
        sys.stderr.write(f"glora experiment: error: {err}\n")
        return 2


def _act(
    args: argparse.Namespace,
    config: Mapping[str, Any],
    cell: str,
    out: Path,
    docs: Path,
    *,
    wanted: list[int] | None,
) -> int:
    """What the command line asks for, once its arguments are checked: list, park, or run."""
    unpark = None if args.unpark is None else Path(args.unpark)
    if args.list:
        listed = config if wanted is None else dict(config) | {"seeds": wanted}
        _list(listed, cell, out, docs, args.device, whole=config, unpark=unpark)
        return 0
    if args.park is not None:
        todo = config if wanted is None else dict(config) | {"seeds": wanted}
        said = False
        for line in park_cell(todo, cell, out, docs, store=Path(args.park), device=args.device):
            print(line, flush=True)
            said = True
        if not said:
            print(f"[{cell}] nothing to park or remove: no unfinished run has a newer "
                  f"checkpoint under {out}")  # fmt: skip
        return 0
    if not args.table:
        if unpark is not None and not unpark.is_dir():
            print(f"[{cell}] --unpark {unpark}: no such folder; every run goes on from its own",
                  flush=True)  # fmt: skip
        run_cell(config, cell, out, docs, args.device, seeds=wanted, unpark=unpark)
    print(write_table(config, cell, docs).read_text())
    return 0


def _list(
    config: Mapping[str, Any],
    cell: str,
    out: Path,
    docs: Path,
    device: str,
    *,
    whole: Mapping[str, Any],
    unpark: Path | None = None,
) -> None:
    """Print the run order, where each run stands, how many are finished and the time left.

    ``config`` lists the seeds asked for (``--seeds``); ``whole`` is the cell's config, whose
    every finished seed gives the pace of the runs left. ``unpark``: a folder of parked
    checkpoints (:func:`park_cell`); a run whose parked round is further than its folder's is
    said to resume from it, and its time left counted from there.
    """
    raw = docs / "raw" / cell
    states = [(entry, seed, cfg, run_state(cfg, raw_file(raw, run_id(entry), seed)))
              for entry, seed, cfg in plan(config, out, device)]  # fmt: skip
    left = []
    for entry, seed, cfg, state in states:
        parked = 0
        if unpark is not None and not state.finished and state.status != "running":
            parked = parked_round(parked_folder(unpark, cell, cfg), cfg)
        more = f"; round {parked} parked, it resumes from there" if parked > state.done else ""
        print(f"{run_id(entry)} seed {seed}: {cfg.out} [{state}{more}]")
        if not state.finished:
            left.append((run_id(entry), max(state.done, parked), cfg.rounds))
    n = {w: sum(state.status == w for *_, state in states) for w in ("running", "stopped")}
    done = sum(state.finished for *_, state in states)
    print(f"{done} of {len(states)} runs finished, {n['running']} running, "
          f"{n['stopped']} stopped partway (they resume)")  # fmt: skip
    if left:
        print(_time_left(left, CellRaw(whole, cell, docs)))


def _time_left(left: Sequence[tuple[str, int, int]], cr: CellRaw) -> str:
    """How long the rounds ``left`` (run id, rounds saved, rounds) take, at each run's pace.

    A run's pace is, for each round, the median over its finished seeds of the ``seconds``
    that round took (training, aggregation, evaluation and any counterfactual arms, measured
    beside whatever else ran on the machine): round by round, because rounds differ (the
    first loads the model; a counterfactual cell runs its further arms at some rounds only),
    and the median, because a round during which the process was paused or the machine
    busier counts its whole wall time. A run without a finished seed is not estimated.
    """
    pace: dict[str, list[float] | None] = {}
    for rid, _, _ in left:
        if rid not in pace:
            recs = list(cr.records(rid).values())
            by_round = zip(*([r["seconds"] for r in rec["rounds"]] for rec in recs), strict=True)
            pace[rid] = [statistics.median(secs) for secs in by_round] if recs else None
    known = [sum(p[done:n]) for rid, done, n in left if (p := pace[rid]) is not None]
    if not known:
        return f"{count(len(left), 'run')} left, not estimated (no finished seed of their run)"
    runs = count(len(known), "run")
    say = (f"about {sum(known) / 3600:.1f} one-core hours left for {runs} (each round at the "
           "median seconds of that round over the run's finished seeds)")  # fmt: skip
    if len(known) < len(left):
        rest = count(len(left) - len(known), "run")
        say += f"; {rest} not estimated (no finished seed of their run)"
    return say


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CEILING_ID",
    "ROUND_KEYS",
    "RunFolderError",
    "RunState",
    "Simulation",
    "cell_name",
    "cell_problems",
    "entries",
    "label",
    "main",
    "paired",
    "plan",
    "raw_record",
    "recorded",
    "run_cell",
    "run_config",
    "run_id",
    "run_state",
    "table",
    "write_table",
]
