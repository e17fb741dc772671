"""Input validation shared by every operator: clients, weights, ranks.

Each check raises a typed :class:`~glora_math.errors.GloraError` naming the client at fault.
Costs are O(N r (d + k)): every entry of every factor is read once (finiteness), nothing more.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glora_math.errors import (
    DeviceMismatchError,
    EmptyClientsError,
    GloraError,
    NonFiniteError,
    RankError,
    ShapeMismatchError,
    WeightError,
)
from glora_math.tolerances import working_dtype
from glora_math.types import LoRAFactors

WeightsLike = Tensor | Sequence[float] | None

#: What a kernel raises on overflowed (finite but huge) input; mapped to NonFiniteError.
KERNEL_ERRORS: tuple[type[Exception], ...] = (
    torch.linalg.LinAlgError,  # type: ignore[attr-defined]
    OverflowError,
)


@dataclass(frozen=True, slots=True)
class ClientsInfo:
    """What all clients agree on: update shape, input dtype (promoted), working dtype, device.

    ``batch_shape`` is the clients' common leading batch dimensions (``()`` for one module).
    """

    d: int
    k: int
    dtype: torch.dtype
    work_dtype: torch.dtype
    device: torch.device
    batch_shape: tuple[int, ...] = ()


def as_factors(client: object, index: int) -> LoRAFactors:
    """Return ``client`` as :class:`LoRAFactors`, accepting a ``(B, A)`` pair.

    Raises
    ------
    GloraError
        (a subclass) naming client ``index`` if it cannot be read as factors.
    """
    if isinstance(client, LoRAFactors):
        return client
    if isinstance(client, tuple) and len(client) == 2:
        try:
            return LoRAFactors(client[0], client[1])
        except GloraError as err:
            raise err.with_context(client=index) from None
    raise ShapeMismatchError(
        f"expected LoRAFactors(B, A) or a (B, A) tuple, got {type(client).__name__}", client=index
    )


def all_finite(x: Tensor) -> bool:
    """True if every entry of ``x`` is finite, in one cheap reduction where possible.

    A sum is finite only if every term is (a NaN or an infinity propagates), so a finite sum
    settles it; a non-finite sum may be an overflow of finite terms, and then the elementwise
    check decides. The sum reads ``x`` once and allocates nothing of its size.
    """
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


class ValidatedClients(tuple[LoRAFactors, ...]):
    """Clients already checked by :func:`validate_clients`, carrying what they agree on.

    Made by :func:`validated`. Every entry point that validates clients (the operators, the
    baselines, :func:`glora_math.glora_aggregate`, the metrics) takes them as they are, so a
    round validates each module's clients once, at its boundary. Immutable (a tuple).
    """

    info: ClientsInfo

    def __new__(cls, factors: Sequence[LoRAFactors], info: ClientsInfo) -> ValidatedClients:
        """The checked ``factors`` (LoRAFactors) with their :class:`ClientsInfo`."""
        self = super().__new__(cls, factors)
        self.info = info
        return self


def validated(factors: Sequence[LoRAFactors], *, stack: bool = False) -> ValidatedClients:
    """``factors`` validated once (:func:`validate_clients`), as :class:`ValidatedClients`.

    ``(B, A)`` tuples become :class:`LoRAFactors`.
    """
    if isinstance(factors, ValidatedClients):
        validate_clients(factors, stack=stack)  # the stack rule still applies
        return factors
    info = _check_clients(factors, stack)
    return ValidatedClients([as_factors(f, i) for i, f in enumerate(factors)], info)


def permuted(
    clients: ValidatedClients, p: Tensor, order: Sequence[int]
) -> tuple[ValidatedClients, Tensor]:
    """Validated clients and their normalised weights in another ``order`` (still both)."""
    if sorted(order) != list(range(len(clients))) or tuple(p.shape) != (len(clients),):
        raise ValueError(f"order {list(order)} is not a permutation of {len(clients)} clients")
    q = p[list(order)]
    if _is_normalized(p, len(clients)):
        _remember(q)
    return ValidatedClients([clients[i] for i in order], clients.info), q


def validate_clients(factors: Sequence[LoRAFactors], *, stack: bool = False) -> ClientsInfo:
    """Check that clients are non-empty, shape-compatible, on one device and finite.

    Ranks may differ between clients; ``d`` and ``k`` may not. With ``stack=True`` the
    clients may carry stacks of same-shape modules (leading batch dimensions, the same for
    every client); otherwise a stack is refused, naming the client. Clients that were
    validated already (:class:`ValidatedClients`) are not checked again.

    Raises
    ------
    EmptyClientsError, ShapeMismatchError, DeviceMismatchError, NonFiniteError, DtypeError
    """
    if isinstance(factors, ValidatedClients):
        if factors.info.batch_shape and not stack:
            raise ShapeMismatchError(
                f"stacked factors (batch dimensions {factors.info.batch_shape}) are accepted "
                "only by glora_aggregate; pass one module's (d, r) and (r, k) matrices",
                client=0,
            )
        return factors.info
    return _check_clients(factors, stack)


def _check_clients(factors: Sequence[LoRAFactors], stack: bool) -> ClientsInfo:
    """The checks of :func:`validate_clients` (every entry of every factor read once)."""
    given: object = factors  # the annotation is a promise the caller may not keep
    if given is None:
        raise EmptyClientsError("no client factors were given (got None)")
    if isinstance(given, str | bytes | Tensor | LoRAFactors) or not hasattr(given, "__len__"):
        raise ShapeMismatchError(
            f"expected a sequence of LoRAFactors (one per client), got {type(given).__name__}"
        )
    if len(factors) == 0:
        raise EmptyClientsError("no client factors were given")
    clients = [as_factors(f, i) for i, f in enumerate(factors)]
    d, k = clients[0].shape
    batch = clients[0].batch_shape
    device = clients[0].B.device
    dtype = clients[0].B.dtype
    if 0 in batch:
        raise ShapeMismatchError(f"a stack of no modules (batch dimensions {batch})", client=0)
    for i, f in enumerate(clients):
        if f.batch_shape and not stack:
            raise ShapeMismatchError(
                f"stacked factors (batch dimensions {f.batch_shape}) are accepted only by "
                "glora_aggregate; pass one module's (d, r) and (r, k) matrices",
                client=i,
            )
        if f.batch_shape != batch:
            raise ShapeMismatchError(
                f"batch dimensions {f.batch_shape} differ from client 0's {batch}", client=i
            )
        if f.shape != (d, k):
            raise ShapeMismatchError(
                f"update shape {f.shape} (B {tuple(f.B.shape)}, A {tuple(f.A.shape)}) differs "
                f"from client 0's {(d, k)}",
                client=i,
            )
        for name, x in (("B", f.B), ("A", f.A)):
            if x.device != device:
                raise DeviceMismatchError(
                    f"{name} is on {x.device}, client 0 is on {device}", client=i
                )
            dtype = torch.promote_types(dtype, x.dtype)
            working_dtype(x.dtype)  # raises DtypeError for unsupported dtypes
            if not all_finite(x):
                bad = int((~torch.isfinite(x)).sum())
                raise NonFiniteError(f"{name} has {bad} NaN/Inf entries", client=i)
    return ClientsInfo(
        d=d, k=k, dtype=dtype, work_dtype=working_dtype(dtype), device=device, batch_shape=batch
    )


def largest_client(factors: Sequence[LoRAFactors]) -> tuple[int, float]:
    """The client with the largest ``||B||_F ||A||_F`` (float64; inf if it overflows), and it.

    Where an aggregate overflows, this is the client to name.
    """
    best, top = 0, -1.0
    for i, f in enumerate(factors):
        c = as_factors(f, i)
        with torch.no_grad():
            b = float(torch.linalg.vector_norm(c.B.detach().to(torch.float64)))
            a = float(torch.linalg.vector_norm(c.A.detach().to(torch.float64)))
        size = b * a if math.isfinite(b * a) else math.inf
        if size > top:
            best, top = i, size
    return best, top


def overflow_error(
    cause: str, factors: Sequence[LoRAFactors], *, clients: int | None = None
) -> NonFiniteError:
    """The typed error for an overflow on validated (finite) input, naming the largest client.

    ``cause`` says what overflowed. ``factors`` may hold several modules' clients one module
    after another (``clients`` per module); the client index is then taken modulo ``clients``.
    """
    j, size = largest_client(factors)
    return NonFiniteError(
        f"{cause}; the largest client update has ||B|| ||A|| = {size:.2e} (rescale the "
        "factors, or aggregate in float64)",
        client=j % clients if clients else j,
    )


def check_finite_output(
    tensors: Sequence[Tensor | None], factors: Sequence[LoRAFactors], what: str
) -> None:
    """Raise :func:`overflow_error` if any output is not finite.

    ``what`` names the operation (for the message). Finite inputs can still overflow the
    working dtype (a client update near its largest value); no Inf or NaN leaves an operator.
    """
    if all(t is None or all_finite(t) for t in tensors):
        return
    raise overflow_error(f"{what} overflowed: the result has Inf/NaN entries", factors)


def normalize_weights(
    weights: WeightsLike, n: int, *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Return weights ``p`` (shape ``(n,)``) that are non-negative and sum to 1.

    ``None`` means equal weights. Zero weights are allowed (those clients drop out). Weights
    are real numbers (a tensor, or a sequence of ints and floats); they are scaled by their
    largest entry before summing, so weights near the float64 limit do not overflow.

    Raises
    ------
    WeightError
        On wrong length, a non-number (None, a string, a complex number), NaN/Inf, a value
        beyond float64, a negative entry (naming the client) or an all-zero vector.
    """
    if isinstance(weights, Tensor) and _is_normalized(weights, n):
        # Normalised already (by this function): cast, never normalise twice.
        if weights.dtype == dtype and weights.device == device:
            return weights
        return _remember(weights.to(dtype=dtype, device=device))
    return _remember(_normalize(weights, n, dtype=dtype, device=device))


