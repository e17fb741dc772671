"""The Flower app's run configuration: its keys, their defaults and their checks.

Every run-config key is a field of :class:`FlowerConfig`; an unknown key or a value that
cannot work stops the run with a one-line :class:`FlowerConfigError` naming it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from glora_math import GloraError
from glora_math.operators import get_operator, list_operators, parse_options

#: Kinds of fault a partition can be told to inject (``faulty`` run-config key).
FAULTS = ("nan", "missing", "shape")


_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("clients", "rounds", "local_steps", "batch_size", "max_train", "max_eval"),
     lambda v: v >= 1, "must be at least 1"),
    (("max_len",), lambda v: v >= 2, "must be at least 2"),
    (("threads",), lambda v: v >= 0, "must be 0 (torch's default) or more"),
    (("dirichlet", "lr", "timeout"), lambda v: v > 0, "must be a positive number"),
    (("max_residual",), lambda v: v >= 0, "must be 0 (off) or more"),
    (("participation",), lambda v: 0 < v <= 1, "must be in (0, 1]"),
    (("fraction_evaluate",), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    (("client_ranks",), lambda v: bool(v) and min(v) >= 1, "must be positive whole numbers"),
    (("server_rank",), lambda v: v is None or v >= 1,
     "must be positive (0: the largest client rank)"),
    (("target_modules",), lambda v: bool(v) and all(v), "must name at least one module"),
    (("faulty",), lambda v: all(p >= 0 and k in FAULTS for p, k in v),
     f"must be 'partition:kind' pairs with kind in {', '.join(FAULTS)}"),
    (("model", "task", "out"), bool, "must not be empty"),
)  # fmt: skip


class FlowerConfigError(GloraError):
    """Settings of a Flower run (run config, node config) that cannot work: one line, the key."""


@dataclass(frozen=True)
class FlowerConfig:
    """Settings of a Flower run (defaults: a CI-sized run with the tiny random RoBERTa).

    In Flower's run config the keys are these names with ``-`` for ``_``; ``client-ranks``
    and ``target-modules`` are comma-separated strings, ``faulty`` is ``"2:nan,1:shape"``,
    ``server-rank = 0`` means the largest client rank and ``data-dir = ""`` means
    ``$GLORA_DATA`` or ``../shared/data``.
    """

    model: str = "tiny-roberta"
    task: str = "sst2"
    data_dir: str = ""
    clients: int = 3  # nodes the server waits for before round 1
    rounds: int = 2
    dirichlet: float = 0.5
    local_steps: int = 2
    batch_size: int = 8
    lr: float = 5e-4
    client_ranks: tuple[int, ...] = (2, 4, 4)
    server_rank: int | None = None
    operator: str = "glora_auto"
    max_residual: float = 0.2
    # Any option the operator declares, "name=value,..." (e.g. "lam=0.02,steps=10").
    options: str = ""
    participation: float = 1.0
    fraction_evaluate: float = 1.0
    seed: int = 0
    max_train: int = 120
    max_eval: int = 60
    max_len: int = 32
    target_modules: tuple[str, ...] = ("query", "value")
    faulty: tuple[tuple[int, str], ...] = ()  # (partition, "nan" | "missing" | "shape")
    # Fresh LoRA starts: one shared init (the rank-r part of one draw at the largest client
    # rank, seeded by seed and round), or, if True, a per-client draw (an ablation).
    per_client_init: bool = False
    threads: int = 1  # torch threads per app process (0: torch's default)
    out: str = "out/flower"
    timeout: float = 300.0  # seconds the server waits for nodes and for a round's replies

    def faults(self) -> dict[int, str]:
        """Fault injection: partition -> kind."""
        return dict(self.faulty)

    def rank_of(self, partition: int) -> int:
        """The LoRA rank of a partition (the ranks cycle)."""
        return self.client_ranks[partition % len(self.client_ranks)]

    def check(self) -> FlowerConfig:
        """Raise :class:`FlowerConfigError` (one line, the key) if a value cannot work."""
        for names, ok, why in _RULES:
            for name in names:
                if not ok(getattr(self, name)):
                    _bad(name, getattr(self, name), why)
        if self.operator not in list_operators():
            near = difflib.get_close_matches(self.operator, list_operators(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            _bad("operator", self.operator, f"is not an operator{hint}; one of "
                 f"{', '.join(list_operators())}")  # fmt: skip
        try:
            opts = self.operator_options()
        except GloraError as err:
            _bad("options", self.options, f"cannot be read: {err.message}")
        unknown = sorted(set(opts) - set(get_operator(self.operator).options))
        if unknown:
            _bad("options", self.options, f"names {unknown}; operator {self.operator!r} takes "
                 f"{sorted(get_operator(self.operator).options)}")  # fmt: skip
        return self

    def operator_options(self) -> dict[str, float]:
        """``options`` as a mapping (``{}`` when empty)."""
        return parse_options(self.options)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerConfig:
        """The settings of Flower's ``run_config``, checked (defaults for absent keys).

        Raises
        ------
        FlowerConfigError
            One line naming the key: an unknown (misspelled) key, a value of the wrong type,
            or a value that cannot work (:meth:`check`).
        """
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        for key in sorted(run_config):
            if key not in known:
                near = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise FlowerConfigError(f"unknown run-config key {key!r}{hint}; the keys are "
                                        f"{', '.join(sorted(known))}")  # fmt: skip
        kw = {known[k]: _parse(known[k], v) for k, v in run_config.items()}
        return cls(**kw).check()

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """These settings as Flower run-config values (the inverse of :meth:`from_run_config`)."""
        out: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if f.name in ("client_ranks", "target_modules"):
                out[key] = ",".join(str(x) for x in v)
            elif f.name == "faulty":
                out[key] = ",".join(f"{p}:{k}" for p, k in v)
            elif f.name == "server_rank":
                out[key] = v or 0
            else:
                out[key] = v
        return out


_INT = ("clients", "rounds", "local_steps", "batch_size", "server_rank", "seed", "max_train",
        "max_eval", "max_len", "threads")  # fmt: skip
_FLOAT = ("dirichlet", "lr", "max_residual", "participation", "fraction_evaluate", "timeout")
_STR = ("model", "task", "data_dir", "operator", "options", "out")
_BOOL = ("per_client_init",)


def _bad(name: str, value: object, why: str) -> NoReturn:
    if name in ("client_ranks", "target_modules") and isinstance(value, tuple):
        value = ",".join(str(x) for x in value)
    elif name == "faulty" and isinstance(value, tuple):
        value = ",".join(f"{p}:{k}" for p, k in value)
    raise FlowerConfigError(f"run-config key {name.replace('_', '-')!r} = {value!r} {why}")


def _parse(name: str, value: object) -> Any:
    """One run-config value as the field's type, or a one-line error naming the key."""
    key = name.replace("_", "-")
    if name in _INT:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif name in _FLOAT:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok, what = ok and math.isfinite(value), "a finite number"  # type: ignore[arg-type]
    elif name in _BOOL:
        ok, what = isinstance(value, bool), "true or false"
    else:
        ok, what = isinstance(value, str), "a string"
    if ok and isinstance(value, str) and name not in _STR:
        parts = [x.strip() for x in value.split(",") if x.strip()]
        try:
            if name == "client_ranks":
                return tuple(int(x) for x in parts)
            if name == "faulty":
                return tuple((int(p), kind.strip()) for p, kind in (x.split(":") for x in parts))
        except ValueError:
            ok, what = False, ("comma-separated whole numbers" if name == "client_ranks"
                               else "comma-separated 'partition:kind' pairs")  # fmt: skip
        else:
            return tuple(parts)  # target_modules
    if not ok:
        raise FlowerConfigError(f"run-config key {key!r} must be {what}, got {value!r} "
                                f"({type(value).__name__})")  # fmt: skip
    if name == "server_rank":
        return value or None
    return float(value) if name in _FLOAT else value  # type: ignore[arg-type]


__all__ = ["FAULTS", "FlowerConfig", "FlowerConfigError"]
