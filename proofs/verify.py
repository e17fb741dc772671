"""``glora verify``: every proposition's symbolic proof, high-precision check and properties.

Prints one row per proposition: symbolic proof (pass/fail), the largest high-precision residual
(relative, at ``dps`` digits), how many hypothesis examples its properties ran, and a status.
Returns non-zero if anything fails.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proofs.highprec import CHECKS, run_check
from proofs.propositions import PROPOSITIONS, Proposition
from proofs.symbolic import PROOFS


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

    @property
    def ok(self) -> bool:
        return (
            self.symbolic
            and not self.failures
            and (self.residual is None or self.threshold is None or self.residual <= self.threshold)
        )


def run_properties(refs: tuple[str, ...]) -> tuple[int, list[str]]:
    """Run hypothesis properties ``module:function`` of property_tests, counting examples."""
    importlib.import_module("property_tests.conftest")  # registers and loads the profile
    total = 0
    failures = []
    for ref in refs:
        module_name, fn_name = ref.split(":")
        fn = getattr(importlib.import_module(f"property_tests.{module_name}"), fn_name)
        inner: Callable[..., Any] = fn.hypothesis.inner_test
        count = [0]

        def counting(
            *args: Any, _inner: Callable[..., Any] = inner, _count: list[int] = count, **kwargs: Any
        ) -> Any:
            _count[0] += 1
            return _inner(*args, **kwargs)

        fn.hypothesis.inner_test = counting
        try:
            fn()
        except Exception as err:  # a failing property: report, do not stop the table
            failures.append(f"{ref}: {type(err).__name__}: {err}".splitlines()[0])
            traceback.print_exc()
        finally:
            fn.hypothesis.inner_test = inner
        total += count[0]
    return total, failures


def verify_one(prop: Proposition, *, dps: int = 50, properties: bool = True) -> Row:
    """Run the three checks of one proposition."""
    sym = PROOFS[prop.id]()
    hp = run_check(prop.id, dps=dps) if prop.id in CHECKS else None
    examples, failures = run_properties(prop.properties) if properties else (0, [])
    return Row(
        prop.id,
        prop.title,
        sym.ok,
        None if hp is None else hp.residual,
        None if hp is None else hp.threshold,
        examples,
        failures,
    )


def format_rows(rows: list[Row]) -> str:
    """The verification table as text."""
    from glora_math.cli import format_table

    body = [
        [
            r.pid,
            r.title,
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
            "symbolic proof",
            "high-precision residual",
            "property examples",
            "status",
        ],
        body,
    )


def main(*, dps: int = 50, properties: bool = True, only: list[str] | None = None) -> int:
    """Run everything, print the table, return the exit code."""
    t0 = time.perf_counter()
    rows = [
        verify_one(p, dps=dps, properties=properties)
        for p in PROPOSITIONS
        if only is None or p.id in only
    ]
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
