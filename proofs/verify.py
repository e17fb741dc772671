"""``glora verify``: every proposition's symbolic proof, high-precision check and properties.

Prints one row per proposition: symbolic proof (pass/fail), the largest high-precision residual
(relative, at ``dps`` digits), how many hypothesis examples its properties ran, and a status.
Returns non-zero if anything fails.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from glora_math.formatting import format_table

from .formal import check as formal_check
from .highprec import CHECKS, run_check
from .propositions import PROPOSITIONS, Proposition
from .symbolic import PROOFS


@dataclass(frozen=True)
class Row:
    """One proposition's verification outcome."""

    pid: str
    title: str
    symbolic: bool
    residual: float | None
    threshold: float | None
    examples: int
    failures: list[str]
    #: "checked", "not machine-checked", "no coqc", "not run" or "failed: ..." (proofs.formal).
    machine_checked: str = "not run"

    @property
    def ok(self) -> bool:
        return (
            self.symbolic
            and not self.failures
            and not self.machine_checked.startswith("failed")
            and (self.residual is None or self.threshold is None or self.residual <= self.threshold)
        )


def suite_dir() -> Path | None:
    """The hypothesis suite beside this package: ``property_tests/`` in a source checkout,
    ``glora_math/property_tests/`` in an installed wheel (the same relative place)."""
    path = Path(__file__).resolve().parent.parent / "property_tests"
    return path if (path / "conftest.py").is_file() else None


class _ExampleCounter:
    """A pytest plugin: hypothesis examples run and failures, per test node id."""

    def __init__(self) -> None:
        self.examples: dict[str, int] = {}
        self.failures: dict[str, str] = {}
        self.seen: set[str] = set()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        hyp = getattr(getattr(item, "obj", None), "hypothesis", None)
        if hyp is None:
            yield
            return
        inner: Callable[..., Any] = hyp.inner_test
        key = item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.nodeid

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.examples[key] = self.examples.get(key, 0) + 1
            return inner(*args, **kwargs)

        hyp.inner_test = counting
        try:
            yield
        finally:
            hyp.inner_test = inner

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seen.add(report.nodeid.split("::", 1)[1] if "::" in report.nodeid else report.nodeid)
        if report.failed:
            key = report.nodeid.split("::", 1)[1] if "::" in report.nodeid else report.nodeid
            full = str(report.longrepr).strip()
            sys.stderr.write(f"{report.nodeid}\n{full}\n")  # the counterexample, in full
            lines = full.splitlines()
            self.failures[key] = lines[-1] if lines else "failed"


def run_property_refs(refs: tuple[str, ...]) -> dict[str, tuple[int, list[str]]]:
    """Run hypothesis properties ``module:function`` in one pytest session; per ref, (examples,
    failures).

    The properties are selected by pytest node id in the suite beside this package
    (:func:`suite_dir`); nothing here imports a test module. Without the suite every
    property is reported as a failure saying so.
    """
    if not refs:
        return {}
    root = suite_dir()
    if root is None:
        return {r: (0, [f"{r}: the property suite is not installed"]) for r in refs}
    where = {ref: (str(root / f"{ref.split(':')[0]}.py"), ref.split(":")[1]) for ref in refs}
    counter = _ExampleCounter()
    args = sorted({f"{path}::{fn}" for path, fn in where.values()})
    code = pytest.main(
        [*args, "-p", "no:cacheprovider", "-p", "no:terminal", "-o", "addopts=",
         "-W", "ignore::pytest.PytestAssertRewriteWarning"],
        plugins=[counter],
    )  # fmt: skip
    out = {}
    for ref, (_, fn) in where.items():
        fails = [f"{ref}: {counter.failures[fn]}"] if fn in counter.failures else []
        if fn not in counter.seen and not fails:
            fails = [f"{ref}: not run (pytest exit code {int(code)})"]
        out[ref] = (counter.examples.get(fn, 0), fails)
    return out


def run_properties(refs: tuple[str, ...]) -> tuple[int, list[str]]:
    """Run properties ``module:function`` (see :func:`run_property_refs`); total examples
    and all failures."""
    got = run_property_refs(refs)
    return sum(n for n, _ in got.values()), [f for _, fs in got.values() for f in fs]


def verify_one(
    prop: Proposition,
    *,
    dps: int = 50,
    properties: bool = True,
    ran: dict[str, tuple[int, list[str]]] | None = None,
    machine_checked: str = "not run",
) -> Row:
    """Run the three checks of one proposition (``ran``: its properties' results, if run)."""
    sym = PROOFS[prop.id]()
    hp = run_check(prop.id, dps=dps) if prop.id in CHECKS else None
    if not properties:
        examples, failures = 0, []
    elif ran is None:
        examples, failures = run_properties(prop.properties)
    else:
        examples = sum(ran[r][0] for r in prop.properties)
        failures = [f for r in prop.properties for f in ran[r][1]]
    return Row(
        prop.id,
        prop.title,
        sym.ok,
        None if hp is None else hp.residual,
        None if hp is None else hp.threshold,
        examples,
        failures,
        machine_checked,
    )


def format_rows(rows: list[Row]) -> str:
    """The verification table as text."""
    body = [
        [
            r.pid,
            r.title,
            r.machine_checked,
            "pass" if r.symbolic else "FAIL",
            "-" if r.residual is None else f"{r.residual:.1e} (< {r.threshold:.0e})",
            str(r.examples),
            "ok" if r.ok else "FAILED",
        ]
        for r in rows
    ]
    return format_table(
        [
            "prop",
            "statement",
            "machine-checked (Coq)",
            "symbolic proof",
            "high-precision residual",
            "property examples",
            "status",
        ],
        body,
    )


def main(
    *, dps: int = 50, properties: bool = True, only: list[str] | None = None, formal: bool = True
) -> int:
    """Run everything, print the table, return the exit code.

    ``formal``: compile the Coq proofs (:mod:`proofs.formal`) where ``coqc`` exists; without
    it the column says "no coqc" and the exit code does not depend on it.
    """
    t0 = time.perf_counter()
    chosen = [p for p in PROPOSITIONS if only is None or p.id in only]
    refs = tuple(r for p in chosen for r in p.properties)
    ran = run_property_refs(refs) if properties else None  # one pytest session for all
    coq = formal_check([p.id for p in chosen]) if formal else {}
    rows = [
        verify_one(p, dps=dps, properties=properties, ran=ran,
                   machine_checked=coq.get(p.id, "not run"))
        for p in chosen
    ]  # fmt: skip
    print(format_rows(rows))
    for r in rows:
        for f in r.failures:
            print(f"  {r.pid}: {f}")
    elapsed = time.perf_counter() - t0
    print(
        f"\n{sum(r.ok for r in rows)}/{len(rows)} propositions verified in {elapsed:.1f} s "
        f"(high precision at {dps} digits; residuals are relative to the problem's scale)."
    )
    return 0 if all(r.ok for r in rows) else 1
