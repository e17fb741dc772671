"""The study notebooks: each .py (jupytext percent) and its .ipynb hold the same cells.

The notebooks themselves are executed by nbmake in `make test` (``--nbmake notebooks``).
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9]*.py"))


def test_there_are_six_study_notebooks() -> None:
    assert [p.stem[:2] for p in SCRIPTS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_pair_is_in_sync(script: Path) -> None:
    paired = script.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} missing: run `jupytext --sync {script}`"
    py = jupytext.read(script)
    nb = jupytext.read(paired)
    assert [(c.cell_type, c.source) for c in py.cells] == [
        (c.cell_type, c.source) for c in nb.cells
    ], f"{script.name} and {paired.name} differ: run `jupytext --sync {script}`"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{paired.name} is committed with outputs; clear them (nbmake executes it in CI)"
    )
