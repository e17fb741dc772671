"""Typed errors and warnings of glora-math.

Every error raised for bad input is a :class:`GloraError` (a ``ValueError``) that names the
client (0-based index in the list passed in) and, where the caller supplied one, the module
(for example a peft module name) so that a server log says *who* sent *what*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self


class GloraError(ValueError):
    """Base class of all input and numerical errors raised by glora-math.

    Parameters
    ----------
    message
        What is wrong, in words.
    client
        Index of the offending client, if one client is to blame.
    module
        Name of the adapted module (e.g. ``"layers.0.self_attn.q_proj"``), if known.
    """

    def __init__(self, message: str, *, client: int | None = None, module: str | None = None):
        self.message = message
        self.client = client
        self.module = module
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.module is not None:
            where.append(f"module {self.module!r}")
        if self.client is not None:
            where.append(f"client {self.client}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def with_context(self, *, module: str | None = None, client: int | None = None) -> Self:
        """Return a copy of this error with the module and/or client filled in."""
        return type(self)(
            self.message,
            client=self.client if client is None else client,
            module=self.module if module is None else module,
        )


class ShapeMismatchError(GloraError):
    """A factor has the wrong number of dimensions, or shapes disagree within or across clients."""


class NonFiniteError(GloraError):
    """A factor or weight contains NaN or +-Inf."""


class WeightError(GloraError):
    """Aggregation weights are negative, non-finite, all zero or of the wrong length."""


class EmptyClientsError(GloraError):
    """No client factors were given (or none has positive weight)."""


class RankError(GloraError):
    """A requested rank is not a positive integer or exceeds what is available."""


class DeviceMismatchError(GloraError):
    """Client tensors live on different devices."""


class DtypeError(GloraError):
    """A tensor is not a floating-point tensor of a supported dtype."""


class GaugeError(GloraError):
    """A gauge matrix is not square of the right size, or is numerically singular."""


class ProtocolError(GloraError):
    """Client factors violate a method's protocol (e.g. FFA-LoRA's frozen, shared A)."""


class OptionError(GloraError, ValueError):
    """An option or setting that is not known, or a value of one that cannot be used.

    Also a ``ValueError``, as such errors were before they were typed.
    """


class UnknownOperatorError(GloraError, KeyError):
    """An operator name that is not registered (also a ``KeyError``, as a lookup)."""

    def __str__(self) -> str:
        return self._render()


class GloraWarning(UserWarning):
    """Base class of glora-math warnings.

    Parameters
    ----------
    message
        What happened, in words.
    modules
        Where, when known: module names (as :func:`glora_math.rounds.aggregate_modules` and
        the framework glue give them) or positions in a stack of same-shape modules
        (flattened batch order, as the batched kernels know them). The rendered message
        starts with them, as a :class:`GloraError`'s starts with its module and client.
    """

    def __init__(self, message: str = "", *, modules: Sequence[str | int] = ()):
        self.message = message
        self.modules = tuple(modules)
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.modules:
            return self.message
        where = ", ".join(repr(m) if isinstance(m, str) else str(m) for m in self.modules)
        return f"module{'s' if len(self.modules) > 1 else ''} {where}: {self.message}"

    def located(self, modules: Sequence[str | int]) -> Self:
        """A copy naming ``modules``, unless this warning names modules already."""
        return self if self.modules else self._with(modules)

    def named(self, names: Sequence[str]) -> Self:
        """A copy with stack positions ``j`` replaced by ``names[j]``.

        A warning that names no module concerns every module of the call that raised it,
        and names all of ``names``.
        """
        if not self.modules:
            return self._with(names)
        return self._with(
            [names[m] if isinstance(m, int) and 0 <= m < len(names) else m for m in self.modules]
        )

    def __reduce__(self) -> str | tuple[object, ...]:
        # Keep the modules across pickling (the default rebuilds from the rendered text).
        if type(self).__init__ is not GloraWarning.__init__:
            return super().__reduce__()
        return (_rebuilt, (type(self), self.message, self.modules))

    def _with(self, modules: Sequence[str | int]) -> Self:
        try:
            return type(self)(self.message, modules=modules)
        except TypeError:  # a subclass with another signature: left as it is
            return self


def _rebuilt(cls: type[GloraWarning], message: str, modules: Sequence[str | int]) -> GloraWarning:
    """A :class:`GloraWarning` from its parts (unpickling)."""
    return cls(message, modules=modules)


class ZeroEigengapWarning(GloraWarning):
    """The consensus eigengap at the requested rank is numerically zero.

    The top-R eigenspace of K is then not unique: the server basis may change under
    arbitrarily small perturbations of the client updates.
    """


class RankClampedWarning(GloraWarning):
    """The requested server rank exceeded the rank the clients span; it was clamped."""


class UnderflowWarning(GloraWarning):
    """A result is too small for its dtype: it is returned as zero, and its certificate says so."""


class ResidualWarning(GloraWarning):
    """The certified relative residual of a server update exceeds the caller's threshold.

    The server update then misses more of the mean update than the caller accepts; the message
    names the residual, the threshold, the side and the rank (and the module when known).
    """


__all__ = [
    "DeviceMismatchError",
    "DtypeError",
    "EmptyClientsError",
    "GaugeError",
    "GloraError",
    "GloraWarning",
    "NonFiniteError",
    "OptionError",
    "ProtocolError",
    "RankClampedWarning",
    "RankError",
    "ResidualWarning",
    "ShapeMismatchError",
    "UnderflowWarning",
    "WeightError",
    "ZeroEigengapWarning",
]
