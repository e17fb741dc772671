"""A Flower app (ServerApp + ClientApp) that fine-tunes with peft LoRA and any operator.

``python -m glora_math.integration.flower_app --operator glora --clients 3 --rounds 2`` runs
it with Flower's simulation engine (``flwr.simulation.run_simulation``, the documented
in-process equivalent of ``flwr run`` with a local simulation federation). Clients train
sequence classification on Dirichlet label-skew shards of a task in ``../shared/data`` with
their own LoRA rank; the server is :class:`glora_math.integration.flower.LoRAStrategy`.
``--faulty`` makes chosen clients send malformed replies (NaN, a missing module, a wrong
shape) to show that the server rejects them and carries on. Results (per-round train and
evaluation metrics, accepted and rejected clients with reasons) are written to
``<out>/flower_results.json``.

The module-level ``server_app`` and ``client_app`` read the same settings from Flower's
``run_config`` (keys as the :class:`FlowerConfig` fields, with ``-`` for ``_``), for
``flwr run`` with an app config that points at them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model, get_peft_model_state_dict
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Examples, dirichlet_split, load_task, sample
from .flower import LoRAStrategy, record_to_factors
from .models import (
    build_model,
    evaluate_model,
    lora_config,
    merged_model,
    seed_for,
    start_client,
    target_weights,
    train_local,
)
from .peft_io import PREFIX


@dataclass(frozen=True)
class FlowerConfig:
    """Settings of a Flower run (defaults: a CI-sized run with the tiny random RoBERTa)."""

    model: str = "tiny-roberta"
    task: str = "sst2"
    clients: int = 3
    rounds: int = 2
    dirichlet: float = 0.5
    local_steps: int = 2
    batch_size: int = 8
    lr: float = 5e-4
    client_ranks: tuple[int, ...] = (2, 4, 4)
    server_rank: int | None = None
    operator: str = "glora_auto"
    participation: float = 1.0
    seed: int = 0
    max_train: int = 120
    max_eval: int = 60
    max_len: int = 32
    target_modules: tuple[str, ...] = ("query", "value")
    faulty: tuple[tuple[int, str], ...] = ()  # (partition, "nan" | "missing" | "shape")
    # Fresh LoRA starts: one shared init (the rank-r part of one draw at the largest client
    # rank, seeded by seed and round), or, if True, a per-client draw (an ablation).
    per_client_init: bool = False
    out: str = "out/flower"
    timeout: float = 300.0  # seconds the server waits for a round's replies

    def faults(self) -> dict[int, str]:
        """Fault injection: partition -> kind."""
        return dict(self.faulty)

    def rank_of(self, partition: int) -> int:
        """The LoRA rank of a partition (the ranks cycle)."""
        return self.client_ranks[partition % len(self.client_ranks)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerConfig:
        """Override the defaults with Flower ``run_config`` values (``client-ranks = "2,4"``)."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                continue
            v = run_config[key]
            if f.name in ("client_ranks", "target_modules"):
                parts = [x.strip() for x in str(v).split(",") if x.strip()]
                kw[f.name] = tuple(int(x) for x in parts) if f.name == "client_ranks" else parts
            elif f.name == "faulty":
                pairs = (x.split(":") for x in str(v).split(",") if x)
                kw[f.name] = tuple((int(a), b) for a, b in pairs)
            else:
                kw[f.name] = v
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# Client side


