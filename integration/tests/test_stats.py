"""Paired statistics of the experiment driver against independent references."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import mpmath
import pytest

from integration.stats import auc, paired, t_cdf, t_quantile
from integration.tests.synthetic import CELL, synthetic_cell

# Student-t 97.5% quantiles, from the tables (e.g. Abramowitz & Stegun, table 26.10).
_T975 = {1: 12.7062047, 2: 4.3026527, 5: 2.5705818, 9: 2.2621572, 19: 2.0930241, 30: 2.0422725}


@pytest.mark.parametrize("df", sorted(_T975))
def test_t_quantile_matches_the_tables(df: int) -> None:
    assert t_quantile(0.975, df) == pytest.approx(_T975[df], abs=5e-7)
    assert t_quantile(0.025, df) == pytest.approx(-_T975[df], abs=5e-7)


def test_t_cdf_against_an_independent_integral() -> None:
    # The density integrated by mpmath's quadrature, not through the incomplete beta.
    for df in (1, 3, 10):
        c = mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2))
        for t in (-2.5, -0.3, 0.0, 1.7):

            def density(x: float, c: float = c, df: int = df) -> float:
                return c * (1 + x * x / df) ** (-(df + 1) / 2)

            ref = 0.5 + mpmath.quad(density, [0, t])
            assert t_cdf(t, df) == pytest.approx(float(ref), abs=1e-12)


def test_paired_interval_wins_and_losses() -> None:
    x = [0.80, 0.82, 0.79, 0.85, 0.81]
    ref = [0.78, 0.80, 0.80, 0.81, 0.79]
    d = [a - b for a, b in zip(x, ref, strict=True)]
    got = paired(x, ref)
    half = t_quantile(0.975, 4) * statistics.stdev(d) / math.sqrt(5)
    assert got.mean == pytest.approx(statistics.fmean(d))
    assert (got.low, got.high) == pytest.approx((got.mean - half, got.mean + half))
    assert (got.won, got.lost, got.n) == (4, 1, 5)
    assert got.excludes_zero == (got.low > 0)
    # Swapping the two sides mirrors everything.
    back = paired(ref, x)
    assert (back.low, back.high) == pytest.approx((-got.high, -got.low))
    assert (back.won, back.lost) == (1, 4)
    # Where lower is better (a loss), a lower value wins; the difference itself is unchanged.
    loss = paired(x, ref, higher_is_better=False)
    assert (loss.mean, loss.low, loss.high) == (got.mean, got.low, got.high)
    assert (loss.won, loss.lost) == (1, 4)


def test_paired_edge_cases() -> None:
    one = paired([0.5], [0.4])
    assert (one.low, one.high) == (-math.inf, math.inf)
    assert not one.excludes_zero
    same = paired([0.5, 0.6], [0.5, 0.6])
    assert (same.mean, same.low, same.high, same.won, same.lost) == (0.0, 0.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match="equal"):
        paired([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal"):
        paired([], [])
    with pytest.raises(ValueError, match="level"):
        paired([0.1, 0.2], [0.1, 0.3], level=1.0)
    # A value that is not a number is refused by name, not averaged into a NaN interval.
    with pytest.raises(ValueError, match=r"finite; pair 1 is \(nan, 0.2\)"):
        paired([0.1, math.nan], [0.1, 0.2])
    # No spread: the interval has zero width, on the side of the one difference (exact
    # binary fractions, so the differences are exactly equal).
    const = paired([0.75, 0.5, 0.25], [0.5, 0.25, 0.0])
    assert (const.mean, const.low, const.high) == (0.25, 0.25, 0.25)
    assert const.excludes_zero
    none = paired([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert (none.low, none.high) == (0.0, 0.0)
    assert not none.excludes_zero  # no difference lies on neither side
    assert auc([0.5, 0.7, 0.9]) == pytest.approx(0.7)


def test_run_metrics_read_the_test_set_and_choose_on_validation() -> None:
    from integration.runner.tables import run_metrics

    rounds = [
        {"accuracy": 0.6, "test_accuracy": 0.50, "test_loss": 0.9, "eval_loss": 1.0},
        {"accuracy": 0.8, "test_accuracy": 0.55, "test_loss": 0.8, "eval_loss": 0.7},
        {"accuracy": 0.7, "test_accuracy": 0.70, "test_loss": 0.6, "eval_loss": 0.8},
    ]
    got = run_metrics(rounds)
    assert got["final"] == 0.70
    assert got["last3"] == pytest.approx((0.50 + 0.55 + 0.70) / 3)
    assert got["best_on_val"] == 0.55  # the test accuracy of round 2, best on validation
    assert got["final_loss"] == 0.6
    # Without a test set: validation numbers, and no best-on-validation (it would be the max).
    plain = [{k: v for k, v in r.items() if not k.startswith("test")} for r in rounds]
    got = run_metrics(plain)
    assert got["final"] == 0.7
    assert got["final_loss"] == 0.8
    assert "best_on_val" not in got


def test_default_rule_branches() -> None:
    from integration.runner.rule import Candidate, default_by_rule

    up = paired([0.9, 0.91, 0.92], [0.8, 0.8, 0.8])  # interval above zero
    up_less = paired([0.85, 0.86, 0.87], [0.8, 0.8, 0.8])
    flat = paired([0.81, 0.79, 0.8], [0.8, 0.8, 0.8])  # interval around zero
    down = paired([0.6, 0.61, 0.62], [0.8, 0.8, 0.8])  # interval below zero
    assert up.low > 0
    assert up_less.low > 0
    assert flat.low < 0 < flat.high
    assert down.high < 0
    ref = Candidate("fedit", None, 0.15, True)
    # Branch 1: the best of those above zero, whatever their errors and ranks.
    got = default_by_rule([ref, Candidate("a", up_less, 0.01, True),
                           Candidate("b", up, 0.5, False)])  # fmt: skip
    assert got.run == "b"
    assert "above zero" in got.why
    # Branch 2: the smallest error at R = r; a run off R = r, or below zero, is passed over.
    got = default_by_rule([ref, Candidate("low_rank_free", flat, 0.01, False),
                           Candidate("worse", down, 0.02, True),
                           Candidate("flex", flat, 0.07, True)])  # fmt: skip
    assert got.run == "flex"
    assert "smallest mean exact aggregation error" in got.why
    got = default_by_rule([ref, Candidate("flex", flat, 0.2, True)])
    assert got.run == "fedit"  # the reference is eligible in branch 2
    with pytest.raises(ValueError, match="below zero"):
        default_by_rule([Candidate("worse", down, 0.02, True)])
    # Reading (4): a tie goes to the run listed first (FedIT, then the primary runs in order).
    a, b = Candidate("a", up, 0.1, True), Candidate("b", up, 0.1, True)
    assert default_by_rule([ref, a, b]).run == "a"
    assert default_by_rule([ref, b, a]).run == "b"
    assert default_by_rule([ref, Candidate("flex", flat, 0.15, True)]).run == "fedit"
    # Reading (5): the same difference at every seed lies above zero, and branch 1 takes it.
    const = paired([0.75, 0.5, 0.25], [0.5, 0.25, 0.0])
    assert const.low == const.high > 0.0
    got = default_by_rule([ref, Candidate("flex", flat, 0.01, True),
                           Candidate("steady", const, 0.3, False)])  # fmt: skip
    assert got.run == "steady"
    with pytest.raises(ValueError, match="none"):
        default_by_rule([])


def test_paired_table_reads_only_complete_cells_and_applies_the_rule(tmp_path: Path) -> None:
    from integration.runner.tables import paired_table

    config = CELL
    synthetic_cell(tmp_path / "raw" / "c", [0, 1, 2])
    text = paired_table(config, "c", tmp_path)
    assert "| central |" not in text  # a reference run is in no comparison
    assert "this table holds 10 comparisons" in text  # 2 runs x 5 metrics
    assert "Interim" not in text
    # The loss column counts a seed as won where the run's loss is lower (flexlora: 2 of 3).
    flex = next(line for line in text.splitlines() if line.startswith("| flexlora |"))
    loss = flex.strip("| ").split(" | ")[-1]
    assert loss.startswith("-0.0007 ["), flex
    assert loss.endswith(" 2/1"), flex
    # The primary rows: last-3 differences at the Bonferroni level (2 comparisons: 97.5% each),
    # recomputed here from the raw JSON.
    import json

    from integration.runner.tables import run_metrics

    def last3(rid: str) -> list[float]:
        raw = tmp_path / "raw" / "c"
        return [run_metrics(json.loads((raw / f"{rid}-seed{s}.json").read_text())["rounds"])[
            "last3"] for s in (0, 1, 2)]  # fmt: skip

    primary = text.split("## Primary comparisons")[1].split("\n## ")[0]
    assert "each interval at 97.50%" in primary
    want = paired(last3("flexlora"), last3("fedit"), level=1 - 0.05 / 2)
    assert f"| flexlora | 3 | {want} |" in primary
    rule = text.split("## The default, by the pre-registered rule")[1]
    # glora_auto_rank has the smallest error but its server kept a larger rank: not at R = r.
    assert "| glora_auto_rank | 4.400e-02 | no |" in rule
    assert "| flexlora | 7.700e-02 | yes |" in rule
    # No interval lies above zero (offsets around zero), so the smallest error at R = r wins.
    assert "Chosen: **flexlora** (no primary interval lies above zero" in rule
    # The verdict the block prints is the one the package's default is held to.
    from integration.runner.tables import decide_default

    outcome = decide_default(config, "c", tmp_path)
    assert outcome.verdict is not None
    assert outcome.verdict.run == "flexlora"
    assert [c.run for c in outcome.candidates] == ["fedit", "flexlora", "glora_auto_rank"]
    # The figure reads what the paired tables read: the test accuracy, as every run has it.
    from integration.runner.tables import curves

    got = curves(config, "c", tmp_path)
    assert got["flexlora (3 seeds)"]["accuracy_on"] == [1.0]
    assert got["flexlora (3 seeds)"]["accuracy"][0] == pytest.approx(0.8 + 0.001 + 0.002 / 3)
    # One missing seed of one compared run: everything is interim and nothing is chosen.
    (tmp_path / "raw" / "c" / "flexlora-seed2.json").unlink()
    text = paired_table(config, "c", tmp_path)
    assert "(interim, not read)" in text
    assert "Interim: 2 of 3 seeds are in for every compared run" in text
    assert "Not applied yet: 2 of 3 seeds" in text
    assert "Chosen:" not in text
    outcome = decide_default(config, "c", tmp_path)
    assert outcome.verdict is None
    assert outcome.why_not.startswith("Not applied yet: 2 of 3 seeds")
    # A cell without a reference or without the rule chooses nothing and prints no block.
    bare = {k: v for k, v in config.items() if k not in ("reference", "primary")}
    assert not decide_default(bare, "c", tmp_path).applies
    plain = config | {"primary": {"metric": "last3", "runs": ["flexlora", "glora_auto_rank"]}}
    assert not decide_default(plain, "c", tmp_path).applies
    assert "## The default, by the pre-registered rule" not in paired_table(plain, "c", tmp_path)


def test_the_rule_is_quoted_word_for_word() -> None:
    from integration.runner.rule import READING, RULE

    root = Path(__file__).resolve().parents[2]
    for doc in ("docs/experiments.md", "README.md"):
        text = " ".join((root / doc).read_text().split())
        for part in (RULE, READING):
            assert " ".join(part.split()) in text, (doc, part[:40])


def test_the_primary_comparisons_are_drawn_only_for_a_complete_cell(tmp_path: Path) -> None:
    from integration.runner.tables import write_primary_plot, write_table

    synthetic_cell(tmp_path / "raw" / "c", [0, 1, 2])
    text = write_table(CELL, "c", tmp_path).read_text()
    drawn = tmp_path / "c_primary.png"
    assert drawn.read_bytes().startswith(b"\x89PNG")
    assert "(c_primary.png)" in text
    # A cell without primary comparisons draws none.
    plain = {k: v for k, v in CELL.items() if k != "primary"}
    assert write_primary_plot(plain, "c", tmp_path) is None
    # One missing seed of one compared run: nothing is drawn, and the table links nothing.
    drawn.unlink()
    (tmp_path / "raw" / "c" / "glora_auto_rank-seed1.json").unlink()
    text = write_table(CELL, "c", tmp_path).read_text()
    assert not drawn.exists()
    assert "c_primary.png" not in text


def test_a_certificate_mean_needs_every_round_of_every_seed(tmp_path: Path) -> None:
    """Rounds of runs from before FlexLoRA certified its update record none: a run whose seeds
    mix both shows no mean certificate (a mean over some rounds would mislead); a run with
    one in every round shows its mean."""
    import json

    from integration.runner.tables import table

    raw = tmp_path / "raw" / "c"
    synthetic_cell(raw, [0, 1, 2])
    for rid, seeds in (("flexlora", (1, 2)), ("glora_auto_rank", (0, 1, 2))):
        for s in seeds:
            path = raw / f"{rid}-seed{s}.json"
            rec = json.loads(path.read_text())
            for r in rec["rounds"]:
                r["certified_residual"] = r["aggregation_error"]
            path.write_text(json.dumps(rec))
    text = table(CELL, "c", tmp_path)
    header = next(line for line in text.splitlines() if "certified residual" in line
                  and line.startswith("|"))  # fmt: skip
    col = [c.strip() for c in header.strip("|").split("|")].index("mean certified residual")

    def cell(rid: str) -> str:
        row = next(line for line in text.splitlines() if line.startswith(f"| {rid}"))
        return [c.strip() for c in row.strip("|").split("|")][col]

    assert cell("flexlora") == "-"
    rank = [json.loads((raw / f"glora_auto_rank-seed{s}.json").read_text()) for s in (0, 1, 2)]
    errs = [statistics.fmean(r["aggregation_error"] for r in rec["rounds"]) for rec in rank]
    assert cell("glora_auto_rank") == f"{statistics.fmean(errs):.2e}"
