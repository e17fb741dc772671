"""High-precision checks (mpmath, >= 50 digits) of the SPEC propositions.

An independent reference implementation of GLoRA in mpmath (skinny QR, symmetric eigensolver,
SVD at ``dps`` digits), with its right-side variant (ours) by transposition and the certificate
of the relative residual, is run on random problems whose entries are float64 numbers (exactly
representable), and each proposition's residual is reported relative to the problem's scale.
A true identity leaves a residual near ``10**-dps``; a real error would stay at its size no
matter the precision. Float64 noise (~1e-16) therefore cannot hide a real error here.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import mpmath as mp

Matrix = mp.matrix


@dataclass(frozen=True)
class HighPrecResult:
    """Largest relative residual over the trials, and the threshold it must sit under."""

    residual: float
    threshold: float
    dps: int
    detail: str

    @property
    def ok(self) -> bool:
        return self.residual <= self.threshold


def _rand(m: int, n: int, rng: random.Random) -> Matrix:
    # float64 values, converted exactly.
    return mp.matrix([[mp.mpf(rng.gauss(0.0, 1.0)) for _ in range(n)] for _ in range(m)])


def _fro(X: Matrix) -> mp.mpf:
    return mp.mnorm(X, "f")


def _hstack(blocks: list[Matrix]) -> Matrix:
    rows = blocks[0].rows
    out = mp.zeros(rows, sum(b.cols for b in blocks))
    c = 0
    for b in blocks:
        for i in range(rows):
            for j in range(b.cols):
                out[i, c + j] = b[i, j]
        c += b.cols
    return out


def _cols(X: Matrix, start: int, stop: int) -> Matrix:
    out = mp.zeros(X.rows, stop - start)
    for i in range(X.rows):
        for j in range(start, stop):
            out[i, j - start] = X[i, j]
    return out


def _rows(X: Matrix, start: int, stop: int) -> Matrix:
    return _cols(X.T, start, stop).T


def gauge_fix_qr(B: Matrix, A: Matrix) -> tuple[Matrix, Matrix]:
    """U = Q, C = T A from the skinny QR of B (full column rank)."""
    Q, T = mp.qr(B, mode="skinny")
    return Q, T * A


def consensus(Us: list[Matrix], p: list[mp.mpf], R: int) -> tuple[Matrix, list[mp.mpf]]:
    """Top-R eigenvectors of K = sum p_i U_i U_i^T (dense d-by-d: a reference, not the core)."""
    d = Us[0].rows
    K = mp.zeros(d, d)
    for pi, U in zip(p, Us, strict=True):
        K += pi * (U * U.T)
    E, Q = mp.eigsy(K)  # ascending
    order = sorted(range(d), key=lambda i: -E[i])
    Uref = mp.zeros(d, R)
    for j, idx in enumerate(order[:R]):
        for i in range(d):
            Uref[i, j] = Q[i, idx]
    return Uref, [E[i] for i in order]


def glora(
    Bs: list[Matrix], As: list[Matrix], p: list[mp.mpf], R: int
) -> tuple[Matrix, Matrix, Matrix]:
    """Reference GLoRA: (U_ref, S, K)."""
    fixed = [gauge_fix_qr(B, A) for B, A in zip(Bs, As, strict=True)]
    Uref, _ = consensus([f[0] for f in fixed], p, R)
    S = mp.zeros(R, As[0].cols)
    for pi, (U, C) in zip(p, fixed, strict=True):
        S += pi * (Uref.T * U * C)
    d = Bs[0].rows
    K = mp.zeros(d, d)
    for pi, (U, _) in zip(p, fixed, strict=True):
        K += pi * (U * U.T)
    return Uref, S, K


def glora_right(
    Bs: list[Matrix], As: list[Matrix], p: list[mp.mpf], R: int
) -> tuple[Matrix, Matrix, Matrix]:
    """Reference right-side GLoRA (ours): (V_ref, S', K_R), update ``S' V_ref^T``.

    V_i from the skinny QR of A_i^T (an orthonormal basis of row(A_i)), V_ref the top-R
    eigenvectors of K_R = sum p_i V_i V_i^T (k-by-k), S' = sum p_i B_i (A_i V_ref) (d-by-R):
    the transpose problem (A_i^T, B_i^T) of :func:`glora`.
    """
    Vs = [mp.qr(A.T, mode="skinny")[0] for A in As]
    Vref, _ = consensus(Vs, p, R)
    S = mp.zeros(Bs[0].rows, R)
    for pi, B, A in zip(p, Bs, As, strict=True):
        S += pi * (B * (A * Vref))
    k = As[0].cols
    K = mp.zeros(k, k)
    for pi, V in zip(p, Vs, strict=True):
        K += pi * (V * V.T)
    return Vref, S, K


def certificate(W: Matrix, update: Matrix, S: Matrix) -> tuple[mp.mpf, mp.mpf]:
    """rho^2 by the difference 1 - ||S||^2 / ||W||^2 and directly ||W - update||^2 / ||W||^2."""
    total = _fro(W) ** 2
    return 1 - _fro(S) ** 2 / total, _fro(W - update) ** 2 / total


@dataclass
class _Problem:
    Bs: list[Matrix]
    As: list[Matrix]
    p: list[mp.mpf]
    d: int
    k: int
    r: int

    @property
    def mean(self) -> Matrix:
        W = mp.zeros(self.d, self.k)
        for pi, B, A in zip(self.p, self.Bs, self.As, strict=True):
            W += pi * (B * A)
        return W

    @property
    def scale(self) -> mp.mpf:
        return sum(
            pi * _fro(B) * _fro(A) for pi, B, A in zip(self.p, self.Bs, self.As, strict=True)
        )


def _problem(rng: random.Random, n: int = 3, d: int = 7, k: int = 5, r: int = 2) -> _Problem:
    w = [mp.mpf(rng.uniform(0.5, 2.0)) for _ in range(n)]
    total = sum(w)
    return _Problem(
        [_rand(d, r, rng) for _ in range(n)],
        [_rand(r, k, rng) for _ in range(n)],
        [x / total for x in w],
        d,
        k,
        r,
    )


def _random_orthogonal(n: int, rng: random.Random) -> Matrix:
    Q, _ = mp.qr(_rand(n, n, rng), mode="skinny")
    return Q


def _run(
    check: Callable[[random.Random], tuple[mp.mpf, str]], dps: int, trials: int, seed: int
) -> HighPrecResult:
    with mp.workdps(dps):
        rng = random.Random(seed)
        worst = mp.mpf(0)
        detail = ""
        for _ in range(trials):
            res, detail = check(rng)
            worst = max(worst, res)
        # Threshold: 10^(8 - dps), i.e. the working precision times a generous dimension factor.
        return HighPrecResult(float(worst), float(mp.mpf(10) ** (8 - dps)), dps, detail)


def check_P1(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    U, S, _ = glora(pb.Bs, pb.As, pb.p, 3)
    return _fro(U * S - U * (U.T * pb.mean)) / pb.scale, "||U S - U U^T W|| / scale, R = 3 < N r"


def check_P2(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    U, S, _ = glora(pb.Bs, pb.As, pb.p, pb.r * len(pb.Bs))
    return _fro(U * S - pb.mean) / pb.scale, "||U S - W|| / scale, R = N r"


def check_P3(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    Gs = [_rand(pb.r, pb.r, rng) + 2 * mp.eye(pb.r) for _ in pb.Bs]
    Bg = [B * G for B, G in zip(pb.Bs, Gs, strict=True)]
    Ag = [mp.inverse(G) * A for G, A in zip(Gs, pb.As, strict=True)]
    U0, S0, K0 = glora(pb.Bs, pb.As, pb.p, 3)
    U1, S1, K1 = glora(Bg, Ag, pb.p, 3)
    res = max(_fro(U0 * S0 - U1 * S1) / pb.scale, _fro(K0 - K1))
    return res, "max(||dK||, ||d(U S)|| / scale) under GL(r) gauges, R = 3"


def check_P4(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    U, S, _ = glora(pb.Bs, pb.As, pb.p, 4)
    Us, sig, Vh = mp.svd_r(S, full_matrices=False)
    X = U * S
    worst = mp.mpf(0)
    for r in range(1, 5):
        B = U * _cols(Us, 0, r) * mp.diag([mp.sqrt(sig[j]) for j in range(r)])
        A = mp.diag([mp.sqrt(sig[j]) for j in range(r)]) * _rows(Vh, 0, r)
        ey = mp.sqrt(sum(sig[j] ** 2 for j in range(r, len(sig))))
        worst = max(worst, abs(_fro(X - B * A) - ey) / pb.scale)
    return worst, "| ||B A - U S|| - sqrt(sum_{j>r} s_j^2) | / scale, r = 1..R"


def check_P5(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    c = mp.mpf(rng.uniform(0.01, 100.0))
    Bs = list(pb.Bs)
    Bs[0] = Bs[0] * c
    _, _, K0 = glora(pb.Bs, pb.As, pb.p, 3)
    _, _, K1 = glora(Bs, pb.As, pb.p, 3)
    return _fro(K0 - K1), "||K(c B_1) - K(B_1)||, c in [0.01, 100]"


def check_P6(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    perm = [2, 0, 1]
    U0, S0, _ = glora(pb.Bs, pb.As, pb.p, 3)
    U1, S1, _ = glora(
        [pb.Bs[i] for i in perm], [pb.As[i] for i in perm], [pb.p[i] for i in perm], 3
    )
    return _fro(U0 * S0 - U1 * S1) / pb.scale, "||d(U S)|| / scale under a permutation"


def check_P7(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    Bb = sum((pi * B for pi, B in zip(pb.p, pb.Bs, strict=True)), mp.zeros(pb.d, pb.r))
    Ab = sum((pi * A for pi, A in zip(pb.p, pb.As, strict=True)), mp.zeros(pb.r, pb.k))
    rhs = mp.zeros(pb.d, pb.k)
    for pi, B, A in zip(pb.p, pb.Bs, pb.As, strict=True):
        rhs += pi * ((B - Bb) * (A - Ab))
    return _fro(pb.mean - Bb * Ab - rhs) / pb.scale, "FedIT error identity residual / scale"


def check_P8(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    U, S, _ = glora(pb.Bs, pb.As, pb.p, 3)
    W = pb.mean
    sig = mp.svd_r(W, compute_uv=False)
    floor = mp.sqrt(sum(sig[j] ** 2 for j in range(3, len(sig))))
    slack = _fro(W - U * S) - floor  # must be >= 0 (Eckart-Young)
    return max(-slack, mp.mpf(0)) / pb.scale, "max(0, floor - ||W - U S||) / scale (violation)"


def check_P9(rng: random.Random) -> tuple[mp.mpf, str]:
    r = 3
    A = _rand(r, 5, rng)
    Aref = _rand(r, 5, rng)
    B = _rand(6, r, rng)
    Uu, _, Vh = mp.svd_r(A * Aref.T)
    Rs = Uu * Vh
    prod = _fro(B * Rs * (Rs.T * A) - B * A) / (_fro(B) * _fro(A))
    best = _fro(Rs.T * A - Aref)
    viol = mp.mpf(0)
    for _ in range(5):
        Q = _random_orthogonal(r, rng)
        viol = max(viol, best - _fro(Q.T * A - Aref))
    # Soft alignment bound in 2-D, where SO(2) polar factors have a closed form.
    theta = mp.mpf(rng.uniform(-3.0, 3.0))
    lam = mp.mpf(rng.uniform(0.0, 1.0))
    phi = mp.atan2(lam * mp.sin(theta), 1 - lam + lam * mp.cos(theta))
    soft = 2 * mp.sqrt(2) * abs(mp.sin(phi / 2))
    hard = 2 * mp.sqrt(2) * abs(mp.sin(theta / 2))
    bound_viol = max(soft - 2 * lam * hard, mp.mpf(0))
    return max(
        prod, viol / _fro(A), bound_viol
    ), "product, optimality and 2-D soft-bound violations"


def check_P10(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    Bst = _hstack(pb.Bs)
    Ast = _hstack([(pi * A).T for pi, A in zip(pb.p, pb.As, strict=True)]).T
    return _fro(Bst * Ast - pb.mean) / pb.scale, "||[B_i][p_i A_i] - W|| / scale"


def _gauged(pb: _Problem, rng: random.Random) -> tuple[list[Matrix], list[Matrix]]:
    """The clients under random per-client gauges (B_i G_i, G_i^-1 A_i)."""
    Gs = [_rand(pb.r, pb.r, rng) + 2 * mp.eye(pb.r) for _ in pb.Bs]
    Bg = [B * G for B, G in zip(pb.Bs, Gs, strict=True)]
    Ag = [mp.inverse(G) * A for G, A in zip(Gs, pb.As, strict=True)]
    return Bg, Ag


def check_P11(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng, d=5, k=7)  # row-space union N r = 6 < k
    W = pb.mean
    V, S, K = glora_right(pb.Bs, pb.As, pb.p, 3)
    projection = _fro(S * V.T - W * V * V.T) / pb.scale
    V6, S6, _ = glora_right(pb.Bs, pb.As, pb.p, pb.r * len(pb.Bs))
    exact = _fro(S6 * V6.T - W) / pb.scale
    Ut, St, Kt = glora([A.T for A in pb.As], [B.T for B in pb.Bs], pb.p, 3)
    transpose = max(_fro((Ut * St).T - S * V.T) / pb.scale, _fro(Kt - K))
    Bg, Ag = _gauged(pb, rng)
    V1, S1, K1 = glora_right(Bg, Ag, pb.p, 3)
    gauge = max(_fro(S1 * V1.T - S * V.T) / pb.scale, _fro(K1 - K))
    return max(projection, exact, transpose, gauge), (
        "max(||S'V^T - W V V^T||, ||S'V^T - W|| at R = N r, vs transposed left, GL(r) gauges)"
    )


def check_P12(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    W = pb.mean
    U, S, _ = glora(pb.Bs, pb.As, pb.p, 3)
    V, Sr, _ = glora_right(pb.Bs, pb.As, pb.p, 3)
    Ur = _cols(_random_orthogonal(pb.d, rng), 0, 3)
    cases = [(U * S, S), (Sr * V.T, Sr), (Ur * (Ur.T * W), Ur.T * W)]
    worst = mp.mpf(0)
    for update, coords in cases:
        by_difference, direct = certificate(W, update, coords)
        worst = max(worst, abs(by_difference - direct), abs(_fro(update) - _fro(coords)) / pb.scale)
    # The direct form from factors: [p_1 B_1 ... p_N B_N, -U][A_1; ...; A_N; S] = W - U S.
    left = _hstack([pi * B for pi, B in zip(pb.p, pb.Bs, strict=True)] + [-U])
    right = _hstack([A.T for A in pb.As] + [S.T]).T
    worst = max(worst, _fro(left * right - (W - U * S)) / pb.scale)
    return worst, "|rho^2 by difference - rho^2 direct|, | ||PW|| - ||S|| |: left, right, random U"


def _curve_violation(Ms: list[Matrix], p: list[mp.mpf], W: Matrix, union: int) -> mp.mpf:
    """P13 on one side: the curve from the rows of S against the measured residuals."""
    n = W.rows
    U, ev = consensus(Ms, p, n)  # the full ordered basis: nested top eigenvectors
    S = U.T * W
    total = _fro(W) ** 2
    curve = [mp.mpf(1)]
    for j in range(n):
        curve.append(curve[-1] - sum(S[j, c] ** 2 for c in range(S.cols)) / total)
    worst = abs(ev[union])  # the union has exactly `union` positive eigenvalues
    direct = [mp.mpf(1)]  # R = 0: nothing kept
    for RR in range(1, n + 1):
        X = _cols(U, 0, RR)
        direct.append(_fro(W - X * (X.T * W)) ** 2 / total)
        worst = max(worst, abs(curve[RR] - direct[RR]))
    for a, b in itertools.pairwise(direct):
        worst = max(worst, b - a)  # non-increasing
    worst = max(worst, abs(curve[union]), direct[union])  # 0 at the union (P2)
    tiny = mp.mpf(10) ** ((8 - mp.mp.dps) // 2)  # tiny^2: the working precision's threshold
    for tol in (mp.mpf("0.5"), mp.mpf("0.1"), mp.mpf("1e-3"), tiny):
        meets = [RR for RR, v in enumerate(curve) if v <= tol**2]
        if not meets or meets[0] > union:
            worst = max(worst, mp.mpf(1))
    return worst


def check_P13(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng, d=7, k=7)  # both unions have dimension N r = 6 < 7
    W = pb.mean
    union = pb.r * len(pb.Bs)
    Us = [mp.qr(B, mode="skinny")[0] for B in pb.Bs]
    Vs = [mp.qr(A.T, mode="skinny")[0] for A in pb.As]
    worst = max(_curve_violation(Us, pb.p, W, union), _curve_violation(Vs, pb.p, W.T, union))
    return worst, "max |curve - measured rho^2|, increase, rho^2 at the union, auto R > union"


def _side_residuals(Bs: list[Matrix], As: list[Matrix], pb: _Problem, R: int) -> list[mp.mpf]:
    W = pb.mean  # gauges leave it unchanged: compared against the original mean on purpose
    U, S, _ = glora(Bs, As, pb.p, R)
    V, Sr, _ = glora_right(Bs, As, pb.p, R)
    return [certificate(W, U * S, S)[1], certificate(W, Sr * V.T, Sr)[1]]


def check_P14(rng: random.Random) -> tuple[mp.mpf, str]:
    pb = _problem(rng)
    rho = _side_residuals(pb.Bs, pb.As, pb, 3)
    Bg, Ag = _gauged(pb, rng)
    rho_g = _side_residuals(Bg, Ag, pb, 3)
    worst = max(abs(a - b) for a, b in zip(rho, rho_g, strict=True))
    side = min(range(2), key=lambda i: rho[i])  # ties go left
    side_g = min(range(2), key=lambda i: rho_g[i])
    if side != side_g and abs(rho[0] - rho[1]) > mp.mpf(10) ** (10 - mp.mp.dps):
        worst = max(worst, mp.mpf(1))  # the choice moved under a gauge
    # Shared-init regime: the clients' A's span one row space, the B_i diverge. The right side
    # is exact at R = r (P11), the left is not: auto must keep the right.
    A = _rand(pb.r, pb.k, rng)
    shared = [_rand(pb.r, pb.r, rng) + 2 * mp.eye(pb.r) for _ in pb.Bs]
    As = [G * A for G in shared]
    left, right = _side_residuals(pb.Bs, As, _Problem(pb.Bs, As, pb.p, pb.d, pb.k, pb.r), pb.r)
    worst = max(worst, right)
    if not left > right:
        worst = max(worst, mp.mpf(1))
    return worst, "max |d rho^2| of both sides under GL(r) gauges, choice moved, shared-A right"


def check_P15(rng: random.Random) -> tuple[mp.mpf, str]:
    """The lower tail of the probe estimator against exp(-s eps^2 / 4), exactly.

    For j equal eigenvalues, s X / (T / j) ~ chi-square with j s degrees of freedom, so
    P(X <= (1 - eps) T) = P(chi2_{js} <= (1 - eps) j s), the regularized lower incomplete gamma
    function, at 50 digits. Returned: the largest excess of that probability over the bound
    (0 when the bound holds), over random s, eps and j = 1 (one direction: the widest
    spread) to 8.
    """
    worst = mp.mpf(0)
    for _ in range(4):
        probes = rng.randint(19, 256)
        eps = mp.mpf(rng.uniform(0.05, 0.95))
        bound = mp.exp(-probes * eps**2 / 4)
        for j in (1, 2, 3, 8):
            dof = j * probes
            tail = mp.gammainc(mp.mpf(dof) / 2, 0, (1 - eps) * dof / 2, regularized=True)
            worst = max(worst, tail - bound)
    return worst, "max (P(X <= (1 - eps) T) - exp(-s eps^2 / 4)) over s, eps, j equal eigenvalues"


def check_P16(rng: random.Random) -> tuple[mp.mpf, str]:
    """The Gram certificate's two norms against the dense residual, at 50 digits.

    Random clients and a random basis X (P16 holds for any X of full column rank: the
    operator's is the stored basis), R = 1, 2 and 4.
    """
    pb = _problem(rng)
    B = _hstack(pb.Bs)
    A = _hstack([M.T for M in pb.As]).T
    m = B.cols
    pw = mp.zeros(m, m)
    for i, pi in enumerate(pb.p):
        for j in range(pb.r):
            pw[i * pb.r + j, i * pb.r + j] = pi
    W = B * pw * A
    gb, ga = B.T * B, A * A.T
    Pa = pw * ga * pw
    worst = mp.mpf(0)
    for R in (1, 2, 4):
        X = _rand(pb.d, R, rng)
        P = X * mp.inverse(X.T * X) * X.T
        direct = _fro(W - P * W) ** 2
        XtB = X.T * B
        proj = sum((mp.inverse(X.T * X) * (XtB * Pa * XtB.T))[j, j] for j in range(R))
        mean = sum(Pa[i, j] * gb[i, j] for i in range(m) for j in range(m))
        worst = max(worst, abs((mean - proj) - direct) / pb.scale**2,
                    abs(mean - _fro(W) ** 2) / pb.scale**2)  # fmt: skip
    return worst, "|(<Pa, gb> - tr((X^T X)^-1 X^T B Pa B^T X)) - ||W - P_X W||^2| / scale^2"


CHECKS: dict[str, Callable[[random.Random], tuple[mp.mpf, str]]] = {
    "P1": check_P1,
    "P2": check_P2,
    "P3": check_P3,
    "P4": check_P4,
    "P5": check_P5,
    "P6": check_P6,
    "P7": check_P7,
    "P8": check_P8,
    "P9": check_P9,
    "P10": check_P10,
    "P11": check_P11,
    "P12": check_P12,
    "P13": check_P13,
    "P14": check_P14,
    "P15": check_P15,
    "P16": check_P16,
}


def run_check(pid: str, *, dps: int = 50, trials: int = 3, seed: int = 0) -> HighPrecResult:
    """Run one proposition's high-precision check."""
    return _run(CHECKS[pid], dps, trials, seed)
