"""Flower: every registered operator as a Flower strategy, and a Flower app around it.

:mod:`.strategy` (:class:`LoRAStrategy`: sampling, the round, the reply checks),
:mod:`.messages` (the records a round exchanges, decoding and checking replies),
:mod:`.app` (the ServerApp and ClientApp, and a local deployment) configured by
:mod:`.config`. ``integration.flower`` keeps the names the single module had.
"""

from __future__ import annotations

from .messages import (
    MAX_ABS,
    MAX_EXAMPLES,
    EvaluateInstructions,
    RecordError,
    TrainInstructions,
    decode_arrays,
    evaluate_reply,
    factors_to_record,
    read_evaluate_message,
    read_train_message,
    record_to_factors,
    tensors_to_record,
    train_reply,
)
from .strategy import LoRAStrategy, RoundLog

__all__ = [
    "MAX_ABS",
    "MAX_EXAMPLES",
    "EvaluateInstructions",
    "LoRAStrategy",
    "RecordError",
    "RoundLog",
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
