"""The study notebooks: each .py (jupytext percent) and its .ipynb hold the same cells.

The notebooks are stored with the outputs of one complete run (``jupyter execute --inplace``)
and executed again by nbmake in `make test` (``--nbmake notebooks``).
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9]*.py"))


def test_there_are_seven_study_notebooks() -> None:
    assert [p.stem[:2] for p in SCRIPTS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_pair_is_in_sync(script: Path) -> None:
    paired = script.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} missing: run `jupytext --sync {script}`"
    py = jupytext.read(script)
    nb = jupytext.read(paired)
    assert [(c.cell_type, c.source) for c in py.cells] == [
        (c.cell_type, c.source) for c in nb.cells
    ], f"{script.name} and {paired.name} differ: run `jupytext --sync {script}`"
    # Stored with the outputs of one complete run (so that they read on a forge): every code
    # cell executed, in order, and no error output. nbmake re-executes them in CI.
    raw = nbformat.read(paired, as_version=4)
    code = [c for c in raw.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), (
        f"{paired.name}: not every code cell was executed; run `jupyter execute --inplace {paired}`"
    )
    assert counts == sorted(counts), f"{paired.name}: cells were executed out of order"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{paired.name} is stored with an error output"
