"""Tests of ``glora_math.certificate``.

They pin behaviour found by the mutation run (docs/mutation.md): each was written for a mutant of
``certificate.py`` that survived the property suite.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from glora_math import LoRAFactors, ServerState, glora_aggregate
from glora_math.certificate import certify, residual_curve, warn_residual
from glora_math.errors import GloraWarning, ResidualWarning, UnderflowWarning
from glora_math.operators import get_operator
from glora_math.testing.helpers import n_dims
from glora_math.testing.strategies import Problem, conditioned_matrix, problems
from glora_math.tolerances import certificate_tol


def test_the_residual_curve_is_computed_in_float64() -> None:
    # Documented: rho(R)^2 for R = 0..rows, in float64, also for a float32 S.
    # Squared row norms 2 and 2 of ||W||^2 = 4: rho^2 = 1, 1/2, 0 (exact in binary).
    curve = residual_curve(torch.ones(2, 2, dtype=torch.float32), 2.0)
    assert curve.dtype == torch.float64
    assert curve.tolist() == [1.0, 0.5, 0.0]


def test_the_residual_curve_of_a_unit_mean() -> None:
    # ||W|| = 1, row norms^2 1/4 and 1/2: rho^2 = 1, 3/4, 1/4 (exact in binary).
    S = torch.tensor([[0.5, 0.0], [0.0, 0.5**0.5]], dtype=torch.float64)
    curve = residual_curve(S[:1], 1.0)
    assert curve.tolist() == [1.0, 0.75]


def test_the_residual_curve_of_a_zero_mean_is_zero() -> None:
    curve = residual_curve(torch.zeros(2, 3, dtype=torch.float64), 0.0)
    assert curve.tolist() == [0.0, 0.0, 0.0]


def test_a_limit_of_zero_never_warns() -> None:
    # Documented: a warning when rho exceeds limit (> 0); limit 0 or None means no check.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_residual(0.5, 0.0, "here", stacklevel=1)
        warn_residual(0.5, None, "here", stacklevel=1)


def test_a_float32_certificate_holds_norms_beyond_the_square_root_of_its_range() -> None:
    # Found by the mutation round: the certificate squared unscaled entries, so a float32 mean
    # update of norm 4e20 (entries 1e20, squares beyond float32's 3.4e38) was reported as an
    # overflow. The norm itself is far inside float32's range.
    c = 1e10
    state = glora_aggregate([LoRAFactors(c * torch.ones(4, 1), c * torch.ones(1, 4))], rank=1)
    assert state.certificate is not None
    mean = state.certificate.mean_norm
    assert abs(mean - 4 * c * c) <= certificate_tol(torch.float32, n=4 + 4 + 1, scale=4 * c * c)
    assert state.relative_residual <= certificate_tol(torch.float32, n=4 + 4 + 1, scale=1.0)


def test_a_float32_certificate_holds_norms_at_both_ends_of_its_range() -> None:
    # The largest entry may be as large as the norm allows (a first scaling by 2^e overflowed
    # to inf for entries at or above 2^127, giving NaN), and squares of tiny entries must not
    # underflow to a zero mean (a mean of norm 5e-24 was certified as exactly 0).
    for c in (1.4e19, 1e-12):
        state = glora_aggregate([LoRAFactors(c * torch.ones(1, 1), c * torch.ones(1, 1))], rank=1)
        assert state.certificate is not None
        tol = certificate_tol(torch.float32, n=3, scale=c * c)
        assert abs(state.certificate.mean_norm - c * c) <= tol
        assert state.relative_residual <= certificate_tol(torch.float32, n=3, scale=1.0)


def test_P15_estimated_certificate_bound_holds() -> None:
    """P15: the estimate's upper bound holds in at least 99% of 1,000 random cases.

    Random clients (sizes, ranks, weights, float32 and float64, R below the clients' span so
    the residual is not zero), the sketch's estimate against the exact certificate of the same
    state: the bound (confidence 0.99) must be at least the exact relative residual, up to the
    dtype's certificate tolerance.
    """
    import random

    from glora_math import Sketch
    from glora_math.synthetic import random_clients

    rng = random.Random(15)
    misses = 0
    for case in range(1000):
        n, r = rng.randint(2, 6), rng.randint(1, 4)
        d, k = rng.randint(n * r + 2, 48), rng.randint(8, 40)
        dtype = torch.float32 if case % 2 else torch.float64
        clients = random_clients(n_clients=n, d=d, k=k, rank=r, seed=case, dtype=dtype,
                                 heterogeneity=rng.uniform(0.1, 1.0))  # fmt: skip
        weights = [rng.uniform(0.1, 1.0) for _ in range(n)]
        R = rng.randint(1, max(1, n * r - 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = glora_aggregate(clients, weights, rank=R, sketch=Sketch(seed=case))
            est = glora_aggregate(clients, weights, rank=R,
                                  sketch=Sketch(seed=case, certificate="estimate"))  # fmt: skip
        assert exact.certificate is not None
        assert est.certificate is not None
        assert est.certificate.estimated
        assert not exact.certificate.estimated
        assert est.certificate.confidence == 0.99
        bound = est.certificate.bound
        assert bound is not None
        assert bound >= est.certificate.relative_residual
        tol = certificate_tol(dtype, n=d + k + n * r, scale=1.0)
        misses += bound + tol < exact.certificate.relative_residual
    assert misses <= 10, misses


def test_the_estimate_is_linear_in_the_clients_and_refuses_too_few_probes() -> None:
    import pytest

    from glora_math import GloraError, Sketch
    from glora_math.operators import get_operator
    from glora_math.synthetic import random_clients

    with pytest.raises(GloraError, match=r"too few for confidence 0\.99"):
        Sketch(certificate="estimate", probes=10)
    with pytest.raises(GloraError, match="'exact' or 'estimate'"):
        Sketch(certificate="guess")  # type: ignore[arg-type]
    # Through the operators' options: sketch_probes > 0 asks for the estimate.
    clients = random_clients(n_clients=5, d=40, k=30, rank=3, seed=1)
    res = get_operator("glora")(clients, rank=4, options={"sketch": 1.0, "sketch_probes": 96.0})
    assert res.certificate is not None
    assert res.certificate.estimated
    # A stack: one set of probes for every module; the total is the stack's estimate.
    Bs, As = (
        torch.randn(4, 3, 40, 2, dtype=torch.float64),
        torch.randn(4, 3, 2, 30, dtype=torch.float64),
    )
    stack = [LoRAFactors(Bs[i], As[i]) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = glora_aggregate(stack, rank=3, sketch=Sketch(certificate="estimate"))
        ex = glora_aggregate(stack, rank=3, sketch=Sketch())
    assert est.certificate is not None
    assert ex.certificate is not None
    assert est.certificate.estimated
    assert est.certificate.bound is not None
    assert est.certificate.bound >= ex.certificate.relative_residual


# ----------------------------------------------------------------------------------------------
# P16: the certificate from the two raw Gram matrices


def _qr_truth(pb: Problem, state: ServerState) -> float:
    """The stored state's relative residual by the QR certificate, all in float64."""
    fs = [LoRAFactors(f.B.double(), f.A.double()) for f in pb.factors]
    if state.side == "right":
        fs = [LoRAFactors(f.A.mT, f.B.mT) for f in fs]
    return certify(fs, pb.p, state.U.double(), state.S.double(), torch.float64).relative_residual


