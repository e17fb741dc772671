"""The tables and curves of an experiment cell, regenerated from its raw per-run JSON.

The summary table, the choice made on validation (``select``), the runs paired by seed
against a reference (``reference``, with the pre-registered ``primary`` comparisons), the
counterfactual rounds, and the curves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cells import (
    CEILING_ID,
    LOWER_IS_BETTER,
    PAIRED_METRICS,
    cell_name,
    cell_problems,
    compared_entries,
    count,
    entries,
    find_config,
    label,
    mean_or_none,
    ms,
    raw_file,
    run_id,
    runs_at,
    seeds_of,
)
from .config import ConfigError, SimConfig, differences
from .files import held, write_atomic, write_text_atomic
from .records import read_record, run_config
from .rule import READING, RULE, Candidate, Verdict, default_by_rule
from .stats import Paired, auc, paired


def floor(config: Mapping[str, Any]) -> float:
    """Majority-class rate of the evaluation set, averaged over the cell's seeds.

    For instruction tuning too: the answer words are the labels' names, so always answering
    the commonest one scores this rate.
    """
    base = SimConfig(**config["base"])
    rates = []
    for seed in seeds_of(config):
        # the runner's own evaluation sample (a built-in task or the user's eval_file)
        ev = dataclasses.replace(base, seed=int(seed)).load_data()[1]
        counts: dict[int, int] = {}
        for y in ev.labels:
            counts[y] = counts.get(y, 0) + 1
        rates.append(max(counts.values()) / len(ev))
    return statistics.mean(rates)


class CellRaw:
    """A cell's raw per-run JSON (``<docs>/raw/<cell>/``), each file read at most once.

    Every table of the cell reads its runs through one of these: a (run, seed)'s record, a
    run's records over the cell's seeds, a run's paired metrics, and how many seeds a set of
    runs has finished.
    """

    def __init__(self, config: Mapping[str, Any], cell: str, docs: Path) -> None:
        self.dir = docs / "raw" / cell
        self.config = config
        self.seeds = seeds_of(config)
        self.entries = {run_id(e): e for e in entries(config)}
        self._read: dict[tuple[str, int], dict[str, Any] | None] = {}
        self._metrics: dict[str, dict[int, dict[str, float]]] = {}

    def record(self, rid: str, seed: int) -> dict[str, Any] | None:
        """The raw record of run ``rid`` at ``seed`` (``None``: not finished).

        Raises
        ------
        RecordError
            If the file is not the finished run of the cell's config at that seed
            (:func:`~integration.runner.records.read_record`): no table or choice is made
            from it.
        ConfigError
            If ``rid`` is not a run of the cell.
        """
        key = (rid, int(seed))
        if key not in self._read:
            if rid not in self.entries:
                raise ConfigError(f"{rid!r} is not a run of the cell: {sorted(self.entries)}")
            cfg = run_config(self.config, self.entries[rid], int(seed), Path("."), "cpu")
            self._read[key] = read_record(raw_file(self.dir, rid, seed), cfg)
        return self._read[key]

    def seeds_of_run(self, rid: str) -> list[int]:
        """The cell's seeds that run ``rid`` runs at (its own ``seeds``, else all)."""
        if rid not in self.entries:
            raise ConfigError(f"{rid!r} is not a run of the cell: {sorted(self.entries)}")
        return [s for s in self.seeds if runs_at(self.entries[rid], s)]

    def records(self, rid: str) -> dict[int, dict[str, Any]]:
        """Seed -> raw record, for the seeds run ``rid`` runs at and has finished.

        A file left at a seed the run does not run at is not the run's, and is not read.
        """
        found = ((s, self.record(rid, s)) for s in self.seeds_of_run(rid))
        return {s: rec for s, rec in found if rec is not None}

    def metrics(self, rid: str) -> dict[int, dict[str, float]]:
        """Seed -> :func:`run_metrics`, for the seeds that run ``rid`` has finished."""
        if rid not in self._metrics:
            found = self.records(rid).items()
            self._metrics[rid] = {s: run_metrics(rec["rounds"]) for s, rec in found}
        return self._metrics[rid]

    def seeds_in(self, ids: Sequence[str]) -> int:
        """How many of the cell's seeds every one of the runs ``ids`` has finished."""
        return min(len(self.records(rid)) for rid in ids)


