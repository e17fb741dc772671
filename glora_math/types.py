"""Named, typed containers of glora-math.

Shapes are written in jaxtyping notation at the public boundaries (checked at test time);
every container validates its own shapes on construction and raises
:class:`~glora_math.errors.ShapeMismatchError` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from glora_math.errors import DtypeError, GloraError, ShapeMismatchError

GaugeMode = Literal["qr", "svd"]
Split = Literal["balanced", "left", "right"]
#: Which factor's subspaces the consensus is built from: the column spaces of the B_i
#: ("left", the paper's), the row spaces of the A_i ("right", ours), or the better of the two.
Side = Literal["left", "right", "auto"]


@dataclass(frozen=True, slots=True)
class Sketch:
    """Settings of the randomized consensus (Halko, Martinsson, Tropp, arXiv 0909.4061).

    Parameters
    ----------
    oversample
        Extra sketch columns beyond R (the sketch has ``R + oversample`` columns).
    power_iters
        Subspace-iteration passes; each one raises the decay factor of the subspace error,
        ``(lambda_{R+oversample+1} / lambda_R)^(2 q + 1)``, by a power.
    seed
        Seed of the Gaussian test matrix (the result is deterministic given it).
    certificate
        ``"exact"`` (default): the certificate from one QR of the stacked factors, whose cost
        grows with the square of the clients' total rank. ``"estimate"``: a randomized
        estimate from ``probes`` Gaussian probes, linear in the number of clients, with an
        upper bound that holds with probability at least ``confidence``
        (:func:`glora_math.certificate.estimate_norms`); the state records it as estimated.
    probes
        Gaussian probes of the estimate (at least ``4 ln(1 / (1 - confidence))``).
    confidence
        Probability with which the estimate's upper bound holds, in (0, 1).
    """

    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    certificate: Literal["exact", "estimate"] = "exact"
    probes: int = 64
    confidence: float = 0.99

    def __post_init__(self) -> None:
        for name in ("oversample", "power_iters", "seed", "probes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise GloraError(f"Sketch.{name} must be a non-negative int, got {v!r}")
        if self.certificate not in ("exact", "estimate"):
            raise GloraError(
                f"Sketch.certificate must be 'exact' or 'estimate', got {self.certificate!r}"
            )
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 < c < 1.0:
            raise GloraError(f"Sketch.confidence must be a number in (0, 1), got {c!r}")
        need = 4.0 * math.log(1.0 / (1.0 - c))
        if self.certificate == "estimate" and self.probes <= need:
            raise GloraError(
                f"Sketch.probes = {self.probes} is too few for confidence {c}: the bound needs "
                f"more than 4 ln(1 / (1 - confidence)) = {need:.1f} probes"
            )


def _check_matrix(name: str, x: object, *, stack: bool = False) -> Tensor:
    """A floating-point matrix, or (``stack=True``) a stack of them (leading batch dims)."""
    if not isinstance(x, Tensor):
        raise DtypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 and not (stack and x.ndim > 2):
        raise ShapeMismatchError(f"{name} must be a matrix (2-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DtypeError(f"{name} must be floating point, got {x.dtype}")
    if x.is_meta:
        raise DtypeError(f"{name} is a meta tensor (a shape without data)")
    if x.layout != torch.strided:
        raise DtypeError(f"{name} is a {x.layout} tensor; pass a dense one (x.to_dense())")
    return x


@dataclass(frozen=True, slots=True)
class LoRAFactors:
    """The factors of one LoRA update ``dW = B @ A`` (or of a stack of same-shape updates).

    Parameters
    ----------
    B
        Left factor, shape ``(d, r)``; for a stack of L modules ``(L, d, r)`` (any leading
        batch dimensions, the same for A).
    A
        Right factor, shape ``(r, k)``, or ``(L, r, k)``.

    The scale (peft's ``alpha / r``) is assumed folded into the factors. Only
    :func:`glora_math.glora_aggregate` (and the readouts of its states) accept stacks; every
    other operator takes one module's matrices and says so.

    Raises
    ------
    ShapeMismatchError
        If B or A is not 2-D (or a stack with the other's leading dimensions) or their inner
        dimensions differ.
    DtypeError
        If B or A is not a floating-point tensor.
    """

    B: Float[Tensor, "*batch d r"]
    A: Float[Tensor, "*batch r k"]

    def __repr__(self) -> str:
        """Shapes, dtype and device, never the entries (a print of a round stays short)."""
        try:
            lead = tuple(self.B.shape[:-2])
            d, r, k = self.B.shape[-2], self.B.shape[-1], self.A.shape[-1]
        except (AttributeError, IndexError):  # pragma: no cover - __post_init__ refused it
            return "LoRAFactors(<invalid>)"
        stack = f"stack={lead}, " if lead else ""
        dev = "" if self.B.device.type == "cpu" else f", device={self.B.device}"
        return f"LoRAFactors({stack}d={d}, r={r}, k={k}, dtype={str(self.B.dtype)[6:]}{dev})"

    def __post_init__(self) -> None:
        stack = (
            isinstance(self.B, Tensor)
            and isinstance(self.A, Tensor)
            and (self.B.ndim > 2 and self.B.shape[:-2] == self.A.shape[:-2])
        )
        _check_matrix("B", self.B, stack=stack)
        _check_matrix("A", self.A, stack=stack)
        if self.B.shape[-1] != self.A.shape[-2]:
            raise ShapeMismatchError(
                f"inner dimensions differ: B is {tuple(self.B.shape)}, A is {tuple(self.A.shape)}"
            )

    @property
    def rank(self) -> int:
        """The factor rank r (the inner dimension; the product may have lower rank)."""
        return int(self.B.shape[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(d, k)`` of the update ``B @ A`` (of each module of a stack)."""
        return int(self.B.shape[-2]), int(self.A.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading batch dimensions (``()`` for one module)."""
        return tuple(int(n) for n in self.B.shape[:-2])

    def delta(self) -> Float[Tensor, "*batch d k"]:
        """The dense update ``B @ A`` (d-by-k: for tests and small problems)."""
        return self.B @ self.A

    def __iter__(self) -> Iterator[Tensor]:
        """Allow ``B, A = factors``."""
        yield self.B
        yield self.A


@dataclass(frozen=True, slots=True)
class GaugeFixed:
    """A gauge-fixed client update ``dW = U @ C`` with orthonormal columns in ``U``.

    Parameters
    ----------
    U
        Orthonormal basis, shape ``(d, rho)``; ``rho`` is the numerical rank kept.
    C
        Coordinates in that basis, shape ``(rho, k)``.
    """

    U: Float[Tensor, "d rho"]
    C: Float[Tensor, "rho k"]

    def __post_init__(self) -> None:
        _check_matrix("U", self.U)
        _check_matrix("C", self.C)
        if self.U.shape[1] != self.C.shape[0]:
            raise ShapeMismatchError(
                f"inner dimensions differ: U is {tuple(self.U.shape)}, C is {tuple(self.C.shape)}"
            )

    @property
    def rank(self) -> int:
        """Number of basis columns kept (the numerical rank)."""
        return int(self.U.shape[1])

    def delta(self) -> Float[Tensor, "d k"]:
        """The dense update ``U @ C`` (for tests)."""
        return self.U @ self.C


@dataclass(frozen=True, slots=True)
class ConsensusBasis:
    """The consensus subspace of the clients: top-R eigenvectors of ``K = sum_i p_i U_i U_i^T``.

    Parameters
    ----------
    U
        Orthonormal basis ``U_ref``, shape ``(d, R)``.
    eigvals
        The non-zero part of the spectrum of K, descending, shape ``(m,)`` with
        ``m = min(d, sum_i rho_i)``; entries beyond the numerical rank are ~0.
    gap
        ``lambda_R - lambda_{R+1}`` (``lambda_{m+1} = 0``); 0.0 when R = 0.
    """

    U: Float[Tensor, "d R"]
    eigvals: Float[Tensor, " m"]
    gap: float

    @property
    def rank(self) -> int:
        """The server rank R."""
        return int(self.U.shape[1])


@dataclass(frozen=True, slots=True)
class Certificate:
    """The exact error of a server update against the mean update, computed from factors.

    For the orthogonal projector ``P`` of the state (left: ``U U^T .``; right: ``. V V^T``),
    ``||W_bar - P W_bar||_F^2 = ||W_bar||_F^2 - ||P W_bar||_F^2`` (SPEC, L1), and
    ``||P W_bar||_F = ||S||_F`` because ``S`` holds the coordinates of ``P W_bar`` (P1).

    Parameters
    ----------
    relative_residual
        ``||W_bar - update||_F / ||W_bar||_F`` (0.0 when ``W_bar = 0``).
    mean_norm
        ``||W_bar||_F``.

    The difference of squared norms loses digits when the residual is small, so both norms are
    computed directly from one QR of the stacked factors (:func:`glora_math.certificate.certify`);
    the difference serves the auto-rank rule's residual curve only.
    """

    relative_residual: float
    mean_norm: float
    #: True for a randomized estimate (``Sketch(certificate="estimate")``): then
    #: ``relative_residual`` and ``mean_norm`` are estimates, and ``bound`` is an upper bound
    #: on the relative residual that holds with probability at least ``confidence``.
    estimated: bool = False
    bound: float | None = None
    confidence: float | None = None
    #: How it was computed: ``"qr"`` (one QR of the stacked factors), ``"gram"`` (from the
    #: Gram route's matrices, P16, taken only where its error bound is within the QR
    #: certificate's tolerance) or ``"estimate"`` (Gaussian probes, P15). The total
    #: certificate of a stack combines its modules' (``module_certificates`` say how each was
    #: computed) and keeps the default ``"qr"`` unless it is an estimate.
    method: str = "qr"

    @property
    def residual(self) -> float:
        """The absolute residual ``||W_bar - update||_F``."""
        return self.relative_residual * self.mean_norm


@dataclass(frozen=True, slots=True)
class ServerState:
    """The GLoRA server state: basis ``U_ref`` and shared coordinates ``S``.

    The state represents the update ``U_ref @ S = U_ref U_ref^T W_bar`` (SPEC P1). It is kept
    in the working dtype (float32 for half inputs); readouts are cast back to ``dtype``.

    A right-side state (``side="right"``, our extension) is the same object for the transposed
    problem: ``U`` is the consensus basis ``V_ref`` of the clients' row spaces, shape
    ``(k, R)``, ``S = V_ref^T W_bar^T`` has shape ``(R, d)`` and the update is
    ``(U S)^T = W_bar V_ref V_ref^T``. Use :meth:`delta`, :attr:`shape` or
    :func:`glora_math.state_factors`, which hold for both sides.

    Parameters
    ----------
    U
        Consensus basis ``U_ref``, shape ``(d, R)``, orthonormal columns.
    S
        Shared coordinates ``sum_i p_i (U_ref^T U_i) C_i``, shape ``(R, k)``.
    eigvals
        Spectrum of K (see :class:`ConsensusBasis`).
    gap
        Consensus eigengap at R.
    requested_rank
        The rank asked for; ``R = U.shape[1]`` is smaller if it was clamped.
    weights
        The renormalised client weights ``p`` actually used, shape ``(N,)``.
    gauge
        Gauge-fixing mode used for the clients.
    dtype
        dtype of the client factors (readouts are returned in it).
    side
        ``"left"`` (consensus of the B_i column spaces) or ``"right"`` (of the A_i row spaces).
    certificate
        The exact error of the update against the mean update (:class:`Certificate`).
    rank_rule
        ``"fixed"`` (R as requested, clamped) or ``"auto"`` (the smallest R whose certified
        relative residual is at most ``tol``).
    tol
        The tolerance of ``rank_rule="auto"``, else ``None``.
    module_gaps
        For a stack of modules: each module's eigengap, shape ``(*batch,)``; else ``None``.
    module_certificates
        For a stack of modules: each module's certificate (flattened batch order); else
        ``None``.
    route
        How the client bases were computed: ``"gram"`` (float64 Gram matrices of the raw
        factors) or ``"householder"`` (explicit gauge-fixed clients); for a stack,
        ``"stacked-gram"`` or ``"stacked-householder"`` (the batched kernels; modules redone
        one by one took the per-module rule).

    A state of a stack of L same-shape modules (from stacked factors) has leading batch
    dimensions on ``U`` ``(L, n, R)``, ``S`` ``(L, R, c)`` and ``eigvals`` ``(L, m)``; then
    ``gap`` is the smallest module gap, ``certificate`` that of the stacked update (all
    modules together: ``sqrt(sum_l ||W_bar_l - update_l||^2 / sum_l ||W_bar_l||^2)``), and
    :meth:`module` gives one module's state. A module whose clients span fewer than R
    directions has zero columns in ``U`` (and zero rows in ``S``) beyond them.
    """

    U: Float[Tensor, "*batch n R"]
    S: Float[Tensor, "*batch R c"]
    eigvals: Float[Tensor, "*batch m"]
    gap: float
    requested_rank: int
    weights: Float[Tensor, " N"]
    gauge: GaugeMode
    dtype: torch.dtype
    side: Literal["left", "right"] = "left"
    certificate: Certificate | None = None
    rank_rule: Literal["fixed", "auto"] = "fixed"
    tol: float | None = None
    module_gaps: Tensor | None = None
    module_certificates: tuple[Certificate, ...] | None = None
    route: str = "householder"

    @property
    def rank(self) -> int:
        """The effective server rank R (columns of ``U``)."""
        return int(self.U.shape[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(d, k)`` of the represented update (for either side)."""
        n, m = int(self.U.shape[-2]), int(self.S.shape[-1])
        return (n, m) if self.side == "left" else (m, n)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading batch dimensions (``()`` for one module)."""
        return tuple(int(n) for n in self.U.shape[:-2])

    def module(self, index: int) -> ServerState:
        """The state of module ``index`` of a stack (flattened batch order; views, no copy)."""
        if not self.batch_shape:
            raise GloraError("module() needs a state of stacked modules")
        count = math.prod(self.batch_shape)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise GloraError(f"module index must be an int in [0, {count}), got {index!r}")
        U = self.U.reshape(count, *self.U.shape[-2:])[index]
        S = self.S.reshape(count, *self.S.shape[-2:])[index]
        eig = self.eigvals.reshape(count, self.eigvals.shape[-1])[index]
        gap = self.gap if self.module_gaps is None else float(self.module_gaps.flatten()[index])
        certs = self.module_certificates
        return ServerState(
            U=U,
            S=S,
            eigvals=eig,
            gap=gap,
            requested_rank=self.requested_rank,
            weights=self.weights,
            gauge=self.gauge,
            dtype=self.dtype,
            side=self.side,
            certificate=None if certs is None else certs[index],
            rank_rule=self.rank_rule,
            tol=self.tol,
            route=self.route,
        )

    @property
    def relative_residual(self) -> float:
        """``||W_bar - update||_F / ||W_bar||_F`` from the certificate (NaN without one)."""
        return float("nan") if self.certificate is None else self.certificate.relative_residual

    def delta(self) -> Float[Tensor, "*batch d k"]:
        """The dense update (d-by-k: for tests and small problems only)."""
        prod = self.U @ self.S
        return prod if self.side == "left" else prod.mT


__all__ = [
    "Certificate",
    "ConsensusBasis",
    "GaugeFixed",
    "GaugeMode",
    "LoRAFactors",
    "ServerState",
    "Side",
    "Sketch",
    "Split",
]
