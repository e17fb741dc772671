"""Machine-checked proofs (Coq + mathcomp) of the algebraic propositions: registry and checker.

The Coq sources live in ``proofs/coq`` (library ``GLoRA``; see ``proofs/coq/README.md`` for every
statement in words and where it is weaker than or differs from :mod:`proofs.propositions`).

:data:`THEOREMS` maps a proposition id to the Coq theorems that prove it, named
``Module.theorem`` (the full Coq name is ``GLoRA.Module.theorem``). :func:`check` compiles the
library once, in a temporary directory, and asks Coq (``Print Assumptions``) whether each listed
theorem is closed under the global context, i.e. depends on no axiom, parameter or admitted
lemma. Propositions without theorems (the analytic ones) are reported "not machine-checked";
:data:`NOT_CHECKED` says why.

``python -m proofs.formal [ID ...]`` prints the table and exits 1 unless every proposition with
theorems is "checked".
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from proofs.propositions import PROPOSITIONS

COQ_DIR = Path(__file__).resolve().parent / "coq"
LOGICAL_ROOT = "GLoRA"
# mathcomp's notation warnings are noise here; errors are unaffected.
COQ_WARNINGS = (
    "-notation-overridden,-ambiguous-paths,-notation-incompatible-format,"
    "-redundant-canonical-projection"
)
CLOSED = "Closed under the global context"
DEFAULT_TIMEOUT = 300.0  # seconds per coqc call (the whole library compiles in about 10 s)

THEOREMS: dict[str, tuple[str, ...]] = {
    "P1": (
        "Projection.P1_coords_are_projected_mean",
        "Projection.P1_projection_of_the_mean",
    ),
    "P2": (
        "Projection.P2_exactness",
        "Projection.P2_exact_if_factor_columns_in",
        "Projection.P2_exact_if_client_bases_in",
        "Projection.P2_single_client",
        "Projection.consensus_contains_clients",
        "Projection.P2_exact_if_consensus_range_in",
    ),
    "P3": (
        "Gauge.P3_projector_basis_change",
        "Gauge.P3_projector_of_column_space",
        "Gauge.P3_qr_basis_spans",
        "Gauge.P3_gauge_keeps_column_space",
        "Gauge.P3_gauge_keeps_product",
        "Gauge.P3_client_projector_gauge_invariant",
        "Gauge.P3_consensus_of_column_spaces",
        "Gauge.P3_mean_gauge_invariant",
        "Gauge.P3_consensus_gauge_invariant",
        "Gauge.P3_consensus_gauge_invariant_svd",
        "Gauge.P3_update_gauge_invariant",
    ),
    "P5": ("Gauge.P5_consensus_scale_invariant",),
    "P6": (
        "Permutation.P6_weighted_sum_permutation",
        "Permutation.P6_weighted_sum_zero_weight",
        "Permutation.P6_total_weight_zero_weight",
        "Permutation.P6_mean_permutation",
        "Permutation.P6_consensus_permutation",
        "Permutation.P6_coords_permutation",
        "Permutation.P6_update_permutation",
        "Permutation.P6_right_coords_permutation",
        "Permutation.P6_fedit_permutation",
        "Permutation.P6_mean_zero_weight",
        "Permutation.P6_consensus_zero_weight",
        "Permutation.P6_coords_zero_weight",
        "Permutation.P6_right_coords_zero_weight",
    ),
    "P7": (
        "FedIT.P7_fedit_error_identity",
        "FedIT.P7_fedit_not_gauge_invariant",
    ),
    "P10": (
        "Exactness.P10_stacking_exact",
        "Exactness.P10_stacking_exact_weighted_B",
        "Exactness.P10_shared_A_exact",
        "Exactness.P10_shared_B_exact",
        "Exactness.P10_residual_fold",
        "Exactness.P10_transposed_residual_iff_symmetric",
        "Exactness.P10_transposed_residual_wrong_witness",
    ),
    "P11": (
        "Projection.P11_right_coords_are_projected_mean",
        "Projection.P11_right_projection_of_the_mean",
        "Projection.P11_right_exactness",
        "Projection.P11_exact_if_factor_rows_in",
        "Projection.P11_exact_if_right_consensus_range_in",
        "Gauge.P11_gauge_keeps_row_space",
        "Gauge.P11_client_projector_gauge_invariant",
        "Gauge.P11_right_consensus_gauge_invariant",
        "Gauge.P11_right_update_gauge_invariant",
    ),
    "P12": (
        "Certificate.P12_certificate_left",
        "Certificate.P12_kept_left",
        "Certificate.P12_certificate_left_coords",
        "Certificate.P12_certificate_right",
        "Certificate.P12_kept_right",
        "Certificate.P12_certificate_right_coords",
        "Certificate.P12_certificate_glora",
        "Certificate.P12_certificate_glora_right",
        "Certificate.P12_kept_le_total",
    ),
    "L1": (
        "Certificate.L1_fro2_is_sum_of_squares",
        "Certificate.L1_orthonormal_left_factor",
        "Certificate.L1_lowrank_norm",
        "Certificate.L1_orthonormal_right_factor",
    ),
}

# Where the Coq statements are narrower than the registry's (details in proofs/coq/README.md).
SCOPE: dict[str, str] = {
    "P1": "full (no hypothesis on U_ref needed)",
    "P2": "from col(dW_i) inside col(U_ref), or from range(K) inside col(U_ref); that the top-R "
    "eigenvectors of K span range(K) when R >= rank K is spectral and not checked",
    "P3": "K, W_bar, projectors and U_ref S for two orthonormal bases of one subspace; that "
    "TopEig_R(K) spans a subspace determined by K (eigengap > 0) is not checked",
    "P5": "K only (col(c B_i) = col(B_i) for c != 0); U_ref via TopEig_R(K) is not checked",
    "P6": "full, for every weighted client sum (W_bar, K, S, S', FedIT)",
    "P7": "full: the identity, and an orthogonal-gauge witness that FedIT moves",
    "P10": "full; the transposed FedEx residual: an iff with symmetry of the residual (d = k) "
    "and a witness where it is not symmetric",
    "P11": "as P1-P3 on the right; the spectral step is not checked",
    "P12": "full, both sides, and ||S||^2 <= ||W||^2 over an ordered field",
    "L1": "full, as squared norms (no square roots)",
}

NOT_CHECKED: dict[str, str] = {
    "P4": "Eckart-Young optimality of the truncated SVD needs the SVD and spectral theory, "
    "absent from mathcomp 1.15",
    "P8": "Eckart-Young again (best rank-R approximation of W_bar)",
    "P9": "Procrustes optimality over O(r) and the soft bound are analytic (polar "
    "decomposition, inequalities); product preservation is Gauge.P3_gauge_keeps_product",
    "P13": "monotonicity of the residual curve along nested top eigenvectors is spectral",
    "P14": "min of the two certified residuals holds by construction of side='auto'; its "
    "gauge invariance rests on P3/P11's spectral step",
}


def coq_available() -> bool:
    """Whether ``coqc`` is on the PATH (mathcomp is needed too; check() reports it if absent)."""
    return shutil.which("coqc") is not None


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
    ``"not machine-checked"`` (no theorem listed), ``"failed: <one line>"`` or ``"no coqc"``.
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
