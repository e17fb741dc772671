"""Machine-checked proofs (Coq + mathcomp) of the algebraic propositions: registry and checker.

The Coq sources live in ``proofs/coq`` (library ``GLoRA``; see ``proofs/coq/README.md`` for every
statement in words and where it is weaker than or differs from :mod:`proofs.propositions`).

:data:`THEOREMS` (the registry's :data:`proofs.propositions.COQ_THEOREMS`) maps a proposition id
to the Coq theorems that prove it, named
``Module.theorem`` (the full Coq name is ``GLoRA.Module.theorem``). :func:`check` compiles the
library once, in a temporary directory, and asks Coq (``Print Assumptions``) whether each listed
theorem is closed under the global context, i.e. depends on no axiom, parameter or admitted
lemma. Propositions without theorems (the analytic ones) are reported "not machine-checked";
:data:`NOT_CHECKED` says why.

``python -m proofs.formal [ID ...]`` prints the table and exits 1 unless every proposition with
theorems is "checked".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .propositions import COQ_NOT_CHECKED as NOT_CHECKED
from .propositions import COQ_SCOPE as SCOPE
from .propositions import COQ_THEOREMS as THEOREMS
from .propositions import PROPOSITIONS

COQ_DIR = Path(__file__).resolve().parent / "coq"
LOGICAL_ROOT = "GLoRA"
# mathcomp's notation warnings are noise here; errors are unaffected.
COQ_WARNINGS = (
    "-notation-overridden,-ambiguous-paths,-notation-incompatible-format,"
    "-redundant-canonical-projection"
)
CLOSED = "Closed under the global context"
DEFAULT_TIMEOUT = 300.0  # seconds per coqc call (the whole library compiles in about 10 s)


#: The mathcomp libraries the proofs import (Debian: libcoq-mathcomp-algebra, -field and
#: -real-closed; the last gives the complex numbers of a real closed field, for the spectral
#: theorem in Spectral.v).
LIBRARIES = ("ssreflect", "algebra", "field", "real_closed")


def missing_libraries(coqc: str) -> list[str]:
    """The :data:`LIBRARIES` that ``coqc`` cannot find (under its ``user-contrib/mathcomp``)."""
    try:
        res = subprocess.run(
            [coqc, "-where"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return list(LIBRARIES)
    roots = [Path(res.stdout.strip()) / "user-contrib"]
    roots += [Path(p) for p in os.environ.get("COQPATH", "").split(os.pathsep) if p]
    return [lib for lib in LIBRARIES if not any((r / "mathcomp" / lib).is_dir() for r in roots)]


def coq_available() -> bool:
    """Whether ``coqc`` is on the PATH with every library in :data:`LIBRARIES`."""
    coqc = shutil.which("coqc")
    return coqc is not None and not missing_libraries(coqc)


def modules() -> tuple[str, ...]:
    """The Coq modules in build order (the ``.v`` lines of ``proofs/coq/_CoqProject``)."""
    lines = (COQ_DIR / "_CoqProject").read_text().splitlines()
    return tuple(Path(ln.strip()).stem for ln in lines if ln.strip().endswith(".v"))


def _one_line(text: str, limit: int = 240) -> str:
    """The first Coq error of ``text`` on one line (or its last non-empty line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Error")), None)
    if start is None:
        msg = lines[-1] if lines else "no output"
    else:
        where = lines[start - 1] if start > 0 and lines[start - 1].startswith("File") else ""
        msg = " ".join([where, *lines[start : start + 3]]).strip()
    msg = re.sub(r"\s+", " ", msg)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _dependencies(text: str) -> list[str]:
    """The library modules a Coq source requires (``From GLoRA Require [Import] A B.``)."""
    pattern = rf"From\s+{LOGICAL_ROOT}\s+Require\s+(?:Import\s+|Export\s+)?([\w\s]+?)\s*\."
    return [m for group in re.findall(pattern, text) for m in group.split()]


def _coqc(coqc: str, build: Path, source: Path, timeout: float) -> str | None:
    """Compile ``source`` inside ``build``; None on success, else a one-line reason."""
    cmd = [coqc, "-q", "-w", COQ_WARNINGS, "-Q", str(build), LOGICAL_ROOT, str(source)]
    try:
        res = subprocess.run(
            cmd, cwd=build, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return f"{source.name}: coqc timed out after {timeout:.0f} s"
    if res.returncode != 0:
        text = (res.stdout + res.stderr).replace(f"{build}/", "")
        return f"{source.name}: {_one_line(text)}"
    return None


def _all_ids() -> list[str]:
    ids = [p.id for p in PROPOSITIONS]
    return ids + [i for i in THEOREMS if i not in ids]


def check(ids: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
    """Compile the Coq library once and check the theorems of each proposition.

    Returns, per proposition id (all registry ids when ``ids`` is None), one of
    ``"checked"`` (every listed theorem compiled and is closed under the global context),
    ``"not machine-checked"`` (no theorem listed), ``"failed: <one line>"``, ``"no coqc"`` or
    ``"no Coq library: ..."`` (a mathcomp library of :data:`LIBRARIES` missing).
    """
    wanted = _all_ids() if ids is None else list(ids)
    unknown = [i for i in wanted if i not in _all_ids()]
    if unknown:
        raise KeyError(f"unknown proposition ids: {unknown}")
    out = {i: "not machine-checked" for i in wanted if not THEOREMS.get(i)}
    todo = [i for i in wanted if THEOREMS.get(i)]
    if not todo:
        return out
    coqc = shutil.which("coqc")
    if coqc is None:
        return out | {i: "no coqc" for i in todo}
    missing = missing_libraries(coqc)
    if missing:
        libs = ", ".join(f"mathcomp {m}" for m in missing)
        return out | {i: f"no Coq library: {libs}" for i in todo}
    with tempfile.TemporaryDirectory(prefix="glora-coq-") as tmp:
        build = Path(tmp)
        errors: dict[str, str] = {}
        for mod in modules():
            source = build / f"{mod}.v"
            shutil.copy2(COQ_DIR / source.name, source)
            # A module whose dependency failed is not compiled: it inherits the failure.
            failed = [errors[m] for m in _dependencies(source.read_text()) if m in errors]
            err = failed[0] if failed else _coqc(coqc, build, source, timeout)
            if err is not None:
                errors[mod] = err
        for pid in todo:
            out[pid] = _check_one(coqc, build, pid, errors, timeout)
    return {i: out[i] for i in wanted}


def _check_one(coqc: str, build: Path, pid: str, errors: dict[str, str], timeout: float) -> str:
    """Print Assumptions of every theorem of ``pid`` (modules already compiled in ``build``)."""
    names = THEOREMS[pid]
    mods = sorted({n.split(".", 1)[0] for n in names})
    bad = [errors[m] for m in mods if m in errors]
    if bad:
        return f"failed: {bad[0]}"
    stem = f"Check_{pid}"
    lines = [f"From {LOGICAL_ROOT} Require {' '.join(mods)}."]
    for n, name in enumerate(names):
        (build / f"{stem}_{n}.out").unlink(missing_ok=True)
        lines.append(f'Redirect "{stem}_{n}" Print Assumptions {LOGICAL_ROOT}.{name}.')
    source = build / f"{stem}.v"
    source.write_text("\n".join(lines) + "\n")
    err = _coqc(coqc, build, source, timeout)
    if err is not None:
        return f"failed: {err}"
    for n, name in enumerate(names):
        path = build / f"{stem}_{n}.out"
        text = path.read_text().strip() if path.exists() else ""
        if text != CLOSED:
            deps = [ln.strip() for ln in text.splitlines()[1:] if ln and not ln[0].isspace()]
            dep = "; ".join(deps) if deps else (text or "no Print Assumptions output")
            return f"failed: {name} is not closed: {_one_line(dep)}"
    return "checked"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; exit status 1 unless every proposition with theorems is checked."""
    args = list(sys.argv[1:] if argv is None else argv)
    result = check(args or None)
    width = max(len(i) for i in result)
    for pid, status in result.items():
        n = len(THEOREMS.get(pid, ()))
        print(f"{pid:<{width}}  {status}" + (f"  ({n} theorems)" if n else ""))
    ok = all(s == "checked" for pid, s in result.items() if THEOREMS.get(pid))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "LIBRARIES",
    "NOT_CHECKED",
    "SCOPE",
    "THEOREMS",
    "check",
    "coq_available",
    "missing_libraries",
    "modules",
]
