"""peft LoRA adapters <-> per-module factors, and whole-adapter aggregation.

A peft LoRA module holds ``lora_A`` (r x in) and ``lora_B`` (out x r) and adds
``scale * B A`` to the base weight (transposed for ``fan_in_fan_out`` layers such as GPT-2's
Conv1D), with ``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA); r and alpha may vary per
module (``rank_pattern``, ``alpha_pattern``). Here every module becomes
``LoRAFactors(scale * B, A)`` (scale folded, SPEC convention), the operators run on those, and
readouts are written back with the scale unfolded for the rank actually written.

Non-LoRA tensors of an adapter (``modules_to_save`` heads, trainable biases) are averaged as
ordinary FedAvg. Client payloads are read with safetensors and JSON only, never unpickled.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from glora_math import LoRAFactors
from glora_math.errors import GloraError, NonFiniteError

PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")
#: Embedding LoRA (``lora_embedding_A``: r x num_embeddings, ``lora_embedding_B``: dim x r;
#: peft adds ``scale * (B A)^T`` to the embedding matrix).
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.default)?$")


class AdapterError(GloraError):
    """An adapter payload is malformed (missing tensors, inconsistent config, bad files)."""


#: Bounds on client-supplied names and patterns (peft's are short dotted paths).
MAX_NAME = 512
MAX_PATTERN = 256
_QUANTIFIED_GROUP = re.compile(r"(?<!\\)\)[*+?{]")
_UNBOUNDED = re.compile(r"(?<!\\)(?:[*+]|\{\d+,\})")


def check_pattern(key: object, what: str = "pattern", *, client: int | None = None) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that is safe to match against module names.

    peft matches these keys as regular expressions against module names. A client controls
    both, and a pattern such as ``(a+)+`` backtracks for minutes on a crafted name; so a
    key is accepted only if it is at most ``MAX_PATTERN`` characters, compiles, quantifies
    no group (nothing like ``(...)+``, ``(...)*``, ``(...){n}``) and has at most two
    unbounded quantifiers. Every pattern of peft's documentation passes (dotted paths, ``.*``).

    Raises
    ------
    AdapterError
        Naming the client and the key.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_PATTERN:
        raise AdapterError(f"{what} key must be a string of 1..{MAX_PATTERN} characters, got "
                           f"{str(key)[:40]!r}", client=client)  # fmt: skip
    try:
        re.compile(key)
    except re.error as err:
        raise AdapterError(f"{what} key {key[:40]!r} is not a regular expression ({err})",
                           client=client) from None  # fmt: skip
    if _QUANTIFIED_GROUP.search(key) or len(_UNBOUNDED.findall(key)) > 2:
        raise AdapterError(
            f"{what} key {key[:40]!r} could take exponential time to match (a quantified group "
            "or more than two unbounded quantifiers): use a module name or a simple pattern",
            client=client,
        )
    return key


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    r"""Value of the first pattern matching module ``name`` (peft's ``rank_pattern`` rules).

    A pattern matches if it equals the name, is a dotted suffix of it, or is a regular
    expression matching a dotted suffix (``re.match(r"(.*\.)?(pattern)$", name)``). Keys
    that :func:`check_pattern` refuses are matched literally only.
    """
    for key, value in patterns.items():
        if name == key or name.endswith("." + key):
            return value
        try:
            check_pattern(key)
        except AdapterError:
            continue
        if len(name) <= MAX_NAME and re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """LoRA scaling as in peft: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA.

    Raises
    ------
    AdapterError
        If ``r`` is not positive (a rank-0 module has no scale).
    """
    if r < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: factors with the scale folded in, and how to unfold it."""

    name: str
    factors: LoRAFactors
    alpha: float
    fan_in_fan_out: bool
    # An embedding layer's LoRA (lora_embedding_A/B): the product B A is the transpose of the
    # change to the embedding matrix, as for fan_in_fan_out layers.
    embedding: bool = False


@dataclass(frozen=True)
class ClientAdapter:
    """A client's adapter: its LoRA modules (scale folded) and its dense trainable tensors."""

    modules: dict[str, AdapterModule]
    dense: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _config_number(value: object, what: str, client: int | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"adapter config: {what} must be a finite number, got {value!r}",
                           client=client)  # fmt: skip
    return float(value)


def _config_flag(config: Mapping[str, Any], key: str, client: int | None) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise AdapterError(f"adapter config: {key} must be true or false, got {value!r}",
                           client=client)  # fmt: skip
    return value


def _scaling_config(
    config: Mapping[str, Any], client: int | None
) -> tuple[bool, float, dict[str, float], bool]:
    """``(use_rslora, lora_alpha, alpha_pattern, fan_in_fan_out)`` of an untrusted config.

    Raises
    ------
    AdapterError
        Naming the client and the key, if a value has the wrong type or is not finite.
    """
    if not isinstance(config, Mapping):
        raise AdapterError(f"adapter config must be a mapping, got {type(config).__name__}",
                           client=client)  # fmt: skip
    # peft's LoraConfig defaults lora_alpha to 8 (not to r).
    alpha0 = _config_number(config.get("lora_alpha", 8), "lora_alpha", client)
    raw = config.get("alpha_pattern") or {}
    if not isinstance(raw, Mapping):
        raise AdapterError(f"adapter config: alpha_pattern must be a mapping, got {raw!r}"[:200],
                           client=client)  # fmt: skip
    pattern = {
        check_pattern(k, "alpha_pattern", client=client): _config_number(
            v, f"alpha_pattern[{str(k)[:40]!r}]", client
        )
        for k, v in raw.items()
    }
    return (_config_flag(config, "use_rslora", client), alpha0, pattern,
            _config_flag(config, "fan_in_fan_out", client))  # fmt: skip


def config_dict(config: object, *, client: int | None = None) -> dict[str, Any]:
    """A LoRA config as a plain dict: a mapping, or a peft ``LoraConfig`` (``to_dict()``)."""
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        out = to_dict()
        if isinstance(out, Mapping):
            return dict(out)
    raise AdapterError(
        f"adapter config must be a mapping or a peft LoraConfig, got {type(config).__name__}",
        client=client,
    )


def adapter_from_state_dict(
    state: Mapping[str, Tensor], config: Mapping[str, Any] | Any, *, client: int | None = None
) -> ClientAdapter:
    """Read a peft LoRA state dict (``get_peft_model_state_dict`` keys) into folded factors.

    ``config`` is the adapter's config: a dict (``adapter_config.json``) or a ``LoraConfig``.
    Everything in both is untrusted: the config's ``r``/``rank_pattern`` must match the
    tensors' ranks, ``lora_alpha`` defaults to 8 as in peft, pattern keys must be safe to
    match (:func:`check_pattern`), tensors must be real and finite.

    Raises
    ------
    AdapterError
        Naming the client and the module: a module with only one of lora_A / lora_B, inner
        dimensions that disagree, a rank the config does not state, a rank-0 module,
        non-float LoRA factors, complex or boolean tensors, or a scaling entry of the config
        (``lora_alpha``, ``alpha_pattern``, ``use_rslora``, ``fan_in_fan_out``) of the wrong
        type.
    NonFiniteError
        If a tensor has NaN/Inf entries.
    """
    config = config_dict(config, client=client)
    kind = getattr(config.get("peft_type"), "value", config.get("peft_type")) or "LORA"
    if str(kind).upper() != "LORA":
        raise AdapterError(f"peft_type {kind!r} is not LoRA; only LoRA adapters are aggregated",
                           client=client)  # fmt: skip
    _refuse_dora(config, state, client)
    use_rslora, alpha0, alpha_pattern, fan = _scaling_config(config, client)
    ranks = _rank_config(config, client)
    pairs: dict[str, dict[str, Tensor]] = defaultdict(dict)
    dense: dict[str, Tensor] = {}
    if not isinstance(state, Mapping):
        raise AdapterError(f"state dict must be a mapping, got {type(state).__name__}",
                           client=client)  # fmt: skip
    embeddings: set[str] = set()
    for key, value in state.items():
        _check_entry(key, value, client)
        m = _LORA.match(key) or _EMBEDDING.match(key)
        if m:
            pairs[m["module"].removeprefix(PREFIX)][m["which"]] = value
            if m.re is _EMBEDDING:
                embeddings.add(m["module"].removeprefix(PREFIX))
        else:
            dense[key.removeprefix(PREFIX)] = value
    if not pairs:
        raise AdapterError(
            "no LoRA modules in the state dict (no lora_A / lora_B, or lora_embedding_A / "
            "lora_embedding_B, tensors)",
            client=client,
        )
    modules = {}
    for name, ab in sorted(pairs.items()):
        A, B = _module_pair(name, ab, ranks, client)
        alpha = float(pattern_value(alpha_pattern, name, alpha0))
        s = lora_scale(int(A.shape[0]), alpha, use_rslora)
        emb = name in embeddings
        modules[name] = AdapterModule(name, LoRAFactors(B * s, A), alpha, fan or emb, emb)
    return ClientAdapter(modules, dense, dict(config))


def _refuse_dora(config: Mapping[str, Any], state: object, client: int | None) -> None:
    """DoRA adapters are refused: their update is not the low-rank product aggregated here."""
    magnitude = isinstance(state, Mapping) and any(
        isinstance(k, str) and "lora_magnitude_vector" in k for k in state
    )
    if config.get("use_dora") is True or magnitude:
        raise AdapterError(
            "DoRA adapter (use_dora: a learned magnitude rescales every column of W + B A, so "
            "the update is not the low-rank product B A the operators aggregate, and averaging "
            "the magnitudes is not the mean update): train with use_dora=False to aggregate "
            "with glora-math",
            client=client,
        )


def _check_entry(key: object, value: object, client: int | None) -> None:
    """One state-dict entry: a bounded name and a real, finite tensor."""
    if not isinstance(key, str) or len(key) > MAX_NAME + 64:
        raise AdapterError(f"state-dict key must be a name of at most {MAX_NAME} "
                           f"characters, got {str(key)[:40]!r}", client=client)  # fmt: skip
    if not isinstance(value, Tensor):
        raise AdapterError(f"tensor {key!r} is a {type(value).__name__}, not a tensor",
                           client=client)  # fmt: skip
    if value.is_complex() or value.is_meta or value.dtype == torch.bool:
        raise AdapterError(f"tensor {key!r} has dtype {value.dtype} (expected real numbers)",
                           client=client)  # fmt: skip
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise NonFiniteError(f"tensor {key!r} has NaN/Inf entries", client=client)


def _module_pair(
    name: str,
    ab: Mapping[str, Tensor],
    ranks: tuple[int, dict[str, int]] | None,
    client: int | None,
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of one module, checked against each other and against the config's rank."""
    if set(ab) != {"A", "B"}:
        raise AdapterError(
            f"has lora_{next(iter(ab))} but not its partner", client=client, module=name
        )
    A, B = ab["A"], ab["B"]
    if not (A.is_floating_point() and B.is_floating_point()):
        raise AdapterError(f"lora_A ({A.dtype}) and lora_B ({B.dtype}) must be floating "
                           "point", client=client, module=name)  # fmt: skip
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise AdapterError(
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not match",
            client=client,
            module=name,
        )
    r = int(A.shape[0])
    if r < 1:
        raise AdapterError("rank-0 LoRA module (no directions)", client=client, module=name)
    if ranks is not None:
        want = pattern_value(ranks[1], name, ranks[0])
        if want != r:
            raise AdapterError(
                f"the config says rank {want} (r / rank_pattern), the tensors have rank {r}",
                client=client,
                module=name,
            )
    return A, B


def _rank_config(
    config: Mapping[str, Any], client: int | None
) -> tuple[int, dict[str, int]] | None:
    """``(r, rank_pattern)`` of an untrusted config, or None if it states no rank."""
    if "r" not in config:
        return None
    r0 = config["r"]
    if isinstance(r0, bool) or not isinstance(r0, int) or r0 < 1:
        raise AdapterError(f"adapter config: r must be a positive integer, got {r0!r}"[:200],
                           client=client)  # fmt: skip
    raw = config.get("rank_pattern") or {}
    if not isinstance(raw, Mapping):
        raise AdapterError(f"adapter config: rank_pattern must be a mapping, got {raw!r}"[:200],
                           client=client)  # fmt: skip
    pattern = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AdapterError(f"adapter config: rank_pattern[{str(k)[:40]!r}] must be a "
                               f"positive integer, got {v!r}"[:200], client=client)  # fmt: skip
        pattern[check_pattern(k, "rank_pattern", client=client)] = v
    return r0, pattern


def load_adapter(path: str | Path, *, client: int | None = None) -> ClientAdapter:
    """Load a saved peft adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``).

    Only safetensors and JSON are read: an untrusted payload is never unpickled.
    """
    folder = Path(path)
    weights = folder / "adapter_model.safetensors"
    cfg = folder / "adapter_config.json"
    if not folder.exists():
        raise AdapterError(f"{folder}: no such adapter folder", client=client)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder (pass a peft adapter folder)", client=client)
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():
        raise AdapterError(
            f"{folder} holds adapter_model.bin, a pickle, which is never loaded here; re-save "
            "it with save_pretrained(..., safe_serialization=True)",
            client=client,
        )
    if not weights.is_file() or not cfg.is_file():
        raise AdapterError(
            f"{folder} lacks adapter_model.safetensors or adapter_config.json", client=client
        )
    try:
        config = json.loads(cfg.read_text())
        state = load_file(str(weights))
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as err:
        raise AdapterError(f"cannot read adapter at {folder}: {err}"[:300], client=client) from None
    except Exception as err:  # safetensors' own SafetensorError on a truncated or bad file
        raise AdapterError(
            f"cannot read adapter at {folder}: {type(err).__name__}: {err}"[:300], client=client
        ) from None
    kind = config.get("peft_type", "LORA") if isinstance(config, dict) else "LORA"
    if str(kind).upper() != "LORA":
        raise AdapterError(
            f"{folder}: peft_type {kind!r} is not LoRA; only LoRA adapters are aggregated",
            client=client,
        )
    return adapter_from_state_dict(state, config, client=client)


def adapter_state_dict(
    modules: Mapping[str, LoRAFactors],
    dense: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    embeddings: Collection[str] = (),
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Folded factors -> a peft LoRA state dict and config, unfolding each module's scale.

    The written config keeps ``lora_alpha``/``alpha_pattern``/``use_rslora`` and records each
    module's rank in ``rank_pattern`` (the most common rank becomes ``r``), so that
    ``scale(r_written) * B A`` equals the folded product. A module whose update is zero
    (rank 0) is written at rank 1 with zero factors.
    """
    use_rslora, alpha0, alpha_pattern, _ = _scaling_config(config, None)
    # A zero update (rank 0: e.g. every client still at peft's B = 0 init) is written at rank 1
    # with zero factors: peft adapters have rank >= 1, and the product is the same zero.
    modules = {name: f if f.rank > 0 else _zero_rank_one(f) for name, f in modules.items()}
    ranks = {name: f.rank for name, f in modules.items()}
    counts: dict[int, int] = defaultdict(int)
    for r in ranks.values():
        counts[r] += 1
    r0 = max(counts, key=lambda r: (counts[r], r)) if counts else int(config.get("r", 8))
    state: dict[str, Tensor] = {}
    for name, f in modules.items():
        s = lora_scale(f.rank, float(pattern_value(alpha_pattern, name, alpha0)), use_rslora)
        if not (math.isfinite(s) and s > 0):
            raise AdapterError(f"LoRA scale {s} (lora_alpha / r) cannot be unfolded", module=name)
        B = f.B / s
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(f.A).all())):
            raise NonFiniteError(
                f"unfolding the scale {s:.3g} gives Inf/NaN in lora_B (dtype {B.dtype})",
                module=name,
            )
        if name in embeddings:
            state[f"{PREFIX}{name}.lora_embedding_A"] = f.A.contiguous()
            state[f"{PREFIX}{name}.lora_embedding_B"] = B.contiguous()
        else:
            state[f"{PREFIX}{name}.lora_A.weight"] = f.A.contiguous()
            state[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous()
    for key, value in dense.items():
        state[f"{PREFIX}{key}"] = value.contiguous()
    out = dict(config)
    out["r"] = r0
    out["rank_pattern"] = {name: r for name, r in ranks.items() if r != r0}
    return state, out


def _zero_rank_one(f: LoRAFactors) -> LoRAFactors:
    return LoRAFactors(f.B.new_zeros(f.B.shape[0], 1), f.A.new_zeros(1, f.A.shape[1]))


def save_adapter(
    path: str | Path,
    modules: Mapping[str, LoRAFactors],
    dense: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    embeddings: Collection[str] = (),
) -> None:
    """Write folded factors as a peft adapter folder (``PeftModel.from_pretrained`` loads it).

    ``embeddings``: the modules that are embedding layers (written as ``lora_embedding_A/B``).
    """
    state, cfg = adapter_state_dict(modules, dense, config, embeddings=embeddings)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(cfg, indent=2, sort_keys=True, default=_jsonable)
    )


class OutputError(GloraError):
    """An output folder that cannot be written (the reason in the message).

    Not empty (without ``overwrite``), a file, or a path the operating system refuses.
    """


def check_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """``out`` as a folder :func:`write_folder` may write, checked before any work is done."""
    folder = Path(out)
    try:
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder} is a file, not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise OutputError(f"{folder} is not an empty folder (pass overwrite=True, or "
                              "--overwrite, to replace it)")  # fmt: skip
    except OSError as err:
        raise OutputError(f"{folder}: {err.strerror or err}") from None
    return folder


def write_folder(
    out: str | Path, write: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Write a whole output folder at once: ``write`` fills a fresh sibling that replaces ``out``.

    ``out`` must be new or an empty folder unless ``overwrite`` (then its old contents go: no
    stale file of an earlier round survives). A failure leaves ``out`` as it was.

    Raises
    ------
    OutputError
        If ``out`` is a file, a non-empty folder without ``overwrite``, or cannot be written.
    """
    folder = check_output(out, overwrite=overwrite)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as err:
        raise OutputError(f"{folder}: {err.strerror or err}") from None
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as err:
        raise OutputError(f"{folder}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _jsonable(value: object) -> object:
    """JSON for the values peft's ``LoraConfig.to_dict()`` may hold (sets, enums)."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} to adapter_config.json")


__all__ = [
    "PREFIX",
    "AdapterError",
    "AdapterModule",
    "ClientAdapter",
    "OutputError",
    "adapter_from_state_dict",
    "adapter_state_dict",
    "check_output",
    "check_pattern",
    "config_dict",
    "load_adapter",
    "lora_scale",
    "pattern_value",
    "save_adapter",
    "write_folder",
]
