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
from glora_math.operators import parse_options

from ..federated.settings import RunSettings

#: Kinds of fault a partition can be told to inject (``faulty`` run-config key).
FAULTS = ("nan", "missing", "shape")


_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("timeout",), lambda v: v > 0, "must be a positive number"),
    (("fraction_evaluate", "min_fraction"), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    (("min_replies",), lambda v: v >= 1, "must be at least 1"),
    (("faulty",), lambda v: all(p >= 0 and k in FAULTS for p, k in v),
     f"must be 'partition:kind' pairs with kind in {', '.join(FAULTS)}"),
    (("out",), bool, "must not be empty"),
)  # fmt: skip


class FlowerConfigError(GloraError):
    """Settings of a Flower run (run config, node config) that cannot work: one line, the key."""


@dataclass
class FlowerConfig(RunSettings):
    """Settings of a Flower run: every run's (:class:`RunSettings`) and the Flower app's own.

    The settings shared with ``glora simulate`` have its defaults and its checks.

    In Flower's run config the keys are these names with ``-`` for ``_``; ``client-ranks``,
    ``target-modules`` and ``options`` are comma-separated strings (``"2,4,8"``,
    ``"query,value"``, ``"lam=0.02,steps=10"``), ``faulty`` is ``"2:nan,1:shape"``, and
    ``server-rank = 0`` and an empty string (``data-dir``, ``train-file``, ...) mean unset.
    ``clients`` is the number of SuperNodes the server waits for; each partition ``i`` (node
    config ``partition-id``) trains at rank ``client_ranks[i % len(client_ranks)]``.
    """

    fraction_evaluate: float = 1.0
    # A round aggregates only with at least max(min_replies, ceil(min_fraction * sampled))
    # usable replies; otherwise the global model is unchanged and the round says why.
    min_replies: int = 1
    min_fraction: float = 0.0
    faulty: tuple[tuple[int, str], ...] = ()  # (partition, "nan" | "missing" | "shape")
    out: str = "out/flower"
    timeout: float = 300.0  # seconds the server waits for nodes and for a round's replies
    # Continue from the checkpoint in <out>/checkpoint (written after every round) after a
    # SuperLink or server crash: the same settings, rounds may grow.
    resume: bool = False
    # Keep each round's accepted replies in <out>/replies (for replaying a run's aggregation).
    keep_replies: bool = False

    def faults(self) -> dict[int, str]:
        """Fault injection: partition -> kind."""
        return dict(self.faulty)

    def check(self) -> FlowerConfig:
        """Raise :class:`FlowerConfigError` (one line, the key) if a value cannot work."""
        found = self.invalid_settings() + [
            (name, getattr(self, name), why)
            for names, ok, why in _RULES
            for name in names
            if not ok(getattr(self, name))
        ]
        if found:
            _bad(*found[0])
        return self

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
        return {
            f.name.replace("_", "-"): _value(f.name, getattr(self, f.name)) for f in fields(self)
        }


_INT = ("clients", "rounds", "local_steps", "batch_size", "rank", "server_rank", "seed",
        "max_train", "max_eval", "max_len", "threads", "min_replies")  # fmt: skip
_FLOAT = ("dirichlet", "lr", "max_residual", "participation", "fraction_evaluate", "timeout",
          "min_fraction")  # fmt: skip
_STR = ("model", "task", "operator", "out", "text_column", "label_column")
_OPTIONAL_STR = ("data_dir", "train_file", "eval_file", "text_pair_column")
_BOOL = ("per_client_init", "resume", "keep_replies")


def _value(name: str, v: Any) -> str | int | float | bool:
    """One setting as a run-config value: lists comma-separated, unset as ``""`` or 0."""
    if name == "faulty":
        return ",".join(f"{p}:{k}" for p, k in v)
    if name == "options":
        return ",".join(f"{k}={x!r}" for k, x in (v or {}).items())
    if name in ("client_ranks", "target_modules", "labels"):
        return ",".join(str(x) for x in v or ())
    if name == "server_rank":
        return int(v or 0)
    if v is None:
        return ""
    assert isinstance(v, str | int | float | bool)
    return v


def _bad(name: str, value: object, why: str) -> NoReturn:
    raise FlowerConfigError(f"run-config key {name.replace('_', '-')!r} = "
                            f"{_value(name, value)!r} {why}")  # fmt: skip


def _parse(name: str, value: object) -> Any:
    """One run-config value as the field's type, or a one-line error naming the key."""
    if name in _INT:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif name in _FLOAT:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok, what = ok and math.isfinite(value), "a finite number"  # type: ignore[arg-type]
    elif name in _BOOL:
        ok, what = isinstance(value, bool), "true or false"
    else:
        ok, what = isinstance(value, str), "a string"
    if not ok:
        raise FlowerConfigError(f"run-config key {name.replace('_', '-')!r} must be {what}, got "
                                f"{value!r} ({type(value).__name__})")  # fmt: skip
    if name in _FLOAT:
        return float(value)  # type: ignore[arg-type]
    if name == "server_rank" or name in _OPTIONAL_STR:
        return value or None
    convert = _CONVERT.get(name)
    return convert(str(value)) if convert else value


def _split(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _ranks(value: str) -> list[int] | None:
    try:
        return [int(x) for x in _split(value)] or None
    except ValueError:
        raise FlowerConfigError(f"run-config key 'client-ranks' must be comma-separated whole "
                                f"numbers, got {value!r}") from None  # fmt: skip


def _faulty(value: str) -> tuple[tuple[int, str], ...]:
    try:
        return tuple((int(p), kind.strip()) for p, kind in (x.split(":") for x in _split(value)))
    except ValueError:
        raise FlowerConfigError(f"run-config key 'faulty' must be comma-separated "
                                f"'partition:kind' pairs, got {value!r}") from None  # fmt: skip


def _options(value: str) -> dict[str, float] | None:
    try:
        return parse_options(value) or None
    except GloraError as err:
        raise FlowerConfigError(f"run-config key 'options' = {value!r} cannot be read: "
                                f"{err.message}") from None  # fmt: skip


_CONVERT: dict[str, Callable[[str], Any]] = {
    "client_ranks": _ranks,
    "faulty": _faulty,
    "options": _options,
    "target_modules": lambda v: _split(v) or None,
    "labels": lambda v: _split(v) or None,
}


__all__ = ["FAULTS", "FlowerConfig", "FlowerConfigError"]