@given(
    problems(dtype=torch.float32, weights="with_zeros", deficient=True, zero_updates=True),
    st.data(),
)
def test_P16_gram_certificate_matches_the_qr_certificate(pb: Problem, data: st.DataObject) -> None:
    """P16: where the Gram route certifies a state, the QR certificate of it agrees.

    The truth is the QR certificate of the stored (U, S) computed in float64. The Gram
    certificate is taken only where its error bound is within half of ``certificate_tol``
    (the QR certificate in float32 is within the other half), so the two agree within it.
    """
    side = data.draw(st.sampled_from(["left", "right", "auto"]), label="side")
    R = data.draw(st.integers(1, max(1, sum(pb.ranks))), label="R")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GloraWarning)
        state = glora_aggregate(pb.factors, pb.weights, rank=R, side=side)
    assert state.certificate is not None
    den = float(pb.mean().norm())
    scale = (pb.scale() + float(state.S.double().norm())) / den if den > 0 else 1.0
    tol = certificate_tol(torch.float32, n=n_dims(pb.d, pb.k, pb.ranks), scale=scale)
    event(f"certificate method: {state.certificate.method}")
    assert abs(state.relative_residual - _qr_truth(pb, state)) <= tol


def test_P16_the_default_route_certifies_from_the_gram_matrices_to_float64_accuracy() -> None:
    # Well-conditioned float32 clients (d = k = 64, 8 clients of rank 4): the default operator
    # takes the Gram route and its certificate; in float64 arithmetic it agrees with the QR
    # certificate of the same stored state to far better than float32 rounding (1e-6 relative:
    # the target), while the float32 QR certificate is off by float32 rounding.
    g = torch.Generator().manual_seed(0)
    fs = [LoRAFactors(torch.randn(64, 4, generator=g), torch.randn(4, 64, generator=g))
          for _ in range(8)]  # fmt: skip
    pb = Problem(fs, None, 64, 64, 1.0, 0, torch.float32)
    for side in ("left", "right", "auto"):
        state = glora_aggregate(fs, rank=6, side=side)
        assert state.certificate is not None
        assert state.certificate.method == "gram"
        truth = _qr_truth(pb, state)
        assert abs(state.relative_residual - truth) <= 1e-6 * truth


