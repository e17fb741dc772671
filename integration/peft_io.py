"""The old name of :mod:`integration.peft`: every public name of its two modules.

Kept for existing imports; :mod:`.peft.io` reads and writes adapters, :mod:`.peft.aggregate`
aggregates them.
"""

from __future__ import annotations

from .peft.aggregate import (
    AdapterRound,
    ClientLike,
    ModuleSets,
    aggregate_adapters,
    aggregate_peft,
    as_adapter,
    fedavg_dense,
    module_holders,
)
from .peft.io import (
    PREFIX,
    AdapterError,
    AdapterModule,
    ClientAdapter,
    OutputError,
    adapter_from_state_dict,
    adapter_state_dict,
    check_pattern,
    config_dict,
    load_adapter,
    lora_scale,
    pattern_value,
    save_adapter,
    write_folder,
)

__all__ = [
    "PREFIX",
    "AdapterError",
    "AdapterModule",
    "AdapterRound",
    "ClientAdapter",
    "ClientLike",
    "ModuleSets",
    "OutputError",
    "adapter_from_state_dict",
    "adapter_state_dict",
    "aggregate_adapters",
    "aggregate_peft",
    "as_adapter",
    "check_pattern",
    "config_dict",
    "fedavg_dense",
    "load_adapter",
    "lora_scale",
    "module_holders",
    "pattern_value",
    "save_adapter",
    "write_folder",
]
