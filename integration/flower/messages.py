"""The records a Flower round exchanges, and the checks every untrusted reply passes.

Encoding and decoding of factors and tensors (numpy arrays, ``allow_pickle=False``), the
train and evaluate instructions a client reads, the replies it builds, and the decoding of a
train reply into a :class:`~glora_math.integration.peft.io.ClientAdapter` with every check of
the trust boundary (see :mod:`.strategy` for the record layout).

Record layout (keys of the ``RecordDict``):

server -> client, train
    ``"init"``: the client's folded factors (``"<module>.B"``, ``"<module>.A"``), empty for a
    fresh LoRA start; ``"base"``: dense folds accumulated into base weights (``"<module>"``,
    FedEx-LoRA residuals, FLoRA merges); ``"dense"``: ``modules_to_save`` tensors;
    ``"config"``: ``server-round``, ``freeze-a``/``freeze-b`` (the factor the operator keeps
    frozen and shared this round: FFA-LoRA's A, RoLoRA's A then B). :func:`read_train_message`
    decodes it.
client -> server, train
    ``"adapter"``: the peft LoRA state dict (``get_peft_model_state_dict``); ``"lora"``: its
    ``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out`` (and ``rank_pattern`` /
    ``alpha_pattern`` as JSON strings); ``"metrics"``: ``num-examples``, ``train-loss`` and,
    optionally, ``partition-id``. :func:`train_reply` builds it.
server -> client, evaluate
    ``"update"``: the global low-rank update, ``"base"``, ``"dense"``; the client merges them.
    :func:`read_evaluate_message` decodes it.
client -> server, evaluate
    ``"metrics"``: ``num-examples``, ``accuracy``, ``eval-loss`` (and ``partition-id``).
    :func:`evaluate_reply` builds it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from torch import Tensor

from glora_math import GloraError, LoRAFactors

from ..peft.io import (
    ClientAdapter,
    adapter_from_state_dict,
    config_dict,
    pattern_value,
)

#: Default bound on a reply's ``num-examples`` (a weight above it is not a sample count).
MAX_EXAMPLES = 1e12
#: Default bound on the absolute value of any entry a reply carries (folded scale included).
#: LoRA factors and heads of a sane run are O(1); the bound keeps every product of the round
#: finite in float32.
MAX_ABS = 1e6
_NUMPY = "numpy.ndarray"
_Metric = int | float | list[int] | list[float]
_LORA_KEYS = ("r", "lora_alpha", "use_rslora", "fan_in_fan_out")
_PATTERNS = ("rank_pattern", "alpha_pattern")


class RecordError(GloraError):
    """A Flower message breaks the record protocol (a missing or mistyped record, a bad value)."""


def _clip(text: object, limit: int = 300) -> str:
    """A client-supplied text made safe for one log line (printable, at most ``limit`` chars)."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _reason(err: BaseException) -> str:
    """An exception as a rejection reason (without the ``client ...:`` prefix we log anyway)."""
    if isinstance(err, GloraError):
        where = f"module {err.module!r}: " if err.module is not None else ""
        return _clip(where + err.message)
    return _clip(f"{type(err).__name__}: {err}")


# ----------------------------------------------------------------------------------------------
# Record conversion (pure functions)


def factors_to_record(factors: Mapping[str, LoRAFactors]) -> ArrayRecord:
    """``{"<module>.B": B, "<module>.A": A}`` for every module (float32, contiguous)."""
    out: dict[str, Tensor] = {}
    for name, f in factors.items():
        out[f"{name}.B"] = f.B.detach().to("cpu", torch.float32).contiguous()
        out[f"{name}.A"] = f.A.detach().to("cpu", torch.float32).contiguous()
    return ArrayRecord(out)


def record_to_factors(record: ArrayRecord) -> dict[str, LoRAFactors]:
    """Inverse of :func:`factors_to_record` (float64 factors).

    Raises
    ------
    RecordError
        If an array is not a finite float array or a module lacks its ``.B`` or ``.A``.
    """
    return _factors(decode_arrays(record, what="factor"))