#: The weight vectors this function returned (by id) and their version counter then: a vector
#: passed back unchanged is not normalised again (an in-place edit bumps the version). An entry
#: leaves with its tensor.
_NORMALIZED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
_VERSIONS: dict[int, int] = {}


def _remember(p: Tensor) -> Tensor:
    if _NORMALIZED.get(id(p)) is not p:
        _NORMALIZED[id(p)] = p
        weakref.finalize(p, _VERSIONS.pop, id(p), None)
    _VERSIONS[id(p)] = p._version
    return p


def _is_normalized(w: Tensor, n: int) -> bool:
    return (
        _NORMALIZED.get(id(w)) is w
        and _VERSIONS.get(id(w)) == w._version
        and tuple(w.shape) == (n,)
        and not w.requires_grad
    )


def _normalize(weights: WeightsLike, n: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The arithmetic of :func:`normalize_weights` (checks, scaling by the largest, sum 1)."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    values = _weight_values(weights)
    if len(values) != n:
        raise WeightError(f"got {len(values)} weights for {n} clients")
    for i, wi in enumerate(values):
        if not math.isfinite(wi):
            raise WeightError(f"weight is {wi}", client=i)
        if wi < 0:
            raise WeightError(f"weight {wi} is negative", client=i)
    top = max(values, default=0.0)
    if top <= 0.0:
        raise WeightError("all weights are zero")
    w = torch.tensor([wi / top for wi in values], dtype=torch.float64)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _weight_values(weights: object) -> list[float]:
    """The weights as Python floats, or a :class:`WeightError` naming the bad entry."""
    if isinstance(weights, Tensor):
        if weights.is_complex() or not (weights.is_floating_point() or weights.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):  # fmt: skip
            raise WeightError(f"weights must be a real tensor, got {weights.dtype}")
        return [float(x) for x in weights.detach().to("cpu", torch.float64).flatten().tolist()]
    if isinstance(weights, str | bytes) or not hasattr(weights, "__iter__"):
        raise WeightError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    out = []
    for i, item in enumerate(weights):
        if isinstance(item, bool | complex) or not isinstance(item, int | float):
            # numpy and torch real scalars convert; None, strings and complex numbers do not
            real = hasattr(item, "__float__") and not isinstance(item, bool | complex | str)
            if not real or getattr(item, "is_complex", lambda: False)():
                raise WeightError(
                    f"weight must be a real number, got {type(item).__name__}", client=i
                )
        try:
            out.append(float(item))
        except OverflowError:
            raise WeightError("weight is beyond the float64 range", client=i) from None
        except (TypeError, ValueError) as err:
            raise WeightError(f"weight is not a real number ({err})", client=i) from None
    return out


def validate_rank(rank: object, *, name: str = "rank") -> int:
    """Return ``rank`` as a positive int.

    Raises
    ------
    RankError
        If ``rank`` is not an integer (bools excluded) or is < 1.
    """
    if isinstance(rank, bool):
        raise RankError(f"{name} must be a positive int, got {rank!r}")
    try:
        rank = operator.index(rank)  # type: ignore[arg-type]
    except TypeError:
        raise RankError(f"{name} must be a positive int, got {rank!r}") from None
    if rank < 1:
        raise RankError(f"{name} must be >= 1, got {rank}")
    return rank


__all__ = [
    "KERNEL_ERRORS",
    "ClientsInfo",
    "ValidatedClients",
    "WeightsLike",
    "all_finite",
    "as_factors",
    "check_finite_output",
    "largest_client",
    "normalize_weights",
    "overflow_error",
    "permuted",
    "validate_clients",
    "validate_rank",
    "validated",
]