@lru_cache(maxsize=4)
def _setup(
    cfg: FlowerConfig, num_partitions: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[Examples], list[Examples], int]:
    """Base model, tokenizer, train and evaluation shards (cached per process)."""
    train = sample(load_task(cfg.task, "train"), cfg.max_train, cfg.seed)
    dev = sample(load_task(cfg.task, "dev"), cfg.max_eval, cfg.seed + 1)
    num_labels = max(*train.labels, *dev.labels) + 1
    parts = dirichlet_split(train.labels, num_partitions, cfg.dirichlet, cfg.seed)
    evals = [dev.subset(list(range(i, len(dev), num_partitions))) for i in range(num_partitions)]
    base, tok = build_model(cfg.model, num_labels, cfg.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tok, [train.subset(p) for p in parts], evals, num_labels


def _arrays(content: RecordDict, key: str) -> ArrayRecord:
    rec = content[key]
    if not isinstance(rec, ArrayRecord):
        raise TypeError(f"the server message has no ArrayRecord {key!r}")
    return rec


def _with_folds(base: torch.nn.Module, content: RecordDict) -> torch.nn.Module:
    return merged_model(base, _arrays(content, "base").to_torch_state_dict(), {})


def _sabotage(sd: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """A malformed reply, for the fault-injection runs and tests."""
    key = sorted(k for k in sd if ".lora_B." in k)[0]
    sd = dict(sd)
    if kind == "nan":
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = float("nan")
    elif kind == "missing":
        del sd[key]
        del sd[key.replace("lora_B", "lora_A")]
    elif kind == "shape":
        sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return sd


def make_client_app(default: FlowerConfig | None = None) -> ClientApp:
    """The ClientApp; settings from ``default`` or, if None, from Flower's run_config."""
    app = ClientApp()

    def config_of(context: Context) -> FlowerConfig:
        return default if default is not None else FlowerConfig.from_run_config(context.run_config)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        base, tok, shards, _, _ = _setup(cfg, n)
        r = cfg.rank_of(pid)
        conf = msg.content["config"]
        if not isinstance(conf, ConfigRecord):
            raise TypeError("the server message has no ConfigRecord 'config'")
        rnd = int(conf["server-round"])  # type: ignore[arg-type]
        freeze_a = bool(conf.get("freeze-a", False))
        model = get_peft_model(
            copy.deepcopy(_with_folds(base, msg.content)),
            lora_config(r, cfg.target_modules),
        )
        init, dense = _arrays(msg.content, "init"), _arrays(msg.content, "dense")
        config_dict: dict[str, Any] = lora_config(r, cfg.target_modules).to_dict()  # type: ignore[no-untyped-call]
        start_client(
            model,
            r,
            init=record_to_factors(init) if len(init) else None,
            dense=dense.to_torch_state_dict(),
            client=pid,
            seed=cfg.seed,
            round_index=rnd,
            top_rank=max(cfg.rank_of(q) for q in range(n)),
            freeze_a=freeze_a,
            per_client_init=cfg.per_client_init,
        )
        if not target_weights(model):
            raise ValueError(f"no modules match target_modules {cfg.target_modules}")
        loss = train_local(
            model,
            tok,
            shards[pid],
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            max_len=cfg.max_len,
            seed=seed_for(cfg.seed, rnd, pid, 2),
            freeze_a=freeze_a,
            device=torch.device("cpu"),
        )
        sd = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
        if pid in cfg.faults():
            sd = _sabotage(sd, cfg.faults()[pid])
        reply = RecordDict(
            {
                "adapter": ArrayRecord(sd),
                "lora": ConfigRecord(
                    {
                        "r": r,
                        "lora_alpha": float(config_dict["lora_alpha"]),
                        "use_rslora": False,
                        "fan_in_fan_out": False,
                    }
                ),
                "metrics": MetricRecord(
                    {"num-examples": len(shards[pid]), "train-loss": float(loss)}
                ),
            }
        )
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        base, tok, _, evals, _ = _setup(cfg, n)
        update, dense = _arrays(msg.content, "update"), _arrays(msg.content, "dense")
        deltas = {name: f.delta() for name, f in record_to_factors(update).items()}
        model = merged_model(_with_folds(base, msg.content), deltas, dense.to_torch_state_dict())
        acc, loss = evaluate_model(
            model, tok, evals[pid], max_len=cfg.max_len, device=torch.device("cpu")
        )
        metrics = MetricRecord(
            {"num-examples": len(evals[pid]), "accuracy": acc, "eval-loss": loss}
        )
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


# ----------------------------------------------------------------------------------------------
# Server side


def initial_heads(cfg: FlowerConfig) -> dict[str, Tensor]:
    """The ``modules_to_save`` tensors every client starts from (round 1)."""
    train = sample(load_task(cfg.task, "train"), cfg.max_train, cfg.seed)
    base, _ = build_model(cfg.model, max(train.labels) + 1, cfg.seed)
    model = get_peft_model(base, lora_config(cfg.rank_of(0), cfg.target_modules))
    return {
        k.removeprefix(PREFIX): v.detach().clone()
        for k, v in get_peft_model_state_dict(model).items()
        if ".lora_" not in k
    }


def make_server_app(default: FlowerConfig | None = None) -> ServerApp:
    """The ServerApp; settings from ``default`` or, if None, from Flower's run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = default if default is not None else FlowerConfig.from_run_config(context.run_config)
        strategy = LoRAStrategy(
            cfg.operator,
            server_rank=cfg.server_rank,
            fraction_train=cfg.participation,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=cfg.clients,
            seed=cfg.seed,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial_heads(cfg)),
            num_rounds=cfg.rounds,
            timeout=cfg.timeout,
        )
        rounds = []
        for logged in strategy.history:
            ev = result.evaluate_metrics_clientapp.get(logged.round)
            rounds.append(
                {
                    **asdict(logged),
                    "aggregation_error": _finite(logged.aggregation_error),
                    "train_loss": _finite(logged.train_loss),
                    "evaluate": dict(ev) if ev is not None else None,
                }
            )
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        cfg_json = {**asdict(cfg), "faulty": {str(k): v for k, v in cfg.faulty}}
        (out / "flower_results.json").write_text(
            json.dumps({"config": cfg_json, "rounds": rounds}, indent=2)
        )

    return app


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


server_app = make_server_app()
client_app = make_client_app()


def run(cfg: FlowerConfig) -> dict[str, Any]:
    """Run the app in Flower's simulation engine; return the results JSON."""
    from flwr.simulation import run_simulation  # noqa: PLC0415  # heavy (Ray), only to run

    # Ray >= 2.4x warns (FutureWarning) on every actor start unless this is set; the clients
    # use no accelerator, so keeping devices visible is what we want anyway.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    path = Path(cfg.out) / "flower_results.json"
    if not path.exists():
        raise RuntimeError(f"the Flower run wrote no results ({path}); see the log above")
    out: dict[str, Any] = json.loads(path.read_text())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the app in Flower's simulation engine and print a summary."""
    ap = argparse.ArgumentParser(
        prog="python -m glora_math.integration.flower_app", description=__doc__
    )
    d = FlowerConfig()
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--task", default=d.task)
    ap.add_argument("--operator", default=d.operator)
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--client-ranks", type=int, nargs="+", default=list(d.client_ranks))
    ap.add_argument("--server-rank", type=int, default=None)
    ap.add_argument("--participation", type=float, default=d.participation)
    ap.add_argument("--local-steps", type=int, default=d.local_steps)
    ap.add_argument("--max-train", type=int, default=d.max_train)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument(
        "--faulty", nargs="*", default=[], help="partition:kind, kind in nan|missing|shape"
    )
    ap.add_argument("--per-client-init", action="store_true", help="per-client LoRA inits")
    ap.add_argument("--out", default=d.out)
    a = ap.parse_args(argv)
    cfg = FlowerConfig(
        model=a.model, task=a.task, operator=a.operator, clients=a.clients, rounds=a.rounds,
        client_ranks=tuple(a.client_ranks), server_rank=a.server_rank,
        participation=a.participation, local_steps=a.local_steps, max_train=a.max_train,
        seed=a.seed, faulty=tuple((int(x.split(":")[0]), x.split(":")[1]) for x in a.faulty),
        out=a.out, per_client_init=a.per_client_init,
    )  # fmt: skip
    res = run(cfg)
    for row in res["rounds"]:
        ev = row["evaluate"] or {}
        print(
            f"round {row['round']}: accepted {row['accepted']}, rejected "
            f"{list(row['rejected'])}, aggregation error {row['aggregation_error']}, "
            f"accuracy {ev.get('accuracy')}"
        )
    print(f"wrote {Path(cfg.out) / 'flower_results.json'}")
    return 0


if __name__ == "__main__":
    # Ray pickles the apps by reference: run them from the importable module, not __main__
    # (glora_math.integration.flower_app installed, integration.flower_app in a checkout).
    import importlib

    raise SystemExit(importlib.import_module(__spec__.name).main())
