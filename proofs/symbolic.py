"""Symbolic proofs (sympy) of the SPEC propositions.

Two kinds of proof, as each proposition allows:

* **General identities** are proved with sympy matrix symbols of symbolic dimensions and an
  explicit list of assumptions (e.g. "G is square and invertible"). Where sympy cannot apply an
  assumption by itself, the needed lemma is stated *and proved* first (e.g. the inverse of a
  product is the product of inverses: we show ``(G^T X G)(G^-1 X^-1 G^-T) = I``).
* **Statements that need a decomposition** (a top-R eigenspace, an SVD) are proved exactly on
  rational matrices of several sizes: rational orthogonal matrices come from the Cayley
  transform ``Q = (I - X)(I + X)^-1`` of a rational skew-symmetric X, rational projectors from
  ``M (M^T M)^-1 M^T``; all arithmetic is exact, so "equal" means equal. Where a proof needs
  the consensus eigenvectors themselves (P11-P14, ours), the clients are *aligned*:
  ``B_i = Q[:, J_i] G_i`` with Q rational orthogonal, so K is exactly diagonal in Q's basis.

Each ``prove_*`` returns a :class:`SymbolicResult`; none raises on a failed proof.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
from sympy import (
    BlockMatrix,
    Identity,
    MatMul,
    MatPow,
    MatrixSymbol,
    Rational,
    block_collapse,
    symbols,
)

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


# ------------------------------------------------------- extensions beyond the paper (ours)


def _apply_projector_lemma(expr: sp.Basic, P: sp.MatrixExpr) -> sp.Basic:
    """Rewrite ``expr`` with the stated lemma ``P^T = P`` and ``P P = P``.

    sympy cannot use the assumption by itself: every ``P^T`` becomes ``P`` and every run of
    P's (a product or a power) collapses to one P, until nothing changes. The lemma holds for
    ``P = U U^T`` with ``U^T U = I`` (:func:`_lemma_orthonormal_projector`).
    """

    def collapse(m: sp.Basic) -> sp.Basic:
        out: list[sp.Basic] = []
        for a in m.args:
            f = P if isinstance(a, MatPow) and a.base == P else a
            if not (f == P and out and out[-1] == P):
                out.append(f)
        return MatMul(*out)

    expr = expr.subs(P.T, P)
    prev = None
    while prev != expr:
        prev = expr
        expr = expr.replace(lambda e: isinstance(e, MatMul), collapse)
        expr = expr.replace(lambda e: isinstance(e, MatPow) and e.base == P, lambda e: P)
    return expr


def _lemma_orthonormal_projector() -> bool:
    """``U^T U = I`` => ``U U^T`` is symmetric and idempotent (left; right: ``V V^T``)."""
    U = MatrixSymbol("U", d, R)
    V = MatrixSymbol("V", k, R)
    ok = True
    for X in (U, V):
        P = X * X.T
        ok &= _is_zero(P.T - P)
        ok &= _is_zero(MatMul(X, X.T, X, X.T).subs(X.T * X, Identity(R)).doit() - P)
    return ok


def _lemma_inverse_of_product_right() -> bool:
    """(H X H^T)^-1 = H^-T X^-1 H^-1 for square invertible H, X: their product is I."""
    H = MatrixSymbol("H", r, r)
    X = MatrixSymbol("X", r, r)
    return bool((H * X * H.T * (H.T.I * X.I * H.I)).doit() == Identity(r))


def _right_gauge_invariance() -> tuple[bool, str]:
    """Row-space projectors, K_R and the clients' products under (B H^-1, H A), H invertible.

    P(A^T) = A^T (A A^T)^-1 A is the projector onto row(A) (it is V V^T for any orthonormal
    basis V of row(A)). With the lemma, P((H A)^T) = P(A^T) and (B H^-1)(H A) = B A, so
    K_R = sum_i p_i P(A_i^T), W_bar, V_ref V_ref^T and W_bar V_ref V_ref^T are unchanged.
    Exact rationals confirm K_R on three sizes.
    """
    lemma = _lemma_inverse_of_product_right()
    B = MatrixSymbol("B", d, r)
    A = MatrixSymbol("A", r, k)
    H = MatrixSymbol("H", r, r)
    inv = H.T.I * (A * A.T).I * H.I  # the lemma applied to (H (A A^T) H^T)^-1
    projector_ok = _is_zero((H * A).T * inv * (H * A) - _projector(A.T))
    product_ok = _is_zero((B * H.I) * (H * A) - B * A)
    rng = _rng(11)
    exact_ok = True
    for kk, rr, n in ((4, 2, 2), (5, 2, 3), (6, 3, 2)):
        As = [rational_matrix(rr, kk, rng) for _ in range(n)]
        Hs = [_rational_invertible(rr, rng) for _ in range(n)]
        ps = [Rational(rng.randint(1, 5)) for _ in range(n)]
        K0 = sum((p * rational_projector(Ai.T) for p, Ai in zip(ps, As, strict=True)), sp.zeros(kk))
        K1 = sum(
            (p * rational_projector((Hi * Ai).T) for p, Ai, Hi in zip(ps, As, Hs, strict=True)),
            sp.zeros(kk),
        )
        exact_ok &= (K0 - K1).is_zero_matrix is True
    ok = lemma and projector_ok and product_ok and exact_ok
    detail = (
        f"lemma {lemma}, P((HA)^T)=P(A^T) {projector_ok}, (BH^-1)(HA)=BA {product_ok}, "
        f"K_R {exact_ok}"
    )
    return ok, detail


def _rational_invertible(n: int, rng: random.Random) -> sp.Matrix:
    """A random rational n-by-n matrix with non-zero determinant (a gauge)."""
    while True:
        G = rational_matrix(n, n, rng) + 3 * sp.eye(n)
        if G.det() != 0:
            return G


@dataclass(frozen=True)
class _Aligned:
    """Clients whose consensus matrices have exact rational eigenvectors.

    ``B_i = Q1[:, J_i] G_i`` and ``A_i = H_i Q2[:, L_i]^T`` with rational orthogonal Q1 (d x d),
    Q2 (k x k) and invertible G_i, H_i: then P(B_i) = Q1_J Q1_J^T, so K = Q1 diag(c) Q1^T with
    c_j = sum of p_i over the clients that use column j, and likewise K_R = Q2 diag(c') Q2^T.
    """

    Bs: list[sp.Matrix]
    As: list[sp.Matrix]
    ps: list[sp.Expr]
    Q1: sp.Matrix
    Q2: sp.Matrix

    @property
    def mean(self) -> sp.Matrix:
        W = sp.zeros(self.Bs[0].rows, self.As[0].cols)
        for p, Bi, Ai in zip(self.ps, self.Bs, self.As, strict=True):
            W += p * Bi * Ai
        return W

    def K(self, side: str) -> sp.Matrix:
        """K (left, from the B_i's column spaces) or K_R (right, from the A_i's row spaces)."""
        Ms = self.Bs if side == "left" else [Ai.T for Ai in self.As]
        K = sp.zeros(Ms[0].rows)
        for p, Mi in zip(self.ps, Ms, strict=True):
            K += p * rational_projector(Mi)
        return K

    def ordered_basis(self, side: str) -> tuple[sp.Matrix, list[sp.Expr], bool]:
        """All eigenvectors of the side's K, by decreasing eigenvalue, and their eigenvalues.

        The flag is True when Q^T K Q is exactly diagonal (so the columns are eigenvectors).
        """
        Q = self.Q1 if side == "left" else self.Q2
        D = Q.T * self.K(side) * Q
        diagonal = (D - sp.diag(*[D[j, j] for j in range(D.rows)])).is_zero_matrix is True
        order = sorted(range(D.rows), key=lambda j: -D[j, j])  # stable: ties keep Q's order
        basis = sp.Matrix.hstack(*[Q[:, j] for j in order])
        return basis, [D[j, j] for j in order], diagonal

    def gauged(self, rng: random.Random) -> _Aligned:
        """The same clients under random per-client gauges (B_i M_i, M_i^-1 A_i)."""
        Ms = [_rational_invertible(Bi.cols, rng) for Bi in self.Bs]
        return _Aligned(
            [Bi * Mi for Bi, Mi in zip(self.Bs, Ms, strict=True)],
            [Mi.inv() * Ai for Mi, Ai in zip(Ms, self.As, strict=True)],
            self.ps,
            self.Q1,
            self.Q2,
        )


def _aligned(  # noqa: PLR0917 - a test-problem builder
    dd: int,
    kk: int,
    J: list[list[int]],
    L: list[list[int]],
    ps: list[sp.Expr],
    rng: random.Random,
) -> _Aligned:
    Q1 = rational_orthogonal(dd, rng)
    Q2 = rational_orthogonal(kk, rng)
    Bs = [
        sp.Matrix.hstack(*[Q1[:, j] for j in Ji]) * _rational_invertible(len(Ji), rng) for Ji in J
    ]
    As = [
        _rational_invertible(len(Li), rng) * sp.Matrix.hstack(*[Q2[:, j] for j in Li]).T for Li in L
    ]
    return _Aligned(Bs, As, ps, Q1, Q2)


def _side_update(pb: _Aligned, side: str, RR: int) -> tuple[sp.Matrix, sp.Matrix, bool]:
    """(update, S) of one side at rank RR from the exact ordered basis; flag: exact eigvecs, a
    strict eigengap at RR (so the top-RR eigenspace is unique)."""
    basis, ev, diagonal = pb.ordered_basis(side)
    X = basis[:, :RR]
    W = pb.mean
    gap = RR >= len(ev) or ev[RR - 1] > ev[RR]
    if side == "left":
        S = X.T * W  # = sum_i p_i (U_ref^T B_i) A_i
        return X * S, S, diagonal and gap
    S = sum(
        (p * Bi * (Ai * X) for p, Bi, Ai in zip(pb.ps, pb.Bs, pb.As, strict=True)),
        sp.zeros(W.rows, RR),
    )  # S' = sum_i p_i B_i (A_i V_ref)
    return S * X.T, S, diagonal and gap


# Weights and column sets of the aligned test problems: (d, k, J_i, L_i, R), p = (1/2, 1/3, 1/6).
_ALIGNED_CASES: tuple[tuple[int, int, list[list[int]], list[list[int]], int], ...] = (
    (5, 6, [[0, 1], [1, 2], [3, 4]], [[0, 1], [1, 2], [4, 5]], 2),
    (6, 5, [[0, 1], [2], [2, 3]], [[0, 1], [2], [2, 3]], 3),
    (6, 7, [[0, 1, 2], [2, 3], [4]], [[0, 1, 2], [3, 4], [5]], 3),
)
_WEIGHTS = [Rational(1, 2), Rational(1, 3), Rational(1, 6)]


def prove_P11() -> SymbolicResult:
    """Right-side consensus (ours): S' V_ref^T = W_bar V_ref V_ref^T; exact when R >= dim of the
    union of the row spaces; invariant under per-client GL(r_i) gauges.

    Matrix symbols (N = 3, d, k, r, R symbolic) in the gauge-fixed form B_i A_i = C_i V_i^T:
    S' = sum_i p_i C_i (V_i^T V_ref) gives S' V_ref^T = W_bar V_ref V_ref^T for any V_ref (by
    linearity), and S'^T = V_ref^T W_bar^T is the left state of the transposed clients. Gauges:
    :func:`_right_gauge_invariance`. Exact rationals: the identity at R below the union with
    exact eigenvectors of K_R (aligned clients, three sizes), and exactness W_bar P = W_bar for
    the projector onto the union of the row spaces (three sizes).
    """
    V = MatrixSymbol("V_ref", k, R)
    ps = symbols("p1:4", positive=True)
    Cs = [MatrixSymbol(f"C{i}", d, r) for i in range(1, 4)]
    Vs = [MatrixSymbol(f"V{i}", k, r) for i in range(1, 4)]
    W = sum((p * Ci * Vi.T for p, Ci, Vi in zip(ps, Cs, Vs, strict=True)), sp.ZeroMatrix(d, k))
    S = sum(
        (p * Ci * (Vi.T * V) for p, Ci, Vi in zip(ps, Cs, Vs, strict=True)), sp.ZeroMatrix(d, R)
    )
    projection_ok = _is_zero(S * V.T - W * V * V.T)
    transpose_ok = _is_zero(S.T - V.T * W.T)
    gauge_ok, gauge_detail = _right_gauge_invariance()
    rng = _rng(11)
    exact_ok = True
    for dd, kk, J, L, RR in _ALIGNED_CASES:
        pb = _aligned(dd, kk, J, L, _WEIGHTS, rng)
        update, _, eig_ok = _side_update(pb, "right", RR)
        basis, _, _ = pb.ordered_basis("right")
        X = basis[:, :RR]
        exact_ok &= eig_ok and (update - pb.mean * X * X.T).is_zero_matrix is True
    for dd, kk, rr, n in ((4, 5, 2, 2), (3, 7, 2, 3), (5, 6, 3, 1)):
        Bs = [rational_matrix(dd, rr, rng) for _ in range(n)]
        As = [rational_matrix(rr, kk, rng) for _ in range(n)]
        ps_ = [Rational(rng.randint(1, 5)) for _ in range(n)]
        Wr = sum((p * Bi * Ai for p, Bi, Ai in zip(ps_, Bs, As, strict=True)), sp.zeros(dd, kk))
        P = rational_projector(sp.Matrix.hstack(*[Ai.T for Ai in As]))
        exact_ok &= (Wr * P - Wr).is_zero_matrix is True
    ok = projection_ok and transpose_ok and gauge_ok and exact_ok
    return SymbolicResult(
        ok,
        "matrix symbols (N = 3) + lemma (H invertible); exact rationals (aligned eigvecs, union)",
        f"S'V^T = W V V^T {projection_ok}, transpose {transpose_ok}, {gauge_detail}, "
        f"exact cases {exact_ok}",
    )


def prove_P12() -> SymbolicResult:
    """Certificate identity: ||W - P W||^2 = ||W||^2 - ||P W||^2 and ||P W|| = ||S||.

    Stated and proved lemma: for U^T U = I, P = U U^T is symmetric and idempotent. Then
    (W - P W)^T (W - P W) = W^T W - (P W)^T (P W) (left; right: (W - W Q)(W - W Q)^T =
    W W^T - (W Q)(W Q)^T for Q = V V^T) and the traces are the squared norms;
    (U U^T W)^T (U U^T W) = (U^T W)^T (U^T W), i.e. ||P W|| = ||S|| with S = U^T W (right:
    S = W V). The direct form of the certificate is the block identity
    [p_1 B_1 ... p_N B_N, -U][A_1; ...; A_N; S] = W_bar - U S. Exact rationals: both
    orientations with rational orthonormal bases and with GLoRA states (three sizes).
    """
    lemma = _lemma_orthonormal_projector()
    W = MatrixSymbol("W", d, k)
    P = MatrixSymbol("P", d, d)
    Q = MatrixSymbol("Q", k, k)
    left = _apply_projector_lemma(((W - P * W).T * (W - P * W)).expand(), P)
    left_ok = _is_zero(left - _apply_projector_lemma((W.T * W - (P * W).T * (P * W)).expand(), P))
    right = _apply_projector_lemma(((W - W * Q) * (W - W * Q).T).expand(), Q)
    right_ok = _is_zero(right - _apply_projector_lemma((W * W.T - (W * Q) * (W * Q).T).expand(), Q))
    # Without the lemma the identity is not an algebraic consequence (the proof uses it).
    needs_lemma = not _is_zero((W - P * W).T * (W - P * W) - (W.T * W - (P * W).T * (P * W)))
    U = MatrixSymbol("U", d, R)
    V = MatrixSymbol("V", k, R)
    kept_left = ((U * U.T * W).T * (U * U.T * W)).doit().subs(U.T * U, Identity(R))
    kept_right = ((W * V * V.T) * (W * V * V.T).T).doit().subs(V.T * V, Identity(R))
    kept_ok = _is_zero(kept_left - (U.T * W).T * (U.T * W)) and _is_zero(
        kept_right - (W * V) * (W * V).T
    )
    ps = symbols("p1:4", positive=True)
    Bs = [MatrixSymbol(f"B{i}", d, r) for i in range(1, 4)]
    As = [MatrixSymbol(f"A{i}", r, k) for i in range(1, 4)]
    Wbar = sum((p * Bi * Ai for p, Bi, Ai in zip(ps, Bs, As, strict=True)), sp.ZeroMatrix(d, k))
    S = U.T * Wbar
    stacked = block_collapse(
        BlockMatrix([[*(p * Bi for p, Bi in zip(ps, Bs, strict=True)), -U]])
        * BlockMatrix([[Ai] for Ai in As] + [[S]])
    )
    direct_ok = _is_zero(stacked - (Wbar - U * S))
    rng = _rng(12)
    exact_ok = True
    for m, n, RR in ((5, 4, 2), (4, 6, 3), (6, 5, 1)):
        Wr = rational_matrix(m, n, rng)
        Ur = rational_orthogonal(m, rng)[:, :RR]
        Vr = rational_orthogonal(n, rng)[:, :RR]
        Sl, Sr = Ur.T * Wr, Wr * Vr
        exact_ok &= _fro2(Wr - Ur * Sl) == _fro2(Wr) - _fro2(Sl)
        exact_ok &= _fro2(Ur * Sl) == _fro2(Sl)
        exact_ok &= _fro2(Wr - Sr * Vr.T) == _fro2(Wr) - _fro2(Sr)
        exact_ok &= _fro2(Sr * Vr.T) == _fro2(Sr)
    for dd, kk, J, L, RR in _ALIGNED_CASES:
        pb = _aligned(dd, kk, J, L, _WEIGHTS, rng)
        Wr = pb.mean
        for side in ("left", "right"):
            update, S_, eig_ok = _side_update(pb, side, RR)
            exact_ok &= eig_ok and _fro2(Wr - update) == _fro2(Wr) - _fro2(S_)
    ok = lemma and left_ok and right_ok and needs_lemma and kept_ok and direct_ok and exact_ok
    return SymbolicResult(
        ok,
        "matrix symbols + lemma (P^T = P = P^2 from U^T U = I); exact rationals, 2 x 3 sizes",
        f"lemma {lemma}, Pythagoras left {left_ok} right {right_ok} (needs the lemma "
        f"{needs_lemma}), ||PW|| = ||S|| {kept_ok}, direct form {direct_ok}, exact {exact_ok}",
    )


def _auto_rank(curve: list[sp.Expr], tol: sp.Expr) -> int | None:
    """The smallest R with rho(R)^2 <= tol^2 (None if there is none)."""
    return next((RR for RR, v in enumerate(curve) if v <= tol**2), None)


def _residual_curve(pb: _Aligned, side: str) -> tuple[list[sp.Expr], list[sp.Expr], int, bool]:
    """rho(R)^2 for R = 0..n from the rows of S of the full ordered basis, the same from the
    projected update directly, the number of positive eigenvalues, and the eigvec flag."""
    basis, ev, diagonal = pb.ordered_basis(side)
    W = pb.mean if side == "left" else pb.mean.T
    S = basis.T * W  # rows s_j (right: the transposed problem)
    total = _fro2(W)
    curve = [
        1 - sum((_fro2(S[j, :]) for j in range(RR)), Rational(0)) / total
        for RR in range(basis.cols + 1)
    ]
    direct = [
        _fro2(W - basis[:, :RR] * basis[:, :RR].T * W) / total for RR in range(basis.cols + 1)
    ]
    return curve, direct, sum(1 for e in ev if e > 0), diagonal


def prove_P13() -> SymbolicResult:
    """Auto-rank rule: rho(R)^2 = 1 - sum_{j<=R} ||s_j||^2 / ||W||^2 is non-increasing in R,
    0 at R = dim of the union, so the smallest certified R exists and is at most that dimension.

    Matrix symbols: for a nested basis [U_R u] (u one more column), the kept mass is additive,
    [U_R u]^T W has Gram W^T U_R U_R^T W + W^T u u^T W, so ||S_{R+1}||^2 = ||S_R||^2 +
    ||u^T W||^2 >= ||S_R||^2 (and P_{R+1} = P_R + u u^T); with P12 this is rho(R)^2 and it cannot
    increase. Exact rationals (aligned clients with exact eigenvectors, both sides, three
    sizes): the curve equals the directly measured residual at every R, is non-increasing, is 0
    exactly at the number of positive eigenvalues = dim of the union (P2), and the smallest R
    meeting each tol in {1/2, 1/10, 1/1000} exists and is at most that dimension.
    """
    U = MatrixSymbol("U_R", d, R)
    u = MatrixSymbol("u", d, 1)
    W = MatrixSymbol("W", d, k)
    Ub = BlockMatrix([[U, u]])
    gram_ok = _is_zero(
        block_collapse((Ub.T * W).T * (Ub.T * W)) - (W.T * U * U.T * W + (u.T * W).T * (u.T * W))
    )
    proj_ok = _is_zero(block_collapse(Ub * Ub.T) - (U * U.T + u * u.T))
    rng = _rng(13)
    exact_ok = True
    for dd, kk, J, L, _ in _ALIGNED_CASES:
        pb = _aligned(dd, kk, J, L, _WEIGHTS, rng)
        for side in ("left", "right"):
            curve, direct, m, diagonal = _residual_curve(pb, side)
            Ms = pb.Bs if side == "left" else [Ai.T for Ai in pb.As]
            union = sp.Matrix.hstack(*Ms).rank()
            exact_ok &= diagonal and m == union
            exact_ok &= all(c == e for c, e in zip(curve, direct, strict=True))
            exact_ok &= all(a >= b for a, b in itertools.pairwise(curve))
            exact_ok &= curve[m] == 0 and (m == 0 or curve[m - 1] > 0)
            for tol in (Rational(1, 2), Rational(1, 10), Rational(1, 1000)):
                RR = _auto_rank(curve, tol)
                exact_ok &= RR is not None and RR <= m
    ok = gram_ok and proj_ok and exact_ok
    return SymbolicResult(
        ok,
        "matrix symbols (nested block basis) + exact rationals (aligned eigvecs, both sides)",
        f"kept mass additive {gram_ok}, P_(R+1) = P_R + u u^T {proj_ok}, curve = measured, "
        f"monotone, 0 at the union, auto R <= union {exact_ok}",
    )


def _side_residuals(pb: _Aligned, RR: int) -> tuple[sp.Expr, sp.Expr, bool]:
    """rho^2 of the left and of the right state at rank RR (exact), and the eigvec/gap flag."""
    W = pb.mean
    total = _fro2(W)
    out = []
    flag = True
    for side in ("left", "right"):
        update, _, ok = _side_update(pb, side, RR)
        out.append(_fro2(W - update) / total)
        flag &= ok
    return out[0], out[1], flag


def prove_P14() -> SymbolicResult:
    """side="auto" keeps min(rho_left, rho_right) and the choice is gauge invariant.

    Each side's residual ||W - P W|| / ||W|| depends only on W_bar (gauge invariant: (B G)(G^-1
    A) = B A) and on its projector, a function of K (left, P3) or K_R (right, P11's lemma), so
    both residuals and hence the kept side are gauge invariant; by construction the kept
    residual is the minimum (ties go left). Exact rationals (aligned clients, three sizes):
    residuals before and after random GL(r_i) gauges are equal, so are the kept side and its
    residual, and the rank="auto" choice (smaller R, then smaller residual). Witnesses that
    neither side dominates: clients sharing A's row space (the shared-init regime) are exact on
    the right and not on the left at R = r; sharing B's column space, the reverse.
    """
    left_ok = prove_P3().ok
    right_ok, _ = _right_gauge_invariance()
    rng = _rng(14)
    exact_ok = True
    for dd, kk, J, L, RR in _ALIGNED_CASES:
        pb = _aligned(dd, kk, J, L, _WEIGHTS, rng)
        pg = pb.gauged(rng)
        rl, rr_, f0 = _side_residuals(pb, RR)
        gl, gr, f1 = _side_residuals(pg, RR)
        auto = min((rl, "left"), (rr_, "right"), key=lambda c: c[0])  # min keeps the first tie
        gauged_auto = min((gl, "left"), (gr, "right"), key=lambda c: c[0])
        exact_ok &= f0 and f1 and rl == gl and rr_ == gr and auto == gauged_auto
        exact_ok &= auto[0] <= rl and auto[0] <= rr_
        choices = []
        for q in (pb, pg):
            cands = []
            for side in ("left", "right"):
                curve, _, _, _ = _residual_curve(q, side)
                Ra = _auto_rank(curve, Rational(1, 10))
                cands.append((Ra, curve[Ra] if Ra is not None else 1, side))
            choices.append(min(cands, key=lambda c: (c[0], c[1])))
        exact_ok &= choices[0] == choices[1]
    # Witnesses: shared row space (right exact at R = r, left not); shared column space (reverse).
    shared_rows = _aligned(5, 5, [[0, 1], [1, 2], [3, 4]], [[0, 1], [0, 1], [0, 1]], _WEIGHTS, rng)
    shared_cols = _aligned(5, 5, [[0, 1], [0, 1], [0, 1]], [[0, 1], [1, 2], [3, 4]], _WEIGHTS, rng)
    a_l, a_r, fa = _side_residuals(shared_rows, 2)
    b_l, b_r, fb = _side_residuals(shared_cols, 2)
    witness_ok = fa and fb and a_r == 0 < a_l and b_l == 0 < b_r
    ok = left_ok and right_ok and exact_ok and witness_ok
    return SymbolicResult(
        ok,
        "gauge lemmas of P3 and P11 + exact rationals (aligned eigvecs, gauges, witnesses)",
        f"left invariance {left_ok}, right invariance {right_ok}, residuals/choice/auto rank "
        f"invariant and auto = min {exact_ok}, each side wins somewhere {witness_ok}",
    )


def prove_P15() -> SymbolicResult:
    """The estimated certificate's upper bound (Sketch(certificate="estimate"), ours).

    For E = W_bar - U S and s Gaussian probes g_j, X = mean_j ||E g_j||^2 is an unbiased
    estimator of T = ||E||_F^2 = sum_i lam_i (lam_i >= 0 the eigenvalues of E^T E), and

        P(X <= (1 - eps) T) <= exp(-s eps^2 / 4),  0 < eps < 1.

    Proof (checked step by step): E ||E g||^2 = tr(E^T E E[g g^T]) = tr(E^T E) (a symbolic 2 x 3
    E and the second moments of a standard Gaussian vector). Chernoff with t > 0:
    P(X <= c) <= e^(t s c) prod_i E e^(-t lam_i Z^2)^s with E e^(-a Z^2) = (1 + 2a)^(-1/2)
    (the integral, symbolically); log(1 + x) >= x - x^2 / 2 for x >= 0 (f(0) = 0 and
    f'(x) = x^2 / (1 + x) >= 0); with sum lam_i^2 <= T^2 the exponent is at most
    s (-t eps T + t^2 T^2), minimal at t = eps / (2 T), where it equals -s eps^2 / 4. Finally,
    e -> e / sqrt(a + e^2) increases (derivative a / (a + e^2)^(3/2) >= 0), so the bound on
    ||E|| gives the bound on the relative residual sqrt(e^2 / (||S||^2 + e^2)).
    """
    x, t, eps, T, s, a, e, z = sp.symbols("x t epsilon T s a e z", positive=True)
    # unbiasedness: E[g g^T] = I for a standard Gaussian vector
    E = sp.Matrix(2, 3, sp.symbols("e0:6", real=True))
    g = sp.Matrix(sp.symbols("g0:3", real=True))
    quad = sp.expand((E * g).dot(E * g))  # g^T (E^T E) g, a quadratic form in g
    # E[g_i g_j] = delta_ij: the expectation of g^T Q g is tr Q = sum_i (1/2) d^2/dg_i^2
    expected = sum(sp.diff(quad, gi, 2) / 2 for gi in g)
    unbiased = _is_zero(sp.expand(expected - (E.T * E).trace()))
    # moment generating function of -a Z^2
    mgf = sp.integrate(sp.exp(-a * z**2) * sp.exp(-(z**2) / 2) / sp.sqrt(2 * sp.pi),
                       (z, -sp.oo, sp.oo))  # fmt: skip
    mgf_ok = _is_zero(sp.simplify(mgf - 1 / sp.sqrt(1 + 2 * a)))
    # log(1 + x) >= x - x^2 / 2 on x >= 0
    f = sp.log(1 + x) - x + x**2 / 2
    log_ok = f.subs(x, 0) == 0 and _is_zero(sp.simplify(sp.diff(f, x) - x**2 / (1 + x)))
    # the Chernoff exponent and its minimum
    expo = s * (-t * eps * T + t**2 * T**2)
    t_star = sp.solve(sp.diff(expo, t), t)
    opt_ok = t_star == [eps / (2 * T)] and _is_zero(
        sp.simplify(expo.subs(t, t_star[0]) + s * eps**2 / 4)
    )
    # monotone map from the residual norm to the relative residual
    mono_ok = _is_zero(
        sp.simplify(sp.diff(e / sp.sqrt(a + e**2), e) - a / (a + e**2) ** sp.Rational(3, 2))
    )
    ok = bool(unbiased and mgf_ok and log_ok and opt_ok and mono_ok)
    return SymbolicResult(
        ok,
        "sympy: Gaussian moments, MGF integral, log inequality, Chernoff optimum, monotonicity",
        f"unbiased {unbiased}, MGF (1+2a)^(-1/2) {mgf_ok}, log(1+x) >= x - x^2/2 {log_ok}, "
        f"optimum -s eps^2/4 at t = eps/(2T) {opt_ok}, e/sqrt(a+e^2) increasing {mono_ok}",
    )


def _gram_certificate_identities(d: int, m: int, k: int, R: int) -> tuple[bool, bool, bool]:
    """P16's three identities for symbolic B (d x m), A (m x k), X (d x R), weights pw."""
    B = sp.Matrix(d, m, sp.symbols(f"b0:{d * m}", real=True))
    A = sp.Matrix(m, k, sp.symbols(f"a0:{m * k}", real=True))
    X = sp.Matrix(d, R, sp.symbols(f"x0:{d * R}", real=True))
    pw = sp.diag(*sp.symbols(f"p0:{m}", positive=True))
    W = B * pw * A
    gb, ga = B.T * B, A * A.T
    Pa = pw * ga * pw
    pairs = sum(Pa[i, j] * gb[i, j] for i in range(m) for j in range(m))
    mean_ok = sp.expand((W.T * W).trace() - pairs) == 0
    XtX = X.T * X
    adj, det = XtX.adjugate(), XtX.det()
    # det(X^T X) ||P_X W||^2 = tr(adj(X^T X) X^T W W^T X) = tr(adj(X^T X) (X^T B) Pa (X^T B)^T)
    lhs = (adj * X.T * W * W.T * X).trace()
    XtB = X.T * B
    proj_ok = bool(sp.expand(lhs - (adj * (XtB * Pa * XtB.T)).trace()) == 0)
    # det P_X = X adj(X^T X) X^T is symmetric and det P_X^2 = det P_X: an orthogonal projector,
    # so ||W - P_X W||^2 = ||W||^2 - ||P_X W||^2 (Pythagoras).
    Pn = X * adj * X.T
    proj_is_orthogonal = bool(sp.expand(Pn * Pn - det * Pn).is_zero_matrix) and bool(
        sp.expand(Pn - Pn.T).is_zero_matrix
    )
    return mean_ok, proj_ok, proj_is_orthogonal


def prove_P16() -> SymbolicResult:
    """The certificate from the two raw Gram matrices (ours; the default exact route's).

    For stacked raw factors B = [B_1 ... B_N] (d x m), A = [A_1; ...; A_N] (m x k), column
    weights pw (p_i repeated r_i times), W_bar = B diag(pw) A, gb = B^T B, ga = A A^T,
    Pa = diag(pw) ga diag(pw), and the state's stored basis X (d x R, full column rank):

        ||W_bar||_F^2 = <Pa, gb>,
        ||P_X W_bar||_F^2 = tr((X^T X)^{-1} (X^T B) Pa (X^T B)^T),
        ||W_bar - P_X W_bar||_F^2 = the difference (P_X an orthogonal projector).

    Proof: the first is tr(A^T pw B^T B pw A) = tr(pw A A^T pw B^T B); the second is
    tr(W^T X (X^T X)^{-1} X^T W) with X^T W = (X^T B) pw A; the third is Pythagoras. Checked
    as polynomial identities (the inverse through the adjugate) for generic symbolic entries
    at (d, m, k, R) = (3, 2, 2, 1), (3, 3, 2, 1) and (3, 2, 2, 2).
    """
    shapes = ((3, 2, 2, 1), (3, 3, 2, 1), (3, 2, 2, 2))
    results = [_gram_certificate_identities(*shape) for shape in shapes]
    ok = all(all(r) for r in results)
    return SymbolicResult(
        ok,
        "sympy: polynomial identities over generic entries (inverse via the adjugate)",
        f"<Pa, gb> = ||W||^2, tr(adj (X^T B) Pa (X^T B)^T) = det ||P_X W||^2, P_X orthogonal, "
        f"at {', '.join(str(s) for s in shapes)}: {results}",
    )


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
    "P11": prove_P11,
    "P12": prove_P12,
    "P13": prove_P13,
    "P14": prove_P14,
    "P15": prove_P15,
    "P16": prove_P16,
    "L1": prove_L1,
}