def table(config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None) -> str:
    """The markdown of a cell from the raw JSON files present (partial results included)."""
    cr = cr or CellRaw(config, cell, docs)
    base = SimConfig(**config["base"])
    cola = base.task.lower() == "cola"
    head = [
        "run",
        "seeds",
        "final val. accuracy",
        "best val. accuracy (max over rounds, biased up)",
    ]
    head += ["final MCC", "best MCC"] if cola else []
    head += [
        "round-1 aggregation error",
        "mean aggregation error",
        "mean certified residual",
        "server rank",
        "median s / round",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ceiling = ""
    for e in entries(config):
        recs = list(cr.records(run_id(e)).values())
        if not recs:
            lines.append(f"| {label(e)} | 0 |" + " |" * (len(head) - 2))
            continue
        final = [r["rounds"][-1]["accuracy"] for r in recs]
        best = [max(x["accuracy"] for x in r["rounds"]) for r in recs]
        cells = [label(e), str(len(recs)), ms(final), ms(best)]
        if cola:
            cells += [
                ms([r["rounds"][-1].get("mcc", math.nan) for r in recs]),
                ms([max(x.get("mcc", math.nan) for x in r["rounds"]) for r in recs]),
            ]
        first = [r["rounds"][0]["aggregation_error"] for r in recs]
        err = [mean_or_none([x["aggregation_error"] for x in r["rounds"]]) for r in recs]
        cert = [mean_or_none([x.get("certified_residual") for x in r["rounds"]]) for r in recs]
        rank = [mean_or_none([x.get("server_rank_mean") for x in r["rounds"]]) for r in recs]
        # wall-clock, so the median: a run paused to lend its core counts the pause
        secs = [float(x["seconds"]) for r in recs for x in r["rounds"]]
        # A certificate mean only where every round recorded one (as counterfactual_table).
        whole = all(x.get("certified_residual") is not None for r in recs for x in r["rounds"])
        e_m, r_m = mean_or_none(err), mean_or_none(rank)
        c_m = mean_or_none(cert) if whole else None
        s_m = statistics.median(secs) if secs else None
        cells += [
            ms(first, ".3f"),
            "-" if e_m is None else f"{e_m:.2e}",
            "-" if c_m is None else f"{c_m:.2e}",
            "-" if r_m is None else f"{r_m:.1f}",
            "-" if s_m is None else f"{s_m:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if run_id(e) == CEILING_ID:
            ceiling = f"final accuracy {ms(final)}, best {ms(best)} ({count(len(recs), 'seed')})"
    b = config["base"]
    steps = int(b.get("rounds", base.rounds)) * int(b.get("local_steps", base.local_steps))
    notes = [
        f"# Cell {cell}",
        "",
        str(config.get("description", "")),
        "",
        f"- Floor (majority-class rate of the evaluation set): {floor(config):.4f}",
        f"- Centralised, same steps (one client with all {base.max_train} training examples, "
        f"{steps} optimizer steps): "
        f"{ceiling or ('not run yet' if config.get('ceiling') else 'not part of this cell')}",
        f"- Settings: {json.dumps(config['base'], sort_keys=True)}",
        "- Accuracy: on the validation set, mean ± std over seeds (a held-out test set, where "
        "the cell has one, is read in the paired tables below); aggregation error: exact "
        "relative error of the "
        "server update against the mean update over all modules (round 1: every operator "
        "aggregates the very same client updates, mean ± std over seeds; mean: averaged over "
        "rounds); certified residual: the same from the certificates the runs recorded ('-' unless "
        "every round of every seed recorded one); "
        "s / round: wall-clock seconds of a round (training, aggregation and evaluation), "
        "the median over every round of every seed (a run paused to lend its core to "
        "another counts the pause, so the mean would mislead).",
        f"- Regenerate: `glora experiment --table <config of {cell}>` (in a source checkout, "
        f"also `python -m integration.experiment --table ...`); raw per-round JSON in "
        f"`raw/{cell}/`.",
        "",
        "",
    ]
    return "\n".join(notes) + "\n".join(lines) + "\n"


def run_metrics(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The :data:`PAIRED_METRICS` of one run (test set if the run has one, else validation).

    Without a test set there is no ``best_on_val``: the best validation round's validation
    accuracy is the maximum of the very numbers reported, biased upward.
    """
    test = "test_accuracy" in rounds[0]
    key = "test_accuracy" if test else "accuracy"
    loss = "test_loss" if "test_loss" in rounds[0] else "eval_loss"
    acc = [float(r[key]) for r in rounds]
    val = [float(r["accuracy"]) for r in rounds]
    best = max(range(len(val)), key=lambda j: (val[j], -j))  # the earliest best round
    out = {
        "final": acc[-1],
        "last3": statistics.fmean(acc[-3:]),
        "auc": auc(acc),
        "final_loss": float(rounds[-1][loss]),
    }
    errs = [r.get("aggregation_error") for r in rounds]
    if all(e is not None for e in errs):  # not a paired metric: for the error-accuracy line
        out["mean_error"] = statistics.fmean(float(e) for e in errs if e is not None)
    if test:
        out["best_on_val"] = acc[best]
    return out


def paired_table(
    config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None
) -> str:
    """Every entry against the config's ``reference`` entry, paired by seed.

    For each metric of :data:`PAIRED_METRICS`: the mean per-seed difference (entry minus
    reference), its 95% t-interval, and seeds won/lost (better / worse than the reference:
    higher accuracy, lower loss); ``*`` marks an interval that excludes
    zero. Only seeds that both runs finished are paired. Empty when the config names no
    reference.
    """
    ref_id = config.get("reference")
    if not ref_id:
        return ""
    cr = cr or CellRaw(config, cell, docs)
    by_id, others = _compared(config, cell)
    ref = cr.metrics(ref_id)
    has_test = ["best_on_val" in v for rid in [ref_id, *(run_id(e) for e in others)]
                for v in cr.metrics(rid).values()]  # fmt: skip
    m = len(others) * len(PAIRED_METRICS)
    xs: list[float] = []  # per (run, seed): mean aggregation error minus the reference's
    ys: list[float] = []  # ... and final accuracy (test if there is one) minus the reference's
    head = ["run", "paired seeds", *(name for name, _ in PAIRED_METRICS)]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
        "| "
        + " | ".join(
            [label(by_id[ref_id]) + " (reference, absolute)", str(len(ref))]
            + [ms([v[name] for v in ref.values() if name in v]) for name, _ in PAIRED_METRICS]
        )
        + " |",
    ]
    for e in others:
        runs = cr.metrics(run_id(e))
        seeds = sorted(set(runs) & set(ref))
        cells = [label(e), str(len(seeds))]
        for s in (s for s in seeds if "mean_error" in runs[s] and "mean_error" in ref[s]):
            xs.append(runs[s]["mean_error"] - ref[s]["mean_error"])
            ys.append(runs[s]["final"] - ref[s]["final"])
        for name, _ in PAIRED_METRICS:
            if not seeds or any(name not in runs[s] or name not in ref[s] for s in seeds):
                cells.append("-")
                continue
            got = paired([runs[s][name] for s in seeds], [ref[s][name] for s in seeds],
                         higher_is_better=name not in LOWER_IS_BETTER)  # fmt: skip
            cells.append(str(got))
        lines.append("| " + " | ".join(cells) + " |")
    interim = _interim(cr, [ref_id, *(run_id(e) for e in others)])
    primary, primary_results = _primary(config, by_id, cr, ref_id, interim=interim)
    primary += _default_rule(by_id, _rule_outcome(config, cr, ref_id, primary_results))
    what = "; ".join(f"`{n}`: {w}" for n, w in PAIRED_METRICS)
    if has_test and not any(has_test):
        what += (
            ". **This cell has no held-out test set**: every metric is on the validation set, "
            "and `best_on_val` is left out (it would pick the best of the numbers it reports)"
        )
        m = len(others) * (len(PAIRED_METRICS) - 1)
    elif has_test and not all(has_test):
        what += (
            ". **Some runs of this cell have no held-out test set**: theirs are validation "
            "numbers, and `best_on_val` is left out wherever a run lacks one"
        )
    return "\n".join(
        [
            "",
            f"## Paired by seed against {label(by_id[ref_id])}",
            "",
            f"Each cell: mean of (run - reference) over the seeds both finished, its 95% "
            f"Student-t interval, and seeds won/lost (won: the run is better than the reference, "
            f"higher in accuracy, lower in loss); `*` marks an interval that excludes "
            f"zero. Metrics: {what}. The reference row gives absolute values (mean ± std). "
            f"Multiplicity: this table holds {m} comparisons; at a nominal 5% each, about "
            f"{0.05 * m:.1f} would exclude zero by chance if nothing differed, so only the "
            f"pre-registered primary comparisons (docs/experiments.md) are read as evidence."
            + interim,
            "",
            *lines,
            "",
            "Error and accuracy across runs: the correlation, over (run, seed), of the run's mean "
            "aggregation error minus the reference's with its `final` (above) minus the "
            f"reference's: {_correlation(xs, ys)}.",
            "",
            *primary,
        ]
    )


def _compared(
    config: Mapping[str, Any], cell: str
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The cell's entries by run id, and the entries compared with the reference.

    Raises
    ------
    ConfigError
        If the cell's config has a problem (:func:`.cells.cell_problems`).
    """
    problems = cell_problems(config)
    if problems:
        raise ConfigError(f"cell {cell}: " + "; ".join(problems))
    return {run_id(e): e for e in entries(config)}, compared_entries(config)


def _interim(cr: CellRaw, ids: Sequence[str]) -> str:
    """A sentence for a cell whose compared runs do not all have every seed yet, else ``""``."""
    seeds = cr.seeds
    done = cr.seeds_in(ids)
    if done == len(seeds):
        return ""
    return (f" **Interim: {done} of {len(seeds)} seeds are in for every compared run; nothing "
            "here is read until the cell is complete.**")  # fmt: skip


def _primary_pairs(
    config: Mapping[str, Any], cr: CellRaw, ref_id: str
) -> tuple[str, float, dict[str, tuple[list[float], Paired | None]]]:
    """The primary metric, the level of each comparison, and per primary run its differences.

    The level is Bonferroni's (``1 - 0.05 / len(runs)``); per run: the per-seed differences
    from the reference (the seeds both have, in order) and their :class:`Paired` summary
    (``None`` under 2 seeds). Needs ``config["primary"]``; shared by the primary table and
    its figure.
    """
    rule = config["primary"]
    metric, ids = str(rule["metric"]), [str(i) for i in rule["runs"]]  # checked by _compared
    level = 1.0 - 0.05 / len(ids)
    ref = cr.metrics(ref_id)
    pairs: dict[str, tuple[list[float], Paired | None]] = {}
    for rid in ids:
        runs = cr.metrics(rid)
        seeds = sorted(s for s in set(runs) & set(ref) if metric in runs[s] and metric in ref[s])
        x, r = [runs[s][metric] for s in seeds], [ref[s][metric] for s in seeds]
        got = (
            None
            if len(seeds) < 2
            else paired(x, r, level=level, higher_is_better=metric not in LOWER_IS_BETTER)
        )
        pairs[rid] = ([a - b for a, b in zip(x, r, strict=True)], got)
    return metric, level, pairs


def _primary(
    config: Mapping[str, Any],
    by_id: Mapping[str, Mapping[str, Any]],
    cr: CellRaw,
    ref_id: str,
    *,
    interim: str = "",
) -> tuple[list[str], dict[str, Paired]]:
    """The pre-registered primary comparisons: ``"primary": {"metric": m, "runs": [ids]}``.

    Each listed run minus the reference on metric ``m``, paired by seed, with a Bonferroni
    interval at family-wise 95% (each at ``1 - 0.05 / len(runs)``): the block's lines and
    the intervals (run id -> :class:`Paired`). ``interim`` (:func:`_interim`) marks a cell
    that is not complete.
    """
    results: dict[str, Paired] = {}
    if not config.get("primary"):
        return [], results
    metric, level, pairs = _primary_pairs(config, cr, ref_id)
    ids = list(pairs)
    rows = []
    for rid, (diffs, got) in pairs.items():
        if got is None:
            rows.append(f"| {label(by_id[rid])} | {len(diffs)} | - | not enough seeds |")
            continue
        results[rid] = got
        if got.excludes_zero:
            verdict = "higher" if got.low > 0 else "lower"
        elif -0.01 <= got.low and got.high <= 0.01:
            verdict = "no difference larger than 0.01"
        else:
            verdict = "not established"
        rows.append(f"| {label(by_id[rid])} | {len(diffs)} | {got} | {verdict} |")
    return [
        f"## Primary comparisons (pre-registered): `{metric}`, family-wise 95%"
        + (" (interim, not read)" if interim else ""),
        "",
        f"Bonferroni over {len(ids)} comparisons: each interval at {100 * level:.2f}%. A "
        "difference is claimed only where the interval excludes zero." + interim,
        "",
        "| run | paired seeds | difference [interval] won/lost | reading |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ], results


@dataclasses.dataclass(frozen=True)
class RuleOutcome:
    """What the pre-registered default rule (:mod:`.rule`) made of a cell."""

    #: the chosen run and why, or ``None``
    verdict: Verdict | None
    #: the sentence that says why nothing was chosen (empty when a run was chosen)
    why_not: str = ""
    #: the runs the rule compared (empty when it was not applied)
    candidates: tuple[Candidate, ...] = ()
    #: whether the cell applies the rule at all (``primary`` with ``default_rule``)
    applies: bool = True


#: The outcome of a cell that does not apply the rule.
NOT_APPLIED = RuleOutcome(None, "This cell does not apply the default rule.", applies=False)


def decide_default(config: Mapping[str, Any], cell: str, docs: Path) -> RuleOutcome:
    """The default rule applied to a cell's finished runs: what its table's block prints.

    The verdict's run is an entry of the cell (``run_id``); its ``operator`` is the default
    the rule recommends. ``verdict`` is ``None`` until every compared run has every seed.
    """
    if not _applies_rule(config):
        return NOT_APPLIED
    cr = CellRaw(config, cell, docs)
    ref_id = str(config["reference"])
    by_id, _ = _compared(config, cell)
    _, results = _primary(config, by_id, cr, ref_id)
    return _rule_outcome(config, cr, ref_id, results)


def _rule_outcome(
    config: Mapping[str, Any], cr: CellRaw, ref_id: str, results: Mapping[str, Paired]
) -> RuleOutcome:
    """The rule applied to the reference and the ``primary`` runs (``results``: intervals).

    Applied only when the reference and every primary run have finished every seed of the
    cell. A run is at R = r when its server kept the clients' rank (its config's largest
    client rank) in every round of every seed.
    """
    if not _applies_rule(config):
        return NOT_APPLIED
    ids = [ref_id, *(str(i) for i in config["primary"]["runs"])]
    complete = cr.seeds_in(ids)
    if complete < len(cr.seeds):
        return RuleOutcome(None, f"Not applied yet: {complete} of {len(cr.seeds)} seeds are in "
                           "for every compared run. Nothing is chosen before the cell is "
                           "complete.")  # fmt: skip
    if any(rid not in results for rid in ids[1:]):
        return RuleOutcome(None, "Not applicable: a primary comparison has fewer than 2 "
                           "paired seeds.")  # fmt: skip
    candidates = []
    for rid in ids:
        recs = list(cr.records(rid).values())
        err = statistics.fmean(
            statistics.fmean(float(x["aggregation_error"]) for x in rec["rounds"]) for rec in recs
        )
        at_rank = all(x.get("server_rank") == _client_rank(rec["config"])
                      for rec in recs for x in rec["rounds"])  # fmt: skip
        candidates.append(Candidate(rid, None if rid == ref_id else results[rid], err, at_rank))
    try:
        return RuleOutcome(default_by_rule(candidates), "", tuple(candidates))
    except ValueError as err:
        return RuleOutcome(None, f"Nothing is chosen: {err}.", tuple(candidates))


def _applies_rule(config: Mapping[str, Any]) -> bool:
    """Whether the cell applies the default rule: a reference, and ``primary.default_rule``."""
    return "reference" in config and bool((config.get("primary") or {}).get("default_rule"))


def _default_rule(by_id: Mapping[str, Mapping[str, Any]], outcome: RuleOutcome) -> list[str]:
    """The block of the default rule (nothing where the cell does not apply it)."""
    if not outcome.applies:
        return []
    lines = [
        "## The default, by the pre-registered rule",
        "",
        f"The rule, as pre-registered: {RULE} How it is read where the text is silent: "
        f"{READING} Applied only when every compared run has every seed.",
        "",
    ]
    if outcome.candidates:
        lines += ["| run | mean aggregation error | R = r every round | primary interval |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for c in outcome.candidates:
            shown = "(reference)" if c.primary is None else str(c.primary)
            lines.append(f"| {label(by_id[c.run])} | {c.error:.3e} | "
                         f"{'yes' if c.at_client_rank else 'no'} | {shown} |")  # fmt: skip
        lines.append("")
    if outcome.verdict is None:
        return [*lines, outcome.why_not, ""]
    return [*lines, f"Chosen: **{outcome.verdict.run}** ({outcome.verdict.why}).", ""]


def _client_rank(cfg: Mapping[str, Any]) -> int:
    """The clients' rank r of a run's recorded config (the largest, where ranks differ).

    Built from the three settings that fix the ranks, so records written before later
    settings existed still read. Ranks are cycled over the clients (``SimConfig.ranks``), so
    a list longer than the clients counts only the ranks of clients that exist.
    """
    kept = {k: cfg[k] for k in ("clients", "rank", "client_ranks") if cfg.get(k) is not None}
    return max(SimConfig(**kept).ranks())


#: The per-round keys of the counterfactual arms (a, b and the broadcast split).
ARM_KEYS = ("counterfactual", "counterfactual_next", "broadcast_split")


def counterfactual_table(
    config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None
) -> str:
    """The counterfactual rounds of every run that has them, against the run's own operator.

    At every round of a run, each listed operator aggregated the very uploads of that round
    (``counterfactual`` in the run's config). Per operator: the mean aggregation error and
    certificate over rounds and seeds, and the loss and accuracy differences from the run's
    own aggregate (the run's operator, which must be listed too), averaged over the rounds
    of each seed and paired by seed (95% t-interval, seeds won/lost on the loss: "won" is a
    lower loss). The dose-response line correlates, over (seed, round, operator), the error
    difference with the loss difference. The section says how many comparisons it holds
    (its intervals are nominal), and marks interim a run that lacks some of its seeds.
    """
    cr = cr or CellRaw(config, cell, docs)
    blocks: list[str] = []
    compared = 0
    for e in entries(config):
        listed = cr.seeds_of_run(run_id(e))
        have = cr.records(run_id(e))
        recs = [rec["rounds"] for rec in have.values()
                if any(k in r for r in rec["rounds"] for k in ARM_KEYS)]  # fmt: skip
        if not recs:
            continue
        own = str(e.get("operator", config["base"].get("operator", "")))
        if set(have) != set(listed):
            blocks += [f"**Interim ({label(e)}): {len(have)} of {len(listed)} seeds are in; "
                       "nothing here is read until every seed is.**", ""]  # fmt: skip
        # The one-round-further arms stand on their own (they need no arm-a list).
        further, n_next = _further(recs, "counterfactual_next", own, e)
        split, n_split = _further(recs, "broadcast_split", "own", e)
        further += split
        compared += n_next + n_split
        names = list(recs[0][0].get("counterfactual", {}))
        if own not in names:
            blocks += further
            continue
        compared += len(names) - 1
        lines = [
            "| operator | mean aggregation error | mean certificate | Δloss: own - this "
            "(paired by seed) | Δaccuracy: this - own |",
            "| --- | --- | --- | --- | --- |",
        ]
        xs: list[float] = []
        ys: list[float] = []
        for name in names:
            errs, certs, dl, da = [], [], [], []
            for rounds in recs:
                cf = [r["counterfactual"] for r in rounds if "counterfactual" in r]
                errs += [c[name]["aggregation_error"] for c in cf]
                certs += [c[name]["certified_residual"] for c in cf
                          if c[name]["certified_residual"] is not None]  # fmt: skip
                dl.append(statistics.fmean(c[name]["loss"] - c[own]["loss"] for c in cf))
                da.append(statistics.fmean(c[name]["accuracy"] - c[own]["accuracy"] for c in cf))
                for c in cf:
                    if name != own:
                        xs.append(c[name]["aggregation_error"] - c[own]["aggregation_error"])
                        ys.append(c[name]["loss"] - c[own]["loss"])
            zeros = [0.0] * len(dl)
            # Only where every round of every seed recorded one: runs from before FlexLoRA and
            # svd_mean carried a certificate have none, and a mean over some rounds would mislead.
            cert = f"{statistics.fmean(certs):.3e}" if certs and len(certs) == len(errs) else "-"
            loss = "(reference)" if name == own else str(paired(zeros, dl))
            acc = "(reference)" if name == own else f"{statistics.fmean(da):+.4f}"
            lines.append(f"| {name} | {statistics.fmean(errs):.3e} | {cert} | {loss} | {acc} |")
        blocks += [
            f"### Counterfactual rounds of {label(e)} ({count(len(recs), 'seed')})",
            "",
            *lines,
            "",
            "Dose-response: correlation of (error - own error) with (loss - own loss): "
            f"{_correlation(xs, ys)}.",
            "",
        ]
        blocks += further
    if not blocks:
        return ""
    return "\n".join(
        [
            "",
            "## The aggregation step isolated (counterfactual rounds)",
            "",
            "Arm (a): every listed operator aggregates the same uploads at every round of the "
            "run. Arm (b) and the broadcast split run at the rounds their headings list. Each "
            "global model is evaluated on the test set (on the validation set where a cell has "
            "none). Δloss: mean over the rounds of a seed, then paired over seeds as "
            "(own - operator), so a positive difference means the operator's model has the "
            "*lower* loss; Δaccuracy is (operator - own); `*`: the interval excludes zero. "
            "The intervals are nominal 95% Student-t intervals over seeds, descriptive: this "
            f"section holds {compared} comparisons, none corrected for the others.",
            "",
            *blocks,
        ]
    )


@dataclasses.dataclass(frozen=True)
class Trajectories:
    """A cell's counterfactual run and the other cell's run it is compared with.

    ``a`` and ``b`` are the two runs' own operators (this cell's and the other's).
    """

    mine: dict[str, Any]
    theirs: dict[str, Any]
    other_config: dict[str, Any]
    other_cell: str
    a: str
    b: str


def trajectories(config: Mapping[str, Any]) -> Trajectories | None:
    """The run ``other_trajectory`` names, checked against this cell's (None: no such key).

    Raises
    ------
    ConfigError
        If the other cell cannot be found or read, its run does not exist or has no
        counterfactual rounds, the two runs have the same operator, either run's arm (a)
        leaves out one of the two operators, or the runs differ in a setting other than the
        operator (then the two trajectories would not be arm (a) of the same settings).
    """
    other = config.get("other_trajectory")
    if not other:
        return None
    problems = [x for x in cell_problems(config) if x.startswith("other_trajectory")]
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        path = find_config(str(other["cell"]))
        other_config = dict(json.loads(path.read_text()))
        other_cell = cell_name(other_config, path)
        found = {run_id(e): e for e in entries(other_config)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"other_trajectory: cannot read the cell {other['cell']!r} "
                          f"({type(err).__name__}: {err})"[:300]) from None  # fmt: skip
    wrong = cell_problems(other_config)
    if wrong:
        raise ConfigError(f"other_trajectory: {other_cell} ({path}): {'; '.join(wrong[:3])}")
    (mine,) = [e for e in entries(config) if e.get("counterfactual")]
    theirs = found.get(str(other["run"]))
    if theirs is None or not theirs.get("counterfactual"):
        raise ConfigError(f"other_trajectory: {other['run']!r} is not a run with counterfactual "
                          f"rounds of {other_cell} ({path})")  # fmt: skip
    seed = seeds_of(config)[0]
    here = run_config(config, mine, seed, Path("."), "cpu")
    try:
        there = run_config(other_config, theirs, seed, Path("."), "cpu")
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"other_trajectory: the run {other['run']!r} of {other_cell} has "
            f"no valid settings ({type(err).__name__}: {err})"[:300]
        ) from None
    a, b = here.operator, there.operator
    if a == b:
        raise ConfigError(f"other_trajectory: both trajectories are {a}'s; name a run of "
                          "another operator")  # fmt: skip
    for e, name in ((mine, "this cell"), (theirs, other_cell)):
        left_out = [op for op in (a, b) if op not in e["counterfactual"]]
        if left_out:
            raise ConfigError(f"other_trajectory: {run_id(e)} of {name} does not aggregate "
                              f"{left_out} in arm (a)")  # fmt: skip
    differ = differences(dataclasses.asdict(there), here, ignore=("operator",))
    if differ:
        raise ConfigError(f"other_trajectory: {other_cell}'s run differs from this cell's in "
                          "more than the operator (there: the other cell's, now: this one's; "
                          f"{'; '.join(differ[:3])}); arm (a) along two trajectories compares "
                          "runs of the same settings")  # fmt: skip
    return Trajectories(dict(mine), dict(theirs), other_config, other_cell, a, b)


def _arm_a_d(cr: CellRaw, rid: str, a: str, b: str) -> dict[int, float]:
    """Seed -> the mean over rounds of arm (a)'s loss of ``b``'s aggregate minus ``a``'s.

    Every round holds both (the run's settings list them, and a record whose arms differ
    from its settings is refused by :func:`~integration.runner.records.read_record`).
    """
    return {
        seed: statistics.fmean(
            r["counterfactual"][b]["loss"] - r["counterfactual"][a]["loss"] for r in rec["rounds"]
        )
        for seed, rec in cr.records(rid).items()
    }


def trajectory_table(
    config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None
) -> str:
    """Arm (a) along two trajectories: whether its comparison of two operators follows the owner.

    Arm (a) evaluates each operator's aggregate of a round's uploads in the state the
    trajectory left (the clients trained from the trajectory's own previous aggregate), which
    may favour the trajectory's operator. ``other_trajectory`` names another cell's run with
    counterfactual rounds, the same settings and another operator of its own (cell m names
    cell g: FlexLoRA's trajectory against FedIT's); both cells' raw records are read from
    ``docs``. Per seed and trajectory, d = the mean over every round of arm (a)'s test loss
    of the other owner's aggregate minus this cell's owner's (positive: this cell's owner has
    the lower loss). Over the seeds both cells have finished: per trajectory, the mean of d
    with a nominal 95% t-interval, and the change of d from the other trajectory to this
    one, paired by seed. The sign follows the trajectory's owner when each trajectory's mean
    favours its own operator; it is read only once every seed both cells list is in.

    Raises
    ------
    ConfigError
        As :func:`trajectories`.
    RecordError
        If a record of either run is not a finished run of its cell (a round whose arm (a)
        lacks an operator the run's settings list included).
    """
    t = trajectories(config)
    if t is None:
        return ""
    cr = cr or CellRaw(config, cell, docs)
    other = CellRaw(t.other_config, t.other_cell, docs)
    a, b = t.a, t.b
    along = {b: _arm_a_d(other, run_id(t.theirs), a, b), a: _arm_a_d(cr, run_id(t.mine), a, b)}
    listed = sorted(set(cr.seeds_of_run(run_id(t.mine)))
                    & set(other.seeds_of_run(run_id(t.theirs))))  # fmt: skip
    both = sorted(along[a].keys() & along[b].keys())
    where = {b: f"{t.other_cell}, run {run_id(t.theirs)}", a: f"this cell, run {run_id(t.mine)}"}
    lines = [
        "| over the seeds both cells have | seeds | mean [95% t-interval] seeds +/- |",
        "| --- | --- | --- |",
    ]
    for owner in (b, a):
        got = [along[owner][s] for s in both]
        shown = str(paired(got, [0.0] * len(got))) if got else "no seed in both yet"
        lines.append(f"| d along {owner}'s trajectory ({where[owner]}) | {len(both)} | {shown} |")
    change = (str(paired([along[a][s] for s in both], [along[b][s] for s in both]))
              if both else "no seed in both yet")  # fmt: skip
    lines.append(f"| change of d: along {a}'s - along {b}'s | {len(both)} | {change} |")
    if both and both == listed:
        follows = (
            statistics.fmean(along[b][s] for s in both)
            < 0
            < statistics.fmean(along[a][s] for s in both)
        )
        verdict = (f"The sign follows the trajectory's owner (each trajectory's mean d favours "
                   f"its own operator): {'yes' if follows else 'no'}.")  # fmt: skip
    else:
        verdict = (f"Interim: {len(both)} of the {len(listed)} seeds both cells list are "
                   f"finished in both (this cell: {sorted(along[a])}, {t.other_cell}: "
                   f"{sorted(along[b])}); whether the sign follows the trajectory's owner is "
                   "read when all are in.")  # fmt: skip
    return "\n".join(
        [
            "",
            f"## Arm (a) along two trajectories: {b}'s and {a}'s",
            "",
            f"Does arm (a)'s comparison of {a} and {b} keep its sign when the trajectory is "
            f"{a}'s rather than {b}'s? Both are arm (a) of the same settings, along {b}'s "
            f"trajectory ({t.other_cell}) and along {a}'s (this cell). Per seed, d = the mean "
            f"over the rounds of the test loss of {b}'s aggregate minus {a}'s (positive: "
            f"{a}'s has the lower loss); seeds +/-: where d (or its change) is above / below "
            "zero. Intervals are nominal and descriptive.",
            "",
            *lines,
            "",
            f"{verdict} Where it does, arm (a) measures the trajectory's home advantage and no "
            "operator is ranked from it; arm (b) and the broadcast split, which train one "
            "round further, are the arms read (docs/experiments.md, pre-registered).",
            "",
        ]
    )


def _correlation(xs: Sequence[float], ys: Sequence[float]) -> str:
    if len(xs) > 2 and statistics.pstdev(xs) > 0 and statistics.pstdev(ys) > 0:
        return f"{statistics.correlation(xs, ys):+.3f} (n = {len(xs)})"
    return "-"


def _further(
    recs: Sequence[Sequence[Mapping[str, Any]]], key: str, own: str, e: Mapping[str, Any]
) -> tuple[list[str], int]:
    """The block of a one-round-further arm (``counterfactual_next`` or ``broadcast_split``).

    Per operator (arm b) or split: the mean aggregation error of the next round, and the
    next round's test loss and accuracy against ``own`` (the run's operator, or the split it
    sends itself), averaged over the rounds where the arm ran and paired by seed. Returns the
    block's lines and how many comparisons it holds.
    """
    recs = [[r for r in rounds if key in r] for rounds in recs]
    recs = [rounds for rounds in recs if rounds]
    if not recs or own not in recs[0][0][key]:
        return [], 0
    names = list(recs[0][0][key])
    lines = [
        "| " + ("operator" if key == "counterfactual_next" else "broadcast split")
        + " | next-round aggregation error | Δloss: own - this (paired by seed) "
        "| Δaccuracy: this - own |",
        "| --- | --- | --- | --- |",
    ]  # fmt: skip
    xs: list[float] = []
    ys: list[float] = []
    for name in names:
        errs, dl, da = [], [], []
        for rounds in recs:
            arm = [r[key] for r in rounds]
            errs += [a[name]["aggregation_error"] for a in arm]
            dl.append(statistics.fmean(a[name]["loss"] - a[own]["loss"] for a in arm))
            da.append(statistics.fmean(a[name]["accuracy"] - a[own]["accuracy"] for a in arm))
            if key == "counterfactual_next" and name != own:
                for r in rounds:
                    now = r.get("counterfactual", {})
                    if name in now and own in now:
                        xs.append(now[name]["aggregation_error"] - now[own]["aggregation_error"])
                        ys.append(r[key][name]["loss"] - r[key][own]["loss"])
        loss = "(reference)" if name == own else str(paired([0.0] * len(dl), dl))
        acc = "(reference)" if name == own else f"{statistics.fmean(da):+.4f}"
        lines.append(f"| {name} | {statistics.fmean(errs):.3e} | {loss} | {acc} |")
    rounds_run = sorted({int(r["round"]) for rounds in recs for r in rounds})
    if key == "counterfactual_next":
        title = "Arm (b): each operator's global model trained one round further"
        tail = ("Dose-response: correlation of (round error - own round error) with (next-round "
                f"loss - own next-round loss): {_correlation(xs, ys)}.")  # fmt: skip
    else:
        title = "Broadcast split: one global update handed back in different factorisations"
        tail = ("Where every client's rank is at least the update's (as in the shipped cell), "
                "every split has the run's own product (the same global model at the round) and "
                "only the factorisation sent to the clients differs; a client of smaller rank "
                "gets the split's best rank-r_i truncation.")  # fmt: skip
    return [
        f"#### {title} ({label(e)}, {count(len(recs), 'seed')}, rounds {rounds_run})",
        "",
        *lines,
        "",
        tail,
        "",
    ], len(names) - 1


def selection(
    config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None
) -> str:
    """The config's ``select`` rule applied to the finished runs (validation only).

    ``"select": {"among": [ids...]}``: among those entries, the one whose mean over the
    cell's seeds of the *validation* accuracy averaged over the last 3 rounds is highest wins;
    ties go to the earlier entry (list the more conservative setting first). Only runs finished
    for every seed count. The test set is never read here.
    """
    rule = config.get("select")
    if not rule:
        return ""
    cr = cr or CellRaw(config, cell, docs)
    scores: list[tuple[str, float | None]] = []
    for rid in rule["among"]:
        vals = [statistics.fmean(float(r["accuracy"]) for r in rec["rounds"][-3:])
                for rec in cr.records(str(rid)).values()]  # fmt: skip
        full = len(vals) == len(cr.seeds)
        scores.append((rid, statistics.fmean(vals) if full else None))
    done = [(rid, v) for rid, v in scores if v is not None]
    rows = [f"| {rid} | {'-' if v is None else f'{v:.4f}'} |" for rid, v in scores]
    if len(done) == len(scores):
        best = max(done, key=lambda t: t[1])  # max keeps the first of equal values
        verdict = f"Chosen by the rule: **{best[0]}**."
    else:
        verdict = "Not decided yet: some runs are unfinished."
    return "\n".join(
        [
            "",
            "## Selection on validation",
            "",
            "Validation accuracy averaged over the last 3 rounds, mean over all seeds; the "
            "highest wins, ties to the earlier entry. The test set is not read.",
            "",
            "| entry | validation, last-3 mean |",
            "| --- | --- |",
            *rows,
            "",
            verdict,
            "",
        ]
    )


def write_table(config: Mapping[str, Any], cell: str, docs: Path) -> Path:
    """Write ``<docs>/<cell>.md`` and its curves ``<docs>/<cell>.png``.

    From one reading of the raw JSON, while holding ``docs`` (:func:`.files.held`): when two
    processes finish runs of one cell, the table written last has both.
    """
    path = docs / f"{cell}.md"
    with held(docs):
        cr = CellRaw(config, cell, docs)
        text = table(config, cell, docs, cr=cr) + selection(config, cell, docs, cr=cr)
        text += paired_table(config, cell, docs, cr=cr)
        text += counterfactual_table(config, cell, docs, cr=cr)
        text += trajectory_table(config, cell, docs, cr=cr)
        if write_plot(config, cell, docs, cr=cr) is not None:
            text += f"\n![accuracy and aggregation error per round]({cell}.png)\n"
        if write_primary_plot(config, cell, docs, cr=cr) is not None:
            text += (f"\n![the primary comparisons: per-seed differences and family-wise "
                     f"intervals]({cell}_primary.png)\n")  # fmt: skip
        write_text_atomic(path, text)
    return path


def curves(
    config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None
) -> dict[str, dict[str, list[float]]]:
    """Per run label: seed mean and standard deviation per round of accuracy and error.

    The accuracy is the test accuracy where every run of the cell has a test set (what the
    paired tables read), else the validation accuracy; ``"accuracy_on"`` says which (as a
    one-item list: ``[1.0]`` test, ``[0.0]`` validation). With one seed the deviation is 0.
    """
    cr = cr or CellRaw(config, cell, docs)
    found: list[tuple[str, list[list[Mapping[str, Any]]]]] = []
    for e in entries(config):
        runs = [rec["rounds"] for rec in cr.records(run_id(e)).values()]
        if runs:
            found.append((label(e), runs))
    on_test = bool(found) and all(
        x.get("test_accuracy") is not None for _, runs in found for r in runs for x in r
    )
    acc_key = "test_accuracy" if on_test else "accuracy"
    out: dict[str, dict[str, list[float]]] = {}
    for name, runs in found:
        n = min(len(r) for r in runs)
        seeds = f"{len(runs)} seed" + ("s" if len(runs) > 1 else "")
        row: dict[str, list[float]] = {"accuracy_on": [1.0 if on_test else 0.0]}
        for key, src in (("accuracy", acc_key), ("aggregation_error", "aggregation_error")):
            per_round = [[float(r[j].get(src) or 0.0) for r in runs] for j in range(n)]
            row[key] = [statistics.fmean(v) for v in per_round]
            row[f"{key}_std"] = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_round]
        out[f"{name} ({seeds})"] = row
    return out


_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")


def plot_styles(n: int) -> list[dict[str, Any]]:
    """The line styles of ``n`` runs in a cell's curves (matplotlib ``plot`` keywords).

    Every run its own colour (tab10, or tab20 beyond 10 runs), with line styles and markers
    cycling against the colours: no two of up to 20 runs share a colour, and no two of up to
    80 share colour, line style and marker.
    """
    from matplotlib import colormaps  # noqa: PLC0415 - heavy, only needed here
    from matplotlib.colors import to_hex  # noqa: PLC0415

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [
        # tab20 lists each hue dark then light: the first ten runs take the ten dark ones
        {"color": to_hex(cmap(j % cmap.N if n <= 10 else (2 * j) % 20 + (j // 10) % 2)),
         "linestyle": _STYLES[(j // cmap.N + j) % len(_STYLES)],
         "marker": _MARKERS[j % len(_MARKERS)], "ms": 3}
        for j in range(n)
    ]  # fmt: skip


def write_plot(
    config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None
) -> Path | None:
    """``<docs>/<cell>.png``: accuracy and aggregation error per round, one line per run.

    Uses matplotlib's object API (no pyplot, no global backend change).
    """
    data = curves(config, cell, docs, cr=cr)
    if not data:
        return None
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy, only needed here
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    # The legend goes below both panels, in up to three columns, so that it covers no curve
    # however long the labels are.
    cols = min(3, len(data))
    rows = -(-len(data) // cols)
    height = 4.0 + 0.2 * rows
    fig = Figure(figsize=(11, height))
    ax_acc, ax_err = fig.subplots(1, 2)
    ax_err.set_yscale("log")  # before the bands, which keep their lower edge positive on it
    for (name, c), style in zip(data.items(), plot_styles(len(data)), strict=True):
        color = str(style["color"])
        rounds = list(range(1, len(c["accuracy"]) + 1))
        ax_acc.plot(rounds, c["accuracy"], label=name, **style)
        _band(ax_acc, rounds, c["accuracy"], c["accuracy_std"], color)
        errs = c["aggregation_error"]
        if max(errs, default=0.0) > 1e-12:  # the one-client ceiling is exact: nothing to plot
            ax_err.plot(rounds, errs, **style)
            _band(ax_err, rounds, errs, c["aggregation_error_std"], color)
    on = "test" if next(iter(data.values()))["accuracy_on"][0] else "validation"
    for ax, title in (
        (ax_acc, f"{on} accuracy (mean over seeds, band ± 1 std)"),
        (ax_err, "aggregation error to the mean update"),
    ):
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{cell}: {config.get('base', {}).get('task', '')}", fontsize=11)
    fig.legend(loc="lower center", ncol=cols, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.86, wspace=0.2,
                        bottom=(0.55 + 0.2 * rows) / height)  # fmt: skip
    path = docs / f"{cell}.png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return path


def write_primary_plot(
    config: Mapping[str, Any], cell: str, docs: Path, *, cr: CellRaw | None = None
) -> Path | None:
    """``<docs>/<cell>_primary.png``: the pre-registered primary comparisons, drawn.

    One row per primary run: its per-seed differences from the reference on the primary
    metric (dots), their mean and the Bonferroni interval the primary table prints (a bar),
    zero and the ±0.01 band the table's reading uses. Drawn only for a complete cell (every
    compared run has every seed), as the rule is applied only then; ``None`` otherwise, or
    where the cell has no primary comparisons.
    """
    rule = config.get("primary")
    ref_id = config.get("reference")
    if not rule or not ref_id:
        return None
    cr = cr or CellRaw(config, cell, docs)
    by_id, _ = _compared(config, cell)
    ids = [str(i) for i in rule["runs"]]
    if _interim(cr, [str(ref_id), *ids]):
        return None
    metric, level, pairs = _primary_pairs(config, cr, str(ref_id))
    shown = [label(e) for e in entries(config) if cr.records(run_id(e))]  # as the curves
    styles = dict(zip(shown, plot_styles(len(shown)), strict=True))
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy, only needed here

    fig = Figure(figsize=(8, 1.2 + 0.7 * len(ids)))
    ax = fig.subplots()
    ax.axvspan(-0.01, 0.01, color="0.92", zorder=0, label="±0.01")
    ax.axvline(0.0, color="0.3", linewidth=0.8, zorder=1)
    for row, rid in enumerate(reversed(ids)):
        diffs, got = pairs[rid]
        if got is None:
            continue
        color = str(styles[label(by_id[rid])]["color"])
        # the seeds' dots above the bar, spread a little (fixed by seed order) so none hide
        ys = [row + 0.3 + 0.05 * ((j % 5) - 2) for j in range(len(diffs))]
        ax.scatter(diffs, ys, s=10, alpha=0.6, color=color, zorder=2)
        ax.errorbar([got.mean], [row], xerr=[[got.mean - got.low], [got.high - got.mean]],
                    fmt="o", color=color, capsize=4, zorder=3)  # fmt: skip
    ax.set_yticks(range(len(ids)), [label(by_id[rid]) for rid in reversed(ids)], fontsize=9)
    ax.set_ylim(-0.6, len(ids) - 0.2)
    ax.set_xlabel(f"{metric}: run minus {label(by_id[str(ref_id)])}, per seed (dots); mean and "
                  f"{100 * level:.2f}% interval (bar)", fontsize=9)  # fmt: skip
    ax.set_title(f"{cell}: primary comparisons (Bonferroni over {len(ids)})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.25, right=0.97, top=0.85, bottom=0.75 / (1.2 + 0.7 * len(ids)))
    path = docs / f"{cell}_primary.png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return path


def _band(ax: Any, rounds: list[int], mean: list[float], std: list[float], color: str) -> None:
    """The seed band (mean ± 1 std), faint, in the run's colour; nothing for one seed."""
    if any(v > 0 for v in std):
        low = [max(m - v, 1e-12) if ax.get_yscale() == "log" else m - v
               for m, v in zip(mean, std, strict=True)]  # fmt: skip
        high = [m + v for m, v in zip(mean, std, strict=True)]
        ax.fill_between(rounds, low, high, color=color, alpha=0.12, linewidth=0)
