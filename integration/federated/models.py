"""Hugging Face and peft helpers shared by the runner, the causal-LM path and the Flower app.

Model loading (the packaged MiniLM, tiny random configs for tests, any local HF path), LoRA
configurations and the one shared initial adapter, tokenisation once per text, local training,
merged evaluation models and classification metrics. Nothing here knows about a federated
round: :mod:`integration.simulate` and :mod:`integration.flower_app` drive these.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from peft import LoraConfig, set_peft_model_state_dict
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.utils import logging as hf_logging

from glora_math import LoRAFactors

from ..data import Examples
from ..peft.io import PREFIX, AdapterError, adapter_state_dict
from .settings import ModelNotInstalledError, downloads_allowed, minilm_path

# peft 0.21 calls a transformers 5 API that transformers deprecates: not the user's to fix, so
# not printed on every model load (the same filter as the test configuration's).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def missing_targets(model: torch.nn.Module, targets: Sequence[str]) -> str | None:
    """Which LoRA target modules match no layer of ``model`` (peft's suffix rule), or None.

    The message lists the model's linear layer names to choose from.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return None
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return (f"target modules {missing} match no linear layer of the model; its linear layers "
            f"are named {', '.join(leaves[:12])}{' ...' if len(leaves) > 12 else ''}")  # fmt: skip


def build_model(
    name: str, num_labels: int, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any HF model path (offline), the packaged MiniLM, or a tiny random RoBERTa."""
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # expected init notices
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # its load report
    torch.manual_seed(seed)
    if name == "tiny-roberta":
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
        cfg = RobertaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=130,
            pad_token_id=tok.pad_token_id,
        )
        cfg.num_labels = num_labels
        return RobertaForSequenceClassification(cfg), tok
    path = str(minilm_path()) if name == "minilm" else name
    local = not downloads_allowed()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=local
    )
    return model, tok


def seed_for(*parts: int) -> int:
    """A seed derived from integers (run seed, round, client, purpose): no hidden RNG state."""
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (x + 0x9E3779B9)) * 1099511628211) % (2**61 - 1)
    return h


def lora_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each LoRA-adapted module of a peft model, by name."""
    out = {}
    for name, mod in model.named_modules():
        lora_a, lora_b = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if (
            isinstance(lora_a, torch.nn.ModuleDict)
            and isinstance(lora_b, torch.nn.ModuleDict)
            and "default" in lora_a
        ):
            a_w, b_w = lora_a["default"].weight, lora_b["default"].weight
            if isinstance(a_w, Tensor) and isinstance(b_w, Tensor):
                out[name.removeprefix(PREFIX)] = (int(b_w.shape[0]), int(a_w.shape[1]))
    return out


def shared_lora_init(
    shapes: Mapping[str, tuple[int, int]], rank: int, *, seed: int, round_index: int
) -> dict[str, Tensor]:
    """One server-drawn LoRA ``A`` per module (``rank`` x in_features, float32).

    peft's default init of ``lora_A`` (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(k),
    1/sqrt(k))), drawn from a generator seeded by (``seed``, ``round_index``) only, in sorted
    module order. Draw it at the largest client rank: a client of rank r takes the first r rows
    (:func:`fresh_factors`), so all clients start from parts of one init.
    """
    g = torch.Generator().manual_seed(seed_for(seed, round_index, 5))
    out = {}
    for name in sorted(shapes):
        k = shapes[name][1]
        bound = 1.0 / math.sqrt(k)
        out[name] = (torch.rand(rank, k, generator=g) * 2.0 - 1.0) * bound
    return out


def fresh_factors(
    shapes: Mapping[str, tuple[int, int]], init: Mapping[str, Tensor], r: int
) -> dict[str, LoRAFactors]:
    """The rank-``r`` part of a shared init: ``B = 0`` (d x r), ``A`` = first r rows."""
    out = {}
    for name, (d, _) in shapes.items():
        A = init[name]
        if A.shape[0] < r:
            raise ValueError(f"shared init has rank {A.shape[0]} < client rank {r} ({name})")
        out[name] = LoRAFactors(torch.zeros(d, r, dtype=A.dtype), A[:r].clone())
    return out


def start_client(
    model: torch.nn.Module,
    rank: int,
    *,
    init: Mapping[str, LoRAFactors] | None,
    dense: Mapping[str, Tensor],
    client: int,
    seed: int,
    round_index: int,
    top_rank: int,
    freeze_a: bool = False,
    per_client_init: bool = False,
) -> None:
    """Load what a client starts local training from into its peft model (in place).

    ``init``: the factors the server sent (:meth:`integration.server.FederatedServer.start_for`);
    if empty or None, a fresh LoRA start: the rank-``rank`` part of the round's one shared,
    server-drawn initial adapter of rank ``top_rank`` (FFA-LoRA, ``freeze_a``: round 0's, so
    A stays the same frozen matrix), or with ``per_client_init`` peft's own draw of A per
    client (an ablation). ``dense``: the ``modules_to_save`` tensors. The runner and the
    Flower client both call this, so they cannot drift.

    Raises
    ------
    AdapterError
        Naming the client, if the state has keys the model does not (a module mismatch).
    """
    config: dict[str, Any] = cast(Any, model).peft_config["default"].to_dict()
    draw = 0 if freeze_a else round_index
    state: dict[str, Tensor] = {}
    if init:
        state, _ = adapter_state_dict(init, {}, config)
    elif per_client_init:  # B = 0, A drawn by peft per client (and round)
        torch.manual_seed(seed_for(seed, draw, 0 if freeze_a else client, 1))
        for mod in model.modules():
            reset = getattr(mod, "reset_lora_parameters", None)
            if callable(reset) and hasattr(mod, "lora_A"):
                reset("default", True)
    else:
        shapes = lora_shapes(model)
        shared = shared_lora_init(shapes, top_rank, seed=seed, round_index=draw)
        state, _ = adapter_state_dict(fresh_factors(shapes, shared, rank), {}, config)
    state.update({f"{PREFIX}{k}": v for k, v in dense.items()})
    result = set_peft_model_state_dict(model, {k: v.to(torch.float32) for k, v in state.items()})
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise AdapterError(f"adapter keys not in the model: {unexpected[:3]}", client=client)


def lora_config(r: int, target_modules: Sequence[str], *, head: bool = True) -> LoraConfig:
    """The LoRA configuration of a client of rank r (alpha = 2 r).

    ``head`` trains the classifier as ``modules_to_save`` (sequence classification).
    """
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        modules_to_save=["classifier"] if head else None,
    )


BatchLoss = Callable[[torch.nn.Module, list[str], list[int]], Tensor]


class Encoder:
    """Token ids of texts, encoded once (truncated to ``max_len``) and padded per batch.

    The padded batch equals ``tok(texts, padding=True, truncation=True, max_length=max_len)``;
    each text is tokenised only the first time it is seen (:meth:`prefill` does a whole list in
    one batched call), so a run tokenises every shard and the evaluation set once.
    """

    def __init__(self, tok: PreTrainedTokenizerBase, max_len: int) -> None:
        self.tok = tok
        self.max_len = max_len
        self.cache: dict[str, list[int]] = {}
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else 0
        self.types = "token_type_ids" in tok.model_input_names
        self.left = tok.padding_side == "left"

    def prefill(self, texts: Sequence[str]) -> None:
        """Tokenise the texts not seen yet, in one batched call."""
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            ids = self.tok(new, truncation=True, max_length=self.max_len)["input_ids"]
            self.cache.update(zip(new, ids, strict=True))

    def ids(self, text: str) -> list[int]:
        """The token ids of one text."""
        if text not in self.cache:
            self.prefill([text])
        return self.cache[text]

    def batch(self, texts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` (and ``token_type_ids``) padded to the longest."""
        self.prefill(texts)
        rows = [self.cache[t] for t in texts]
        width = max(len(x) for x in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, x in enumerate(rows):
            sl = slice(width - len(x), width) if self.left else slice(0, len(x))
            ids[j, sl] = torch.tensor(x, dtype=torch.long)
            mask[j, sl] = 1
        out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.types:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out


def classification_loss(
    tok: PreTrainedTokenizerBase,
    max_len: int,
    device: torch.device,
    encoder: Encoder | None = None,
) -> BatchLoss:
    """Sequence-classification cross-entropy of a batch of texts and labels.

    Texts are tokenised once (``encoder``, or one private to this loss) and padded per batch.
    """
    enc = encoder or Encoder(tok, max_len)

    def loss(model: torch.nn.Module, texts: list[str], labels: list[int]) -> Tensor:
        batch = enc.batch(texts, device)
        out: Tensor = model(**batch, labels=torch.tensor(labels, device=device)).loss
        return out

    return loss


def target_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The base weights of a peft model's LoRA-adapted modules, by module name."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            out[name.removeprefix(PREFIX)] = mod.base_layer.weight
    return out


def train_local(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    shard: Examples,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_len: int,
    seed: int,
    freeze_a: bool,
    device: torch.device,
    batch_loss: BatchLoss | None = None,
    freeze_b: bool = False,
) -> float:
    """``steps`` AdamW steps on random batches of ``shard``; returns the mean training loss.

    ``batch_loss`` defaults to sequence classification. ``freeze_a`` keeps every ``lora_A``
    fixed (FFA-LoRA, RoLoRA's odd rounds), ``freeze_b`` every ``lora_B`` (RoLoRA's even
    rounds). Batches come from a generator seeded with ``seed`` alone and the global
    torch RNG (dropout masks) is seeded from ``seed`` too, so a rerun (or a resumed run) is
    bit-identical on the CPU.
    """
    loss_fn = batch_loss or classification_loss(tok, max_len, device)
    model.train()
    params = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad
        and not (freeze_a and ".lora_A." in n)
        and not (freeze_b and ".lora_B." in n)
    ]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed_for(seed, 9))  # dropout
    total = 0.0
    for _ in range(steps):
        idx = torch.randint(len(shard), (min(batch_size, len(shard)),), generator=g).tolist()
        loss = loss_fn(model, [shard.texts[j] for j in idx], [shard.labels[j] for j in idx])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss.detach())
    return total / max(steps, 1)


def merged_model(
    base: torch.nn.Module,
    updates: Mapping[str, Tensor],
    dense: Mapping[str, Tensor],
    *,
    into: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """``base`` with dense updates added to module weights and heads copied in.

    A fresh copy of ``base``, or ``into`` (a model of the same architecture, overwritten: no
    new allocation per round).
    """
    if into is None:
        model = copy.deepcopy(base)
        sd = model.state_dict()
    else:
        model = into
        sd = model.state_dict()
        with torch.no_grad():
            for key, value in base.state_dict().items():
                sd[key].copy_(value)
    with torch.no_grad():
        for name, delta in updates.items():
            sd[f"{name}.weight"].add_(delta.to(sd[f"{name}.weight"].dtype))
        for key, value in dense.items():
            plain = key.replace("modules_to_save.default.", "")
            if plain in sd:
                sd[plain].copy_(value)
    return model


def matthews_corrcoef(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Matthews correlation coefficient (multi-class form; 0.0 when undefined), as in GLUE."""
    n = max(max(labels, default=0), max(preds, default=0)) + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    for y, q in zip(labels, preds, strict=True):
        C[y, q] += 1
    t, p = C.sum(1), C.sum(0)
    c, s = float(C.trace()), float(C.sum())
    den = math.sqrt(float(s * s - p @ p) * float(s * s - t @ t))
    return 0.0 if den == 0.0 else float(c * s - t @ p) / den


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    examples: Examples,
    *,
    max_len: int,
    device: torch.device,
    batch_size: int = 128,
    encoder: Encoder | None = None,
) -> dict[str, float]:
    """``accuracy``, ``eval_loss`` (mean cross-entropy) and ``mcc`` of ``model``.

    Examples are batched by token length (less padding); the metrics do not depend on it.
    """
    torch.nn.Module.eval(model)
    enc = encoder or Encoder(tok, max_len)
    enc.prefill(examples.texts)
    order = sorted(range(len(examples)), key=lambda j: (len(enc.ids(examples.texts[j])), j))
    preds = [0] * len(examples)
    total_loss = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        labels = torch.tensor([examples.labels[j] for j in idx], device=device)
        batch = enc.batch([examples.texts[j] for j in idx], device)
        logits = model(**batch).logits.float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        for j, q in zip(idx, logits.argmax(-1).tolist(), strict=True):
            preds[j] = int(q)
    n = max(len(examples), 1)
    correct = sum(int(q == y) for q, y in zip(preds, examples.labels, strict=True))
    return {
        "accuracy": correct / n,
        "eval_loss": total_loss / n,
        "mcc": matthews_corrcoef(examples.labels, preds),
    }


def evaluate_model(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    examples: Examples,
    *,
    max_len: int,
    device: torch.device,
) -> tuple[float, float]:
    """Accuracy and mean loss of ``model`` on ``examples``."""
    m = evaluate_classifier(model, tok, examples, max_len=max_len, device=device)
    return m["accuracy"], m["eval_loss"]


__all__ = [
    "BatchLoss",
    "Encoder",
    "ModelNotInstalledError",
    "build_model",
    "classification_loss",
    "evaluate_classifier",
    "evaluate_model",
    "fresh_factors",
    "lora_config",
    "lora_shapes",
    "matthews_corrcoef",
    "merged_model",
    "minilm_path",
    "missing_targets",
    "seed_for",
    "shared_lora_init",
    "start_client",
    "target_weights",
    "train_local",
]