def _factors(sd: Mapping[str, Tensor], client: int | None = None) -> dict[str, LoRAFactors]:
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        name, _, which = key.rpartition(".")
        if which not in ("A", "B") or not name:
            raise RecordError(f"factor key {key!r} is not '<module>.B' or '<module>.A'",
                              client=client)  # fmt: skip
        pairs.setdefault(name, {})[which] = value
    out = {}
    for name in sorted(pairs):
        ab = pairs[name]
        if set(ab) != {"A", "B"}:
            raise RecordError("has only one of the factors B, A", client=client, module=name)
        try:
            out[name] = LoRAFactors(ab["B"], ab["A"])
        except Exception as err:  # LoRAFactors validates shapes
            raise RecordError(_reason(err), client=client, module=name) from None
    return out


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Dense tensors as a float32 ArrayRecord."""
    return ArrayRecord(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    )


def decode_arrays(
    record: ArrayRecord,
    *,
    what: str = "array",
    client: int | None = None,
    max_abs: float = math.inf,
) -> dict[str, Tensor]:
    """The arrays of an untrusted ArrayRecord as float64 tensors, or a :class:`RecordError`.

    Every entry must be a numpy-serialised (``allow_pickle=False``), non-empty float16/32/64
    array whose payload matches its declared dtype and shape, with finite entries of absolute
    value at most ``max_abs``. Object, unicode, integer and complex arrays are refused (a
    complex array is never cast to real), and so are garbage bytes and other serialisation
    types.
    """
    out: dict[str, Tensor] = {}
    for key in list(record.keys()):
        arr = record[key]
        label = f"{what} {_clip(key, 120)!r}"
        if not isinstance(arr, Array):
            raise RecordError(f"{label} is a {type(arr).__name__}, not an Array", client=client)
        if arr.stype != _NUMPY:
            raise RecordError(f"{label} has serialisation type {_clip(arr.stype, 60)!r}, "
                              f"not {_NUMPY!r}", client=client)  # fmt: skip
        try:
            nd = arr.numpy()  # np.load(..., allow_pickle=False)
        except Exception as err:  # garbage bytes, object arrays, truncated payloads, ...
            raise RecordError(
                f"{label} cannot be decoded ({_reason(err)})", client=client
            ) from None
        if not isinstance(nd, np.ndarray):
            raise RecordError(f"{label} does not decode to an array", client=client)
        if nd.dtype.kind != "f" or nd.dtype.itemsize not in (2, 4, 8):
            raise RecordError(f"{label} has dtype {nd.dtype.str!r}; only float16, float32 and "
                              "float64 arrays are accepted", client=client)  # fmt: skip
        try:
            declared = np.dtype(arr.dtype)
        except Exception:
            declared = None
        if declared != nd.dtype or tuple(arr.shape) != tuple(nd.shape):
            raise RecordError(f"{label} declares dtype {_clip(arr.dtype, 40)!r} and shape "
                              f"{_clip(tuple(arr.shape), 60)} but holds {nd.dtype.str} "
                              f"{tuple(nd.shape)}", client=client)  # fmt: skip
        if nd.size == 0:
            raise RecordError(f"{label} is empty (shape {tuple(nd.shape)}): rank-0 factors and "
                              "empty tensors are not accepted", client=client)  # fmt: skip
        values = nd.astype(np.float64)
        if not bool(np.isfinite(values).all()):
            raise RecordError(f"tensor {_clip(key, 120)!r} has NaN/Inf entries", client=client)
        peak = float(np.abs(values).max())
        if peak > max_abs:
            raise RecordError(f"{label} has entries up to {peak:.3g} in absolute value, above "
                              f"the bound {max_abs:g}", client=client)  # fmt: skip
        out[key] = torch.from_numpy(np.ascontiguousarray(values))
    return out


# ----------------------------------------------------------------------------------------------
# Client side: what a ClientApp reads and sends


@dataclass(frozen=True)
class TrainInstructions:
    """What the server sends a client for one round of local training.

    ``init``: the factors to start from (folded scale, float64), or None for a fresh LoRA
    start; ``base``: dense ``out x in`` folds to add to the base weights before training;
    ``dense``: the ``modules_to_save`` tensors; ``freeze_a`` / ``freeze_b``: keep every
    ``lora_A`` / ``lora_B`` fixed this round (FFA-LoRA; RoLoRA alternates); ``config``: the
    whole config record.
    """

    init: dict[str, LoRAFactors] | None
    base: dict[str, Tensor]
    dense: dict[str, Tensor]
    server_round: int
    freeze_a: bool
    freeze_b: bool
    config: dict[str, Any]


@dataclass(frozen=True)
class EvaluateInstructions:
    """What the server sends a client to evaluate the global model.

    ``update``: the global low-rank update per module (folded scale); ``base`` and ``dense`` as
    in :class:`TrainInstructions`. :meth:`deltas` gives the dense change of each module.
    """

    update: dict[str, LoRAFactors]
    base: dict[str, Tensor]
    dense: dict[str, Tensor]
    server_round: int
    config: dict[str, Any]

    def deltas(self) -> dict[str, Tensor]:
        """Per module, the dense ``out x in`` change of the base: folds plus the update."""
        out = {name: f.detach().clone() for name, f in self.base.items()}
        for name, f in self.update.items():
            out[name] = out[name] + f.delta() if name in out else f.delta()
        return out


def _content(message: Message | RecordDict) -> RecordDict:
    if isinstance(message, RecordDict):
        return message
    if message.has_error():
        raise RecordError(f"the message carries an error: {_clip(message.error.reason)}")
    return message.content


def _array_record(content: RecordDict, key: str) -> ArrayRecord:
    rec = content.get(key)
    if not isinstance(rec, ArrayRecord):
        raise RecordError(f"the server message has no ArrayRecord {key!r}")
    return rec


def _server_config(content: RecordDict) -> tuple[dict[str, Any], int]:
    rec = content.get("config")
    if not isinstance(rec, ConfigRecord):
        raise RecordError("the server message has no ConfigRecord 'config'")
    conf = dict(rec)
    rnd = conf.get("server-round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        raise RecordError(f"the server message has no positive 'server-round' (got {rnd!r})")
    return conf, rnd


def read_train_message(message: Message | RecordDict) -> TrainInstructions:
    """Decode the server's train message (see the module's record layout).

    Raises
    ------
    RecordError
        If a record is missing or an array is not a finite float array.
    """
    content = _content(message)
    conf, rnd = _server_config(content)
    init = record_to_factors(_array_record(content, "init"))
    return TrainInstructions(
        init=init or None,
        base=decode_arrays(_array_record(content, "base"), what="base fold"),
        dense=decode_arrays(_array_record(content, "dense"), what="dense tensor"),
        server_round=rnd,
        freeze_a=conf.get("freeze-a") is True,
        freeze_b=conf.get("freeze-b") is True,
        config=conf,
    )


def read_evaluate_message(message: Message | RecordDict) -> EvaluateInstructions:
    """Decode the server's evaluate message (see the module's record layout).

    Raises
    ------
    RecordError
        If a record is missing or an array is not a finite float array.
    """
    content = _content(message)
    conf, rnd = _server_config(content)
    return EvaluateInstructions(
        update=record_to_factors(_array_record(content, "update")),
        base=decode_arrays(_array_record(content, "base"), what="base fold"),
        dense=decode_arrays(_array_record(content, "dense"), what="dense tensor"),
        server_round=rnd,
        config=conf,
    )


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RecordError(f"{what} must be a positive whole number, got {value!r}")
    return value


def _partition_metric(partition: int | None) -> dict[str, int]:
    if partition is None:
        return {}
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise RecordError(f"partition must be a non-negative whole number, got {partition!r}")
    return {"partition-id": partition}


def train_reply(
    state_dict: Mapping[str, Tensor],
    lora_config: Any,
    *,
    num_examples: int,
    train_loss: float | None = None,
    partition: int | None = None,
) -> RecordDict:
    """The reply to a train message: a peft adapter, its LoRA config and the metrics.

    ``state_dict``: ``get_peft_model_state_dict(model)`` (LoRA factors and ``modules_to_save``
    tensors; floating tensors are sent as float32). ``lora_config``: the ``LoraConfig`` (or
    its dict); ``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out`` and non-empty
    ``rank_pattern``/``alpha_pattern`` are sent. ``partition`` names the client's data
    partition in the server's reports.
    """
    conf = config_dict(lora_config)
    lora: dict[str, Any] = {}
    r = conf.get("r")
    if isinstance(r, int) and not isinstance(r, bool):
        lora["r"] = r
    if isinstance(conf.get("lora_alpha"), int | float):
        lora["lora_alpha"] = float(conf["lora_alpha"])
    lora["use_rslora"] = bool(conf.get("use_rslora", False))
    lora["fan_in_fan_out"] = bool(conf.get("fan_in_fan_out", False))
    for key in _PATTERNS:
        if conf.get(key):
            lora[key] = json.dumps(dict(conf[key]), sort_keys=True)
    arrays = {
        k: (
            v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        ).contiguous()
        for k, v in state_dict.items()
    }
    metrics: dict[str, _Metric] = {"num-examples": _count(num_examples, "num_examples")}
    if train_loss is not None:
        metrics["train-loss"] = float(train_loss)
    metrics.update(_partition_metric(partition))
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {
        "adapter": ArrayRecord(arrays),
        "lora": ConfigRecord(lora),
        "metrics": MetricRecord(metrics),
    }
    return RecordDict(records)


def evaluate_reply(
    *, num_examples: int, accuracy: float, eval_loss: float, partition: int | None = None
) -> RecordDict:
    """The reply to an evaluate message: ``num-examples``, ``accuracy``, ``eval-loss``."""
    metrics: dict[str, _Metric] = {
        "num-examples": _count(num_examples, "num_examples"),
        "accuracy": float(accuracy),
        "eval-loss": float(eval_loss),
        **_partition_metric(partition),
    }
    return RecordDict({"metrics": MetricRecord(metrics)})


# ----------------------------------------------------------------------------------------------
# Server side: decoding untrusted replies


@dataclass
class _Reply:
    """One decoded, checked train reply."""

    node: int
    adapter: ClientAdapter
    weight: float
    loss: float | None

    def ranks(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((n, m.factors.rank) for n, m in self.adapter.modules.items()))

    def top_rank(self) -> int:
        return max((m.factors.rank for m in self.adapter.modules.values()), default=0)


def _partition_of(msg: Message) -> int | None:
    """The partition a reply names in its metrics (best effort: None if absent or odd)."""
    try:
        if msg.has_error():
            return None
        metrics = msg.content.get("metrics")
        value = metrics.get("partition-id") if isinstance(metrics, MetricRecord) else None
    except Exception:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _weight(metrics: MetricRecord, node: int, limit: float) -> float:
    value = metrics.get("num-examples")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= limit
    ):
        raise RecordError(f"reply has no 'num-examples' in (0, {limit:g}] (got "
                          f"{_clip(repr(value), 60)})", client=node)  # fmt: skip
    return float(value)


def _lora_config(record: ConfigRecord, node: int) -> dict[str, Any]:
    """The LoRA config a reply sends, checked key by key (unknown keys are dropped)."""
    conf: dict[str, Any] = {k: record[k] for k in _LORA_KEYS if k in record}
    r = conf.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise RecordError(f"adapter config: r must be a positive whole number, got {r!r}",
                          client=node)  # fmt: skip
    for key in _PATTERNS:
        if key not in record:
            continue
        raw = record[key]
        try:
            value = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            value = None
        if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        ):
            raise RecordError(f"adapter config: {key} must be a JSON object of numbers",
                              client=node)  # fmt: skip
        conf[key] = value
    return conf


def _decode_train_reply(msg: Message, node: int, *, max_examples: float, max_abs: float) -> _Reply:
    """A train reply as a checked client adapter with its weight, or a GloraError."""
    if msg.has_error():
        raise RecordError(f"client error: {_clip(msg.error.reason)}", client=node)
    content = msg.content
    for key, kind in (("adapter", ArrayRecord), ("lora", ConfigRecord), ("metrics", MetricRecord)):
        if not isinstance(content.get(key), kind):
            raise RecordError(f"reply has no {kind.__name__} {key!r}", client=node)
    metrics, lora, arrays = content["metrics"], content["lora"], content["adapter"]
    assert isinstance(metrics, MetricRecord)
    assert isinstance(lora, ConfigRecord)
    assert isinstance(arrays, ArrayRecord)
    weight = _weight(metrics, node, max_examples)
    loss = metrics.get("train-loss")
    finite_loss = (
        float(loss)
        if isinstance(loss, int | float) and not isinstance(loss, bool) and math.isfinite(loss)
        else None
    )
    state = decode_arrays(arrays, what="adapter tensor", client=node, max_abs=max_abs)
    config = _lora_config(lora, node)
    adapter = adapter_from_state_dict(state, config, client=node)
    if not adapter.modules:
        raise RecordError("reply has no LoRA modules", client=node)
    r, pattern = config.get("r"), config.get("rank_pattern") or {}
    for name, m in adapter.modules.items():
        want = pattern_value(pattern, name, r)
        if isinstance(want, int) and m.factors.rank != want:
            raise RecordError(f"factors have rank {m.factors.rank}, config says r={want}",
                              client=node, module=name)  # fmt: skip
        peak = max(float(m.factors.B.abs().max()), float(m.factors.A.abs().max()))
        if not math.isfinite(peak) or peak > max_abs:
            raise RecordError(f"scaled factors reach {peak:.3g}, above the bound {max_abs:g} "
                              "(lora_alpha too large?)", client=node, module=name)  # fmt: skip
    return _Reply(node, adapter, weight, finite_loss)


def _majority(keys: Mapping[int, Any]) -> Any | None:
    """The value held by more than half of the nodes, or None (order-independent)."""
    if not keys:
        return None
    value, count = Counter(keys.values()).most_common(1)[0]
    return value if 2 * count > len(keys) else None


def _finite(tensors: Iterable[Tensor | None]) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------------------------
# The strategy


__all__ = [
    "MAX_ABS",
    "MAX_EXAMPLES",
    "EvaluateInstructions",
    "RecordError",
    "TrainInstructions",
    "decode_arrays",
    "evaluate_reply",
    "factors_to_record",
    "read_evaluate_message",
    "read_train_message",
    "record_to_factors",
    "tensors_to_record",
    "train_reply",
]