@given(st.floats(1e3, 2e4), st.integers(0, 2**16), st.sampled_from(["left", "right", "auto"]))
def test_P16_certifies_the_stored_state_for_clients_near_the_gram_routes_limit(
    kappa: float, seed: int, side: str
) -> None:
    """P16 for ill-conditioned float32 clients (condition numbers up to 2e4, near the limit
    of gram_basis_accurate): the certificate is of the basis the state stores, so it matches
    the float64 QR certificate of that state within ``certificate_tol`` however the basis was
    rounded, and the Gram route does take it.
    """
    g = torch.Generator().manual_seed(seed)
    d, k, r, n = 48, 40, 4, 5
    fs = [
        LoRAFactors(
            conditioned_matrix(d, r, cond=kappa, scale=1.0, generator=g, dtype=torch.float64),
            conditioned_matrix(r, k, cond=kappa, scale=1.0, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]
    fs = [LoRAFactors(f.B.to(torch.float32), f.A.to(torch.float32)) for f in fs]
    pb = Problem(fs, None, d, k, kappa, seed, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GloraWarning)
        state = glora_aggregate(fs, rank=6, side=side)  # type: ignore[arg-type]
    assert state.certificate is not None
    if side != "right":  # the B's are within the route's limit; the left side takes it
        assert state.route == "gram" or state.side == "right"
    den = float(pb.mean().norm())
    scale = (pb.scale() + float(state.S.double().norm())) / den
    tol = certificate_tol(torch.float32, n=n_dims(d, k, pb.ranks), scale=scale)
    event(f"certificate method: {state.certificate.method}")
    assert abs(state.relative_residual - _qr_truth(pb, state)) <= tol


def test_the_svd_operators_certify_their_truncation_by_the_spectrum() -> None:
    """P4 with S = W_bar: the rank-R truncation's error is ||s[R:]||, free from the SVD.

    One function (``glora verify`` runs it by name for P4), every case in it.
    """
    for name in ("flexlora", "svd_mean"):
        for dtype in (torch.float32, torch.float64):
            _certifies_its_truncation(name, dtype)


def _certifies_its_truncation(name: str, dtype: torch.dtype) -> None:
    op = get_operator(name)
    g = torch.Generator().manual_seed(11)
    d, k, r, n = 9, 7, 2, 3
    fs = [LoRAFactors(torch.randn(d, r, generator=g, dtype=dtype),
                      torch.randn(r, k, generator=g, dtype=dtype)) for _ in range(n)]  # fmt: skip
    w = [1.0, 2.0, 5.0]
    p = [x / sum(w) for x in w]
    W = sum(pi * (f.B.double() @ f.A.double()) for pi, f in zip(p, fs, strict=True))
    assert isinstance(W, torch.Tensor)
    mean = float(W.norm())
    scale = sum(pi * float(f.B.norm() * f.A.norm()) for pi, f in zip(p, fs, strict=True)) / mean
    tol = certificate_tol(dtype, n=n_dims(d, k, [r] * n), scale=scale)
    for R in (1, 2, 5, n * r, n * r + 2):
        res = op(fs, w, rank=R)
        assert res.certificate is not None
        assert res.certificate.method == "svd"
        measured = float((res.update.delta().double() - W).norm()) / mean
        assert abs(res.certificate.relative_residual - measured) <= tol, (R, measured)
        assert abs(res.certificate.mean_norm - mean) <= tol * mean
    # A direct call warns above max_residual, pointing at the caller (the round warns per
    # module by name instead, test_rounds).
    with pytest.warns(ResidualWarning, match="rank-1 truncation of the mean") as caught:
        op(fs, w, rank=1, options={"max_residual": 1e-3})
    assert {c.filename for c in caught} == {__file__}
    # A zero mean is certified exactly.
    zero = [LoRAFactors(torch.zeros(d, r, dtype=dtype), f.A) for f in fs]
    cert = op(zero, w, rank=1).certificate
    assert cert is not None
    assert (cert.relative_residual, cert.mean_norm) == (0.0, 0.0)


def test_half_precision_and_extreme_clients_get_their_measured_error() -> None:
    """Where the update is not exactly the truncation (rounded to half precision after the
    SVD; scaled back from unit scale for clients outside the comfortable band), the
    certificate is the update's error measured from the factors in float64."""
    g = torch.Generator().manual_seed(2)
    cases = [
        (torch.bfloat16, 1.0),
        (torch.float16, 1.0),
        (torch.float32, 2.0**-70),  # products near float32's smallest normal
        (torch.float32, 2.0**60),  # squares beyond float32's range
        (torch.float64, 2.0**-500),
    ]
    d, k, r = 6, 5, 2
    for dtype, c in cases:
        fs = [LoRAFactors((c * torch.randn(d, r, generator=g, dtype=torch.float64)).to(dtype),
                          (c * torch.randn(r, k, generator=g, dtype=torch.float64)).to(dtype))
              for _ in range(3)]  # fmt: skip
        # at unit scale in float64 (exact: powers of 2)
        W = sum((f.B.double() / c) @ (f.A.double() / c) for f in fs) / 3
        assert isinstance(W, torch.Tensor)
        scale = sum(float((f.B.double() / c).norm() * (f.A.double() / c).norm()) for f in fs) / 3
        # The weights are normalised in the clients' working dtype, as every certificate's.
        tol = certificate_tol(dtype, n=n_dims(d, k, [r] * 3), scale=scale / float(W.norm()))
        for name in ("flexlora", "svd_mean"):
            res = get_operator(name)(fs, rank=2)
            assert res.certificate is not None
            assert res.certificate.method == "qr", (dtype, c)
            U = (res.update.B.double() / c) @ (res.update.A.double() / c)
            measured = float((U - W).norm() / W.norm())
            assert abs(res.certificate.relative_residual - measured) <= tol, (dtype, c, name)


def test_a_truncation_far_below_the_normal_range_is_returned_and_its_loss_said() -> None:
    # Float32 factors of 2^-80 entries: the mean's entries (about 2^-160) are below float32's
    # smallest subnormal (2^-149). FlexLoRA's U s was zero, the update lost (certified 1, with
    # a warning). Computed at unit scale and split back between B and A (2^-80 each), the
    # update is returned whole: its certificate is the unit problem's, and nothing is said.
    # Clients that are themselves subnormal (2^-146: two or three digits each) give factors
    # that are subnormal too: the certificate measures what that cost, and a warning says it.
    def clients(c: float) -> list[LoRAFactors]:
        g = torch.Generator().manual_seed(4)
        return [LoRAFactors(c * torch.randn(6, 2, generator=g), c * torch.randn(2, 5, generator=g))
                for _ in range(3)]  # fmt: skip

    op = get_operator("flexlora")
    unit = op(clients(1.0), rank=2).certificate
    assert unit is not None
    tol = certificate_tol(torch.float32, n=n_dims(6, 5, [2] * 3), scale=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = op(clients(2.0**-80), rank=2)
    assert res.certificate is not None
    assert bool(res.update.B.any() and res.update.A.any())
    assert abs(res.certificate.relative_residual - unit.relative_residual) <= tol
    with pytest.warns(UnderflowWarning, match="partly below torch.float32's normal range") as w:
        res = op(clients(2.0**-146), rank=2)
    assert {x.filename for x in w} == {__file__}  # the caller's line
    assert res.certificate is not None
    assert res.certificate.relative_residual > unit.relative_residual + tol


def test_an_imbalanced_factorisation_is_certified_as_its_product() -> None:
    # Found by review: a power-of-2 imbalance inside one client's factorisation (B 2^600,
    # A 2^-600: the same product) or a zero-weight client with huge entries must not change
    # the update or its certificate (the range check flags them; the measurement rebalances
    # each factorisation before scaling).
    g = torch.Generator().manual_seed(6)
    d, k, r = 6, 5, 2
    f64 = torch.float64
    fs = [LoRAFactors(torch.randn(d, r, generator=g, dtype=f64),
                      torch.randn(r, k, generator=g, dtype=f64)) for _ in range(3)]  # fmt: skip
    c = 2.0**600
    odd = [LoRAFactors(fs[0].B * c, fs[0].A / c), LoRAFactors(fs[1].B / c, fs[1].A * c), fs[2]]
    huge = [*fs, LoRAFactors(fs[0].B * c, fs[0].A * c)]
    p = [1 / 6, 2 / 6, 3 / 6]
    W = sum(pi * f.B @ f.A for pi, f in zip(p, fs, strict=True))
    assert isinstance(W, torch.Tensor)
    for name in ("flexlora", "svd_mean"):
        op = get_operator(name)
        base = op(fs, [1.0, 2.0, 3.0], rank=2)
        assert base.certificate is not None
        spread = sum(pi * float(f.B.norm() * f.A.norm()) for pi, f in zip(p, fs, strict=True))
        spread += float(base.update.B.norm() * base.update.A.norm())
        tol = certificate_tol(f64, n=n_dims(d, k, [r] * 4), scale=spread / float(W.norm()))
        for clients, w in ((odd, [1.0, 2.0, 3.0]), (huge, [1.0, 2.0, 3.0, 0.0])):
            res = op(clients, w, rank=2)
            assert res.certificate is not None
            assert res.certificate.method == "qr"
            got, want = res.certificate.relative_residual, base.certificate.relative_residual
            assert abs(got - want) <= tol, (name, got, want)
