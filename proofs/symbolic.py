"""Symbolic proofs (sympy) of the SPEC propositions.

Two kinds of proof, as each proposition allows:

* **General identities** are proved with sympy matrix symbols of symbolic dimensions and an
  explicit list of assumptions (e.g. "G is square and invertible"). Where sympy cannot apply an
  assumption by itself, the needed lemma is stated *and proved* first (e.g. the inverse of a
  product is the product of inverses: we show ``(G^T X G)(G^-1 X^-1 G^-T) = I``).
* **Statements that need a decomposition** (a top-R eigenspace, an SVD) are proved exactly on
  rational matrices of several sizes: rational orthogonal matrices come from the Cayley
  transform ``Q = (I - X)(I + X)^-1`` of a rational skew-symmetric X, rational projectors from
  ``M (M^T M)^-1 M^T``; all arithmetic is exact, so "equal" means equal.

Each ``prove_*`` returns a :class:`SymbolicResult`; none raises on a failed proof.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
from sympy import BlockMatrix, Identity, MatrixSymbol, Rational, block_collapse, symbols

# Symbolic dimensions for the general identities.
d, k, r, R = symbols("d k r R", integer=True, positive=True)


@dataclass(frozen=True)
class SymbolicResult:
    """Outcome of one symbolic proof."""

    ok: bool
    method: str
    detail: str


def _is_zero(expr: sp.Basic) -> bool:
    e = sp.expand(expr.doit()) if hasattr(expr, "doit") else sp.expand(expr)
    if isinstance(e, sp.MatrixBase):
        return bool(e.is_zero_matrix)
    return bool(e == 0 or getattr(e, "is_ZeroMatrix", False) or sp.simplify(e) == 0)


def _projector(X: sp.MatrixExpr) -> sp.MatrixExpr:
    return X * (X.T * X).I * X.T


# ---------------------------------------------------------------------------- exact rationals


def _rng(seed: int) -> random.Random:
    return random.Random(seed)


def rational_matrix(m: int, n: int, rng: random.Random, lo: int = -5, hi: int = 5) -> sp.Matrix:
    """An m-by-n matrix of small random rationals p/q."""
    return sp.Matrix(m, n, lambda i, j: Rational(rng.randint(lo, hi), rng.randint(1, 4)))


def rational_orthogonal(n: int, rng: random.Random) -> sp.Matrix:
    """An exact orthogonal matrix: the Cayley transform of a rational skew-symmetric matrix."""
    X = rational_matrix(n, n, rng)
    X = (X - X.T) / 2
    eye = sp.eye(n)
    return (eye - X) * (eye + X).inv()


def rational_projector(M: sp.Matrix) -> sp.Matrix:
    """Exact orthogonal projector onto col(M) (M of full column rank)."""
    return M * (M.T * M).inv() * M.T


def _fro2(X: sp.Matrix) -> sp.Expr:
    return sum(v**2 for v in X)


# ------------------------------------------------------------------------------------- proofs


def prove_P1() -> SymbolicResult:
    """U_ref S = U_ref U_ref^T W_bar, for any U_ref and N = 3 clients (linearity)."""
    U = MatrixSymbol("U_ref", d, R)
    ps = symbols("p1:4", positive=True)
    Us = [MatrixSymbol(f"U{i}", d, r) for i in range(1, 4)]
    Cs = [MatrixSymbol(f"C{i}", r, k) for i in range(1, 4)]
    W = sum((p * Ui * Ci for p, Ui, Ci in zip(ps, Us, Cs, strict=True)), sp.ZeroMatrix(d, k))
    S = sum((p * U.T * Ui * Ci for p, Ui, Ci in zip(ps, Us, Cs, strict=True)), sp.ZeroMatrix(R, k))
    ok = _is_zero(U * S - U * U.T * W)
    return SymbolicResult(ok, "matrix symbols (d, k, r, R symbolic; N = 3)", "U S - U U^T W = 0")


def _lemma_inverse_of_product() -> bool:
    """(G^T X G)^-1 = G^-1 X^-1 G^-T for square invertible G, X: their product is I."""
    G = MatrixSymbol("G", r, r)
    X = MatrixSymbol("X", r, r)
    prod = (G.T * X * G * (G.I * X.I * G.T.I)).doit()
    return bool(prod == Identity(r))


def prove_P3() -> SymbolicResult:
    """Projectors, K and W_bar are invariant under per-client invertible gauges.

    P(B G) = B G (G^T B^T B G)^-1 G^T B^T = P(B) by the lemma; B G G^-1 A = B A; hence K and
    W_bar are invariant, and U_ref S = P_R(K) W_bar (P1) is a function of them only.
    """
    lemma = _lemma_inverse_of_product()
    B = MatrixSymbol("B", d, r)
    A = MatrixSymbol("A", r, k)
    G = MatrixSymbol("G", r, r)
    inv = G.I * (B.T * B).I * G.T.I  # the lemma applied to (G^T (B^T B) G)^-1
    projector_ok = _is_zero(B * G * inv * (B * G).T - _projector(B))
    product_ok = _is_zero((B * G) * (G.I * A) - B * A)
    # Exact check on rationals: K = sum p_i P(B_i G_i) equals sum p_i P(B_i).
    rng = _rng(3)
    exact_ok = True
    for dd, rr, n in ((4, 2, 2), (5, 2, 3), (6, 3, 2)):
        Bs = [rational_matrix(dd, rr, rng) for _ in range(n)]
        Gs = [rational_matrix(rr, rr, rng) + 3 * sp.eye(rr) for _ in range(n)]
        ps = [Rational(rng.randint(1, 5)) for _ in range(n)]
        K0 = sum((p * rational_projector(Bi) for p, Bi in zip(ps, Bs, strict=True)), sp.zeros(dd))
        K1 = sum(
            (p * rational_projector(Bi * Gi) for p, Bi, Gi in zip(ps, Bs, Gs, strict=True)),
            sp.zeros(dd),
        )
        exact_ok &= (K0 - K1).is_zero_matrix is True
    ok = lemma and projector_ok and product_ok and exact_ok
    return SymbolicResult(
        ok,
        "matrix symbols + lemma (G invertible, B full column rank); exact rationals for K",
        f"lemma {lemma}, P(BG)=P(B) {projector_ok}, (BG)(G^-1 A)=BA {product_ok}, K {exact_ok}",
    )


def prove_P2() -> SymbolicResult:
    """If span(U_ref) = sum_i col(B_i) then U_ref S = W_bar (exact rationals, several sizes).

    With R = dim of the union, U_ref U_ref^T is the projector onto col([B_1 ... B_N]); P1 gives
    U_ref S = P W_bar and P B_i = B_i, so P W_bar = W_bar. Special cases: one client; clients
    with coinciding subspaces and R = r.
    """
    rng = _rng(2)
    ok = True
    for dd, kk, rr, n in ((5, 4, 2, 2), (7, 3, 2, 3), (6, 5, 3, 1)):
        Bs = [rational_matrix(dd, rr, rng) for _ in range(n)]
        As = [rational_matrix(rr, kk, rng) for _ in range(n)]
        ps = [Rational(rng.randint(1, 5)) for _ in range(n)]
        W = sum((p * Bi * Ai for p, Bi, Ai in zip(ps, Bs, As, strict=True)), sp.zeros(dd, kk))
        P = rational_projector(sp.Matrix.hstack(*Bs))
        ok &= (P * W - W).is_zero_matrix is True
    # Coinciding subspaces, R = r: B_i = B_0 X_i.
    B0 = rational_matrix(6, 2, rng)
    Bs = [B0 * (rational_matrix(2, 2, rng) + 3 * sp.eye(2)) for _ in range(3)]
    As = [rational_matrix(2, 4, rng) for _ in range(3)]
    W = sum((Bi * Ai for Bi, Ai in zip(Bs, As, strict=True)), sp.zeros(6, 4))
    ok &= (rational_projector(B0) * W - W).is_zero_matrix is True
    return SymbolicResult(
        ok, "exact rationals, sizes (5,4,2,2) (7,3,2,3) (6,5,3,1) + coinciding", "P W_bar = W_bar"
    )


def _svd_rational(
    m: int, n: int, sigma: list[int], rng: random.Random
) -> tuple[sp.Matrix, sp.Matrix, sp.Matrix]:
    p = len(sigma)
    U = rational_orthogonal(m, rng)[:, :p]
    V = rational_orthogonal(n, rng)[:, :p]
    return U, sp.diag(*sigma), V


def prove_P4() -> SymbolicResult:
    """Readout: error^2 = sum_{j>r} s_j^2, nested in r, exact at R, monotone (exact rationals).

    S = U diag(s) V^T is built with rational orthogonal U, V and distinct integer s; the balanced
    readout uses sqrt(s), so the product B^(r) A^(r) = U_r diag(s_r) V_r^T is exact.
    """
    rng = _rng(4)
    ok = True
    for m, n, sig in ((4, 5, [5, 3, 2, 1]), (3, 6, [7, 4, 1]), (5, 5, [9, 6, 5, 2, 1])):
        U, D, V = _svd_rational(m, n, sig, rng)
        S = U * D * V.T
        errs = []
        prev = None
        for rr in range(1, len(sig) + 1):
            Br = U[:, :rr] * sp.diag(*[sp.sqrt(s) for s in sig[:rr]])
            Ar = sp.diag(*[sp.sqrt(s) for s in sig[:rr]]) * V[:, :rr].T
            E = S - Br * Ar
            err2 = sp.nsimplify(_fro2(E))
            ok &= sp.simplify(err2 - sum(s**2 for s in sig[rr:])) == 0
            if prev is not None:
                ok &= sp.simplify(Br[:, : rr - 1] * Ar[: rr - 1, :] - prev) == sp.zeros(m, n)
            prev = Br * Ar
            errs.append(err2)
        ok &= errs[-1] == 0 and all(a >= b for a, b in itertools.pairwise(errs))
    return SymbolicResult(
        ok, "exact rationals (Cayley SVDs), 3 sizes", "EY error, nested, exact at R, monotone"
    )


def prove_P5() -> SymbolicResult:
    """P(c B) = P(B) for scalar c > 0 (so K and U_ref ignore client scales)."""
    B = MatrixSymbol("B", d, r)
    c = symbols("c", positive=True)
    # Lemma: (c^2 X)^-1 = c^-2 X^-1, since (c^2 X)(c^-2 X^-1) = I.
    X = MatrixSymbol("X", r, r)
    lemma = ((c**2 * X) * (c**-2 * X.I)).doit() == Identity(r)
    ok = _is_zero(c * B * (c**-2 * (B.T * B).I) * c * B.T - _projector(B))
    return SymbolicResult(bool(lemma) and ok, "matrix symbols + lemma", "P(cB) = P(B)")


def prove_P6() -> SymbolicResult:
    """K and S are sums over clients: invariant under permutations; p_j = 0 drops client j."""
    ps = symbols("p1:4", nonnegative=True)
    Ps = [MatrixSymbol(f"P{i}", d, d) for i in range(1, 4)]
    K = ps[0] * Ps[0] + ps[1] * Ps[1] + ps[2] * Ps[2]
    Kperm = ps[2] * Ps[2] + ps[0] * Ps[0] + ps[1] * Ps[1]
    perm_ok = _is_zero(K - Kperm)
    drop_ok = _is_zero(K.subs(ps[1], 0) - (ps[0] * Ps[0] + ps[2] * Ps[2]))
    return SymbolicResult(
        perm_ok and drop_ok,
        "matrix symbols (N = 3)",
        f"permutation {perm_ok}, zero weight {drop_ok}",
    )


def prove_P7() -> SymbolicResult:
    """sum p_i B_i A_i - B_bar A_bar = sum p_i (B_i - B_bar)(A_i - A_bar) when sum p_i = 1.

    And a witness that FedIT is not gauge invariant (exact rationals).
    """
    p1, p2 = symbols("p1 p2")
    ps = [p1, p2, 1 - p1 - p2]
    Bs = [MatrixSymbol(f"B{i}", d, r) for i in range(1, 4)]
    As = [MatrixSymbol(f"A{i}", r, k) for i in range(1, 4)]
    Bb = sum((p * Bi for p, Bi in zip(ps, Bs, strict=True)), sp.ZeroMatrix(d, r))
    Ab = sum((p * Ai for p, Ai in zip(ps, As, strict=True)), sp.ZeroMatrix(r, k))
    lhs = (
        sum((p * Bi * Ai for p, Bi, Ai in zip(ps, Bs, As, strict=True)), sp.ZeroMatrix(d, k))
        - Bb * Ab
    )
    rhs = sum(
        (p * (Bi - Bb) * (Ai - Ab) for p, Bi, Ai in zip(ps, Bs, As, strict=True)),
        sp.ZeroMatrix(d, k),
    )
    identity_ok = _is_zero(lhs - rhs)
    # Witness: two clients, client 2 rotated by a rational orthogonal gauge.
    rng = _rng(7)
    B1, B2 = rational_matrix(4, 2, rng), rational_matrix(4, 2, rng)
    A1, A2 = rational_matrix(2, 3, rng), rational_matrix(2, 3, rng)
    Q = rational_orthogonal(2, rng)
    half = Rational(1, 2)
    before = (half * (B1 + B2)) * (half * (A1 + A2))
    after = (half * (B1 + B2 * Q)) * (half * (A1 + Q.T * A2))
    witness = not (before - after).is_zero_matrix
    return SymbolicResult(
        identity_ok and witness,
        "matrix symbols (N = 3, p3 = 1 - p1 - p2) + rational witness",
        f"identity {identity_ok}, FedIT moves under a gauge {witness}",
    )


def prove_P8() -> SymbolicResult:
    """||W - P W||^2 >= sum_{j>R} s_j(W)^2 for rank-R projectors P; equality for P = U_R U_R^T.

    Pythagoras ||W - PW||^2 = ||W||^2 - ||PW||^2 for symmetric idempotent P, then exact rational
    checks of the inequality (Eckart-Young) over random rational projectors, and of equality.
    """
    rng = _rng(8)
    ok = True
    for m, n, sig, RR in (
        (5, 4, [6, 4, 3, 1], 2),
        (4, 6, [5, 2, 1], 1),
        (6, 5, [8, 5, 4, 2, 1], 3),
    ):
        U, D, V = _svd_rational(m, n, sig, rng)
        W = U * D * V.T
        floor = sum(s**2 for s in sig[RR:])
        Pbest = U[:, :RR] * U[:, :RR].T
        ok &= _fro2(W - Pbest * W) == floor
        for _ in range(4):
            P = rational_projector(rational_matrix(m, RR, rng) + sp.eye(m)[:, :RR])
            pyth = _fro2(W - P * W) - (_fro2(W) - _fro2(P * W))
            ok &= pyth == 0 and _fro2(W - P * W) >= floor
    return SymbolicResult(
        ok,
        "exact rationals (Cayley SVDs, random rational projectors)",
        "Pythagoras, EY inequality, equality case",
    )


def _soft_bound_lemma() -> tuple[bool, str]:
    """Proof of the soft-alignment bound ``||R - I||_F <= 2 lam ||R* - I||_F`` (SPEC P9).

    Setting: ``R* in SO(r)``, ``lam in [0, 1]``, ``X = (1 - lam) I + lam R*``, ``R = polar(X)``
    (X invertible, i.e. not lam = 1/2 with -1 an eigenvalue of R*).

    Stated lemma (real Schur form of an orthogonal matrix): ``R* = Q diag(rot(t_1), ...,
    rot(t_m), 1, ..., 1) Q^T`` with Q orthogonal (eigenvalues -1 of an SO(r) matrix pair up
    into rot(pi) blocks). X is then block diagonal in the same basis, the polar factor of a
    block-diagonal invertible matrix is the block-diagonal of the blocks' polar factors, and
    Frobenius norms are invariant under Q, so it suffices to prove, per 2x2 block
    (1x1 blocks are 1 on both sides and contribute 0):

    1. ``(1 - lam) I + lam rot(t) = rho W`` with ``W = [[a, -b], [b, a]] / rho`` orthogonal,
       ``det W = 1``, ``rho = sqrt(a^2 + b^2) > 0``, where ``a = 1 - lam + lam cos t`` and
       ``b = lam sin t`` (so ``W = polar(X)`` by uniqueness of the polar factor, ``rho I``
       being symmetric positive definite);
    2. ``||W - I||_F^2 = 2 (2 - 2 c)`` with ``c = a / rho`` in ``[-1, 1]``, and
       ``||rot(t) - I||_F^2 = 2 (2 - 2 cos t)``;
    3. with ``z = a + i b = rho e^{i phi}``: ``|z - 1|^2 = lam^2 |e^{it} - 1|^2`` and
       ``|z - 1|^2 = rho^2 - 2 rho c + 1``;
    4. ``4 |z - 1|^2 - |e^{i phi} - 1|^2 = 4 rho^2 + 2 - c (8 rho - 2)``, linear in c, equal to
       ``4 (rho - 1)^2 >= 0`` at c = 1 and ``4 rho (rho + 2) >= 0`` at c = -1, hence >= 0 on
       ``[-1, 1]``: ``|e^{i phi} - 1| <= 2 |z - 1| = 2 lam |e^{it} - 1|``.

    Squaring and summing over blocks gives the bound. sympy checks every identity; the sign
    facts are read off the factored forms.
    """
    lam, t = symbols("lam t", real=True)
    rho, c = symbols("rho c", real=True)
    a = 1 - lam + lam * sp.cos(t)
    b = lam * sp.sin(t)
    rot = sp.Matrix([[sp.cos(t), -sp.sin(t)], [sp.sin(t), sp.cos(t)]])
    X = (1 - lam) * sp.eye(2) + lam * rot
    rho_t = sp.sqrt(a**2 + b**2)
    W = sp.Matrix([[a, -b], [b, a]]) / rho_t
    step1 = (
        sp.simplify(X - sp.Matrix([[a, -b], [b, a]])) == sp.zeros(2, 2)
        and sp.simplify(W.T * W - sp.eye(2)) == sp.zeros(2, 2)
        and sp.simplify(W.det() - 1) == 0
    )
    fro2 = lambda M: sum(e**2 for e in M)  # noqa: E731
    step2 = (
        sp.simplify(fro2(W - sp.eye(2)) - 2 * (2 - 2 * a / rho_t)) == 0
        and sp.simplify(fro2(rot - sp.eye(2)) - 2 * (2 - 2 * sp.cos(t))) == 0
    )  # and c = a / rho lies in [-1, 1] because rho^2 = a^2 + b^2 >= a^2
    z_minus_1 = (a - 1) ** 2 + b**2
    step3 = (
        sp.simplify(z_minus_1 - lam**2 * ((sp.cos(t) - 1) ** 2 + sp.sin(t) ** 2)) == 0
        and sp.simplify(z_minus_1 - (rho_t**2 - 2 * rho_t * (a / rho_t) + 1)) == 0
    )
    gap = 4 * (rho**2 - 2 * rho * c + 1) - (2 - 2 * c)
    h = 4 * rho**2 + 2 - c * (8 * rho - 2)
    step4 = (
        sp.expand(gap - h) == 0
        and sp.factor(h.subs(c, 1)) == 4 * (rho - 1) ** 2
        and sp.factor(h.subs(c, -1)) == 4 * rho * (rho + 2)
        and sp.diff(h, c, 2) == 0  # linear in c: its minimum on [-1, 1] is at an endpoint
    )
    ok = bool(step1 and step2 and step3 and step4)
    return ok, f"soft bound: blocks {step1}, norms {step2}, chord {step3}, inequality {step4}"


def prove_P9() -> SymbolicResult:
    """Procrustes: (B R)(R^T A) = B A for R^T R = I; R* = U V^T maximises tr(R^T M) over O(r);
    the soft rotation satisfies ||R_soft - I||_F <= 2 lam ||R* - I||_F.

    Optimality is checked exactly against rational orthogonal competitors; the soft bound is
    proved by :func:`_soft_bound_lemma` (reduction to 2x2 rotation blocks, then sympy).
    """
    B = MatrixSymbol("B", d, r)
    A = MatrixSymbol("A", r, k)
    Rm = MatrixSymbol("R", r, r)
    # Assumption R R^T = I, applied by substitution.
    expr = (B * Rm * (Rm.T * A)).doit()
    product_ok = _is_zero(expr.subs(Rm * Rm.T, Identity(r)) - B * A)
    rng = _rng(9)
    opt_ok = True
    for n, sig in ((2, [3, 1]), (3, [5, 2, 1]), (4, [4, 3, 2, 1])):
        U, D, V = _svd_rational(n, n, sig, rng)
        M = U * D * V.T
        Rstar = U * V.T
        best = (Rstar.T * M).trace()
        opt_ok &= best == sum(sig)
        for _ in range(5):
            Q = rational_orthogonal(n, rng)
            opt_ok &= (Q.T * M).trace() <= best
    soft_ok, soft_detail = _soft_bound_lemma()
    return SymbolicResult(
        product_ok and opt_ok and soft_ok,
        "matrix symbols + exact rationals + 2x2-block lemma",
        f"product {product_ok}, optimality {opt_ok}, {soft_detail}",
    )


def prove_P10() -> SymbolicResult:
    """Stacking [B_1 B_2 B_3][p_1 A_1; p_2 A_2; p_3 A_3] = sum p_i B_i A_i; shared-A; FedEx fold."""
    ps = symbols("p1:4", nonnegative=True)
    Bs = [MatrixSymbol(f"B{i}", d, r) for i in range(1, 4)]
    As = [MatrixSymbol(f"A{i}", r, k) for i in range(1, 4)]
    stacked = block_collapse(
        BlockMatrix([Bs]) * BlockMatrix([[p * Ai] for p, Ai in zip(ps, As, strict=True)])
    )
    W = sum((p * Bi * Ai for p, Bi, Ai in zip(ps, Bs, As, strict=True)), sp.ZeroMatrix(d, k))
    stack_ok = _is_zero(stacked - W)
    A = MatrixSymbol("A", r, k)
    shared_ok = _is_zero(
        sum((p * Bi * A for p, Bi in zip(ps, Bs, strict=True)), sp.ZeroMatrix(d, k))
        - (sum((p * Bi for p, Bi in zip(ps, Bs, strict=True)), sp.ZeroMatrix(d, r))) * A
    )
    Bb = MatrixSymbol("Bbar", d, r)
    Ab = MatrixSymbol("Abar", r, k)
    fold_ok = _is_zero(Bb * Ab + (W - Bb * Ab) - W)
    return SymbolicResult(
        stack_ok and shared_ok and fold_ok,
        "matrix symbols (block matrices, N = 3)",
        f"stacking {stack_ok}, shared A {shared_ok}, FedEx fold {fold_ok}",
    )


def prove_L1() -> SymbolicResult:
    """||B A||_F = ||T A||_F for B = Q T with Q^T Q = I (metrics without forming B A)."""
    Q = MatrixSymbol("Q", d, r)
    T = MatrixSymbol("T", r, r)
    A = MatrixSymbol("A", r, k)
    gram = ((Q * T * A).T * (Q * T * A)).doit()
    ok = _is_zero(gram.subs(Q.T * Q, Identity(r)) - (T * A).T * (T * A))
    return SymbolicResult(ok, "matrix symbols", "(QTA)^T(QTA) = (TA)^T(TA), so the traces agree")


PROOFS: dict[str, Callable[[], SymbolicResult]] = {
    "P1": prove_P1,
    "P2": prove_P2,
    "P3": prove_P3,
    "P4": prove_P4,
    "P5": prove_P5,
    "P6": prove_P6,
    "P7": prove_P7,
    "P8": prove_P8,
    "P9": prove_P9,
    "P10": prove_P10,
    "L1": prove_L1,
}
