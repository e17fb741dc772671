"""A Flower app (ServerApp + ClientApp) that fine-tunes with peft LoRA and any operator.

The module-level ``server_app`` and ``client_app`` are what ``flwr run`` starts on Flower's
deployment engine: copy the app folder ``flower_template`` (next to this file; its
``pyproject.toml`` points at them and lists every run-config key with its default) and follow
its README (one ``flower-superlink``, one ``flower-supernode`` per data partition with
``--node-config "partition-id=<i> num-partitions=<n>"``, then ``flwr run``). Clients train
sequence classification on Dirichlet label-skew shards of a task (``data-dir`` run-config key,
or a node's ``data-dir`` node-config key, else ``$GLORA_DATA``, else ``../shared/data``) with
their own LoRA rank; the server is :class:`glora_math.integration.flower.LoRAStrategy`. Run-config
keys are checked: an unknown key or a bad value stops the run with a one-line
:class:`FlowerConfigError`. At the end the server writes ``<out>/flower_results.json``
(per-round train and evaluation metrics, accepted and rejected nodes with the partitions they
name and the reasons) and the global adapter ``<out>/global_adapter`` (a peft adapter folder;
``base_delta.safetensors`` too for operators that fold dense updates into the base).

``python -m glora_math.integration.flower_app --clients 3 --rounds 2`` does all of that on this
machine (:class:`LocalDeployment`: a SuperLink and ``--clients`` SuperNodes on 127.0.0.1,
insecure, torn down at the end; their logs in ``<out>/deployment``). ``--faulty 2:nan`` makes
partition 2 send NaN (also ``missing``: a module left out, ``shape``: a wrong shape) to show
the server rejecting it and carrying on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, replace
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from peft import get_peft_model, get_peft_model_state_dict
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import Examples, dirichlet_split
from ..federated.models import (
    build_model,
    evaluate_model,
    lora_config,
    lora_shapes,
    merged_model,
    missing_targets,
    seed_for,
    start_client,
    target_weights,
    train_local,
)
from ..federated.settings import HELP
from ..peft.io import PREFIX
from ..runner.checkpoint import CheckpointError, read_checkpoint, restore_server, write_checkpoint
from ..runner.files import write_text_atomic
from .cli import TEMPLATE
from .config import _BOOL, _FLOAT, _INT, FlowerConfig, FlowerConfigError
from .deploy import LocalDeployment
from .messages import evaluate_reply, read_evaluate_message, read_train_message, train_reply
from .strategy import LoRAStrategy, RoundLog


def _threads(cfg: FlowerConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


# ----------------------------------------------------------------------------------------------
# Client side


def _node(context: Context) -> tuple[int, int, str | None]:
    """``(partition-id, num-partitions, data-dir or None)`` of a node, checked."""
    nc = context.node_config
    pid, n = nc.get("partition-id"), nc.get("num-partitions")
    for key, v in (("partition-id", pid), ("num-partitions", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise FlowerConfigError(f"node config {key!r} must be a whole number, got {v!r}; "
                                    'start the SuperNode with --node-config "partition-id=<i> '
                                    'num-partitions=<n>"')  # fmt: skip
    assert isinstance(pid, int)
    assert isinstance(n, int)
    if not 0 <= pid < n:
        raise FlowerConfigError(f"node config partition-id={pid} is not in [0, {n})")
    data_dir = nc.get("data-dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise FlowerConfigError(f"node config 'data-dir' must be a string, got {data_dir!r}")
    return pid, n, data_dir or None


def check_partitions(cfg: FlowerConfig, num_partitions: int) -> None:
    """A node's ``num-partitions`` must be the run's ``clients`` (one SuperNode per partition)."""
    if num_partitions != cfg.clients:
        raise FlowerConfigError(
            f"node config num-partitions={num_partitions} but run-config key 'clients' = "
            f"{cfg.clients}: the server waits for 'clients' SuperNodes, one per partition; "
            f"set clients={num_partitions}"
        )


def _data(cfg: FlowerConfig, data_dir: str | None) -> tuple[Examples, Examples, int]:
    """The run's training and evaluation examples (the same loading as ``glora simulate``)."""
    train, dev, _, names = cfg.load_data(data_dir=data_dir)
    return train, dev, len(names) if names else max(*train.labels, *dev.labels) + 1


_SETUPS: dict[tuple[str, int, str | None], Any] = {}


def _setup(
    cfg: FlowerConfig, num_partitions: int, data_dir: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[Examples], list[Examples], int]:
    """Base model, tokenizer, train and evaluation shards (cached per process, by settings)."""
    key = (repr(cfg), num_partitions, data_dir)
    if key not in _SETUPS:
        if len(_SETUPS) >= 4:
            _SETUPS.pop(next(iter(_SETUPS)))
        _SETUPS[key] = _build(cfg, num_partitions, data_dir)
    setup: tuple[PreTrainedModel, PreTrainedTokenizerBase, list[Examples], list[Examples], int]
    setup = _SETUPS[key]
    return setup


def _build(
    cfg: FlowerConfig, num_partitions: int, data_dir: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[Examples], list[Examples], int]:
    train, dev, num_labels = _data(cfg, data_dir)
    parts = dirichlet_split(train.labels, num_partitions, cfg.dirichlet, cfg.seed)
    evals = [dev.subset(list(range(i, len(dev), num_partitions))) for i in range(num_partitions)]
    base, tok = build_model(cfg.model, num_labels, cfg.seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tok, [train.subset(p) for p in parts], evals, num_labels


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
    """The ClientApp; settings from ``default`` or, if None, from Flower's run_config.

    It reads the server's messages with :func:`~integration.flower.read_train_message` /
    :func:`~integration.flower.read_evaluate_message` and replies with
    :func:`~integration.flower.train_reply` / :func:`~integration.flower.evaluate_reply`,
    naming its partition.
    """
    app = ClientApp()

    def config_of(context: Context) -> FlowerConfig:
        cfg = default if default is not None else FlowerConfig.from_run_config(context.run_config)
        _threads(cfg)
        return cfg

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        pid, n, data_dir = _node(context)
        check_partitions(cfg, n)
        base, tok, shards, _, _ = _setup(cfg, n, data_dir)
        job = read_train_message(msg)
        r = cfg.rank_of(pid)
        lcfg = lora_config(r, cfg.modules())
        model = get_peft_model(merged_model(base, job.base, {}), lcfg)
        start_client(
            model,
            r,
            init=job.init,
            dense=job.dense,
            client=pid,
            seed=cfg.seed,
            round_index=job.server_round,
            top_rank=max(cfg.rank_of(q) for q in range(n)),
            freeze_a=job.freeze_a,
            per_client_init=cfg.per_client_init,
        )
        if not target_weights(model):
            raise FlowerConfigError(f"no modules match target-modules {cfg.modules()}")
        loss = train_local(
            model,
            tok,
            shards[pid],
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            max_len=cfg.max_len,
            seed=seed_for(cfg.seed, job.server_round, pid, 2),
            freeze_a=job.freeze_a,
            freeze_b=job.freeze_b,
            device=torch.device("cpu"),
        )
        sd = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
        if pid in cfg.faults():
            sd = _sabotage(sd, cfg.faults()[pid])
        reply = train_reply(sd, lcfg, num_examples=len(shards[pid]), train_loss=loss, partition=pid)
        return Message(content=reply, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The partition this node holds: the server keeps each partition's client state."""
        pid, _, _ = _node(context)
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        pid, n, data_dir = _node(context)
        base, tok, _, evals, _ = _setup(cfg, n, data_dir)
        job = read_evaluate_message(msg)
        model = merged_model(base, job.deltas(), job.dense)
        acc, loss = evaluate_model(
            model, tok, evals[pid], max_len=cfg.max_len, device=torch.device("cpu")
        )
        reply = evaluate_reply(
            num_examples=len(evals[pid]), accuracy=acc, eval_loss=loss, partition=pid
        )
        return Message(content=reply, reply_to=msg)

    return app


# ----------------------------------------------------------------------------------------------
# Server side


def initial_adapter(cfg: FlowerConfig) -> tuple[dict[str, Tensor], dict[str, tuple[int, int]]]:
    """The server's own initial adapter: heads and adapted modules.

    The heads (``modules_to_save``) every client starts from, and the adapted modules with
    their ``(out_features, in_features)``.

    These are the reference every reply must match (:class:`LoRAStrategy` ``modules=`` and the
    initial arrays), so no reply decides it.
    """
    _, _, num_labels = _data(cfg, None)
    base, _ = build_model(cfg.model, num_labels, cfg.seed)
    trouble = missing_targets(base, cfg.modules())
    if trouble:
        raise FlowerConfigError(f"run-config key 'target-modules': {trouble}")
    model = get_peft_model(base, lora_config(cfg.rank_of(0), cfg.modules()))
    heads = {
        k.removeprefix(PREFIX): v.detach().clone()
        for k, v in get_peft_model_state_dict(model).items()
        if ".lora_" not in k
    }
    shapes = lora_shapes(model)
    if not shapes:
        raise FlowerConfigError(f"no modules of {cfg.model!r} match target-modules "
                                f"{','.join(cfg.modules())!r}")  # fmt: skip
    return heads, shapes


def initial_heads(cfg: FlowerConfig) -> dict[str, Tensor]:
    """The ``modules_to_save`` tensors every client starts from (round 1)."""
    return initial_adapter(cfg)[0]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _round_json(logged: RoundLog, evaluation: Mapping[str, Any] | None) -> dict[str, Any]:
    """One round of ``flower_results.json``, with partitions next to node ids."""
    by_part = {
        str(logged.partitions.get(n, f"node {n}")): why for n, why in logged.rejected.items()
    }
    return {
        **asdict(logged),
        "aggregation_error": _finite(logged.aggregation_error),
        "certified_residual": _finite(logged.certified_residual),
        "train_loss": _finite(logged.train_loss),
        "accepted_partitions": sorted(
            logged.partitions[n] for n in logged.accepted if n in logged.partitions
        ),
        "rejected_partitions": by_part,
        "missing_partitions": {
            str(logged.partitions.get(n, f"node {n}")): why for n, why in logged.missing.items()
        },
        "evaluate": dict(evaluation) if evaluation is not None else None,
    }


#: Settings that do not change a Flower run's results (a resume may change them).
_NOT_RESULTS = ("rounds", "out", "timeout", "resume", "threads", "data_dir", "faulty",
                "keep_replies")  # fmt: skip


def _jsonable_config(cfg: FlowerConfig) -> dict[str, Any]:
    return {**asdict(cfg), "faulty": [[p, k] for p, k in cfg.faulty]}


def _write_results(
    out: Path, cfg: FlowerConfig, run_id: int, rounds: list[dict[str, Any]], adapter: Path | None
) -> None:
    """``<out>/flower_results.json``, rewritten after every round (atomically) and at the end."""
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": {**asdict(cfg), "faulty": {str(k): v for k, v in cfg.faulty}},
        "run_id": run_id,
        "rounds": rounds,
        "global_adapter": None if adapter is None else str(adapter),
    }
    write_text_atomic(out / "flower_results.json", json.dumps(results, indent=2))


def save_round(
    out: Path,
    strategy: LoRAStrategy,
    cfg: FlowerConfig,
    done: list[dict[str, Any]],
    *,
    run_id: int,
) -> None:
    """After a round: the verified checkpoint in ``<out>/checkpoint`` and the results so far."""
    rounds = [*done, *(_round_json(x, None) for x in strategy.history)]
    write_checkpoint(out / "checkpoint", strategy.history[-1].round,
                     strategy.server.state_tensors(), {
                         "server": strategy.server.state_meta(),
                         "config": _jsonable_config(cfg),
                         "metrics": rounds,
                         "partitions": {str(n): q for n, q in strategy.partition_of.items()},
                     })  # fmt: skip
    _write_results(out, cfg, run_id, rounds, None)


def resume_strategy(
    strategy: LoRAStrategy, folder: Path, cfg: FlowerConfig
) -> list[dict[str, Any]]:
    """Restore the server state of the last finished round from ``folder``; its rounds' JSON.

    Nothing to resume (no checkpoint) starts from round 1. A checkpoint made with other
    result-defining settings, or one that is damaged or edited, is refused in one line.
    """
    found = read_checkpoint(folder)
    if found is None:
        log(INFO, "resume: no checkpoint in %s; starting from round 1", folder)
        return []
    meta, flat = found
    saved = {k: v for k, v in meta["config"].items() if k not in _NOT_RESULTS}
    now = {k: v for k, v in _jsonable_config(cfg).items() if k not in _NOT_RESULTS}
    if saved != now:
        diff = [k for k in sorted(now) if saved.get(k) != now.get(k)]
        raise CheckpointError(f"resume: the checkpoint in {folder} was made with other "
                              f"settings ({', '.join(diff[:5])})")  # fmt: skip
    if int(meta["round"]) >= cfg.rounds:
        raise CheckpointError(
            f"resume: the checkpoint in {folder} is at round {meta['round']} and the run has "
            f"rounds = {cfg.rounds}: nothing is left to do"
        )
    restore_server(strategy.server, meta, flat, folder)
    if not all(bool(torch.isfinite(t).all()) for t in flat.values() if t.is_floating_point()):
        raise CheckpointError(f"resume: {folder} holds NaN/Inf values")
    strategy.round_offset = int(meta["round"])
    strategy.partition_of = {int(n): int(q) for n, q in dict(meta.get("partitions", {})).items()}
    log(INFO, "resume: round %d restored from %s", strategy.round_offset, folder)
    return list(meta["metrics"])


def make_server_app(default: FlowerConfig | None = None) -> ServerApp:
    """The ServerApp; settings from ``default`` or, if None, from Flower's run_config.

    It writes ``<out>/flower_results.json`` and the global adapter ``<out>/global_adapter``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = (default or FlowerConfig.from_run_config(context.run_config)).check()
        except FlowerConfigError as err:
            log(ERROR, "%s", err)
            raise
        _threads(cfg)
        heads, shapes = initial_adapter(cfg)
        out = Path(cfg.out).resolve()
        done: list[dict[str, Any]] = []  # the rounds of earlier runs (a resume)

        def after_round(logged: RoundLog) -> None:
            save_round(out, strategy, cfg, done, run_id=context.run_id)

        strategy = LoRAStrategy(
            cfg.operator,
            server_rank=cfg.server_rank,
            max_residual=cfg.max_residual,
            options=cfg.operator_options(),
            fraction_train=cfg.participation,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=cfg.clients,
            seed=cfg.seed,
            modules=shapes,
            node_wait=cfg.timeout,
            min_replies=cfg.min_replies,
            min_fraction=cfg.min_fraction,
            on_round=after_round,
            keep_replies=out / "replies" if cfg.keep_replies else None,
        )
        if cfg.resume:
            done = resume_strategy(strategy, out / "checkpoint", cfg)
            heads = dict(strategy.server.dense) or heads
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(heads),
            num_rounds=cfg.rounds - strategy.round_offset,
            timeout=cfg.timeout,
        )
        out.mkdir(parents=True, exist_ok=True)
        top = max((f.rank for f in strategy.server.global_update.values()), default=0)
        written = strategy.save_global_adapter(
            out / "global_adapter",
            lora_config(top or cfg.rank_of(0), cfg.modules()),
            base_model=cfg.base_model_path(),
        )
        for path in written:
            log(INFO, "wrote %s", path)
        evaluations = result.evaluate_metrics_clientapp
        offset = strategy.round_offset
        rounds = [*done, *(_round_json(x, evaluations.get(x.round - offset))
                           for x in strategy.history)]  # fmt: skip
        _write_results(
            out, cfg, context.run_id, rounds, out / "global_adapter" if written else None
        )
        log(INFO, "wrote %s", out / "flower_results.json")

    return app


server_app = make_server_app()
client_app = make_client_app()


def local_threads(cfg: FlowerConfig, cpus: int | None = None) -> int:
    """Torch threads per app process when all SuperNodes share this machine.

    ``threads = 0`` (torch's default: every core) in each of ``clients`` processes would
    oversubscribe the cores; it becomes the machine's cores shared out, at least 1. A value
    the user set is kept.
    """
    if cfg.threads > 0:
        return cfg.threads
    return max(1, (cpus or os.cpu_count() or 1) // max(1, cfg.clients))


def run(cfg: FlowerConfig) -> dict[str, Any]:
    """Run the app on Flower's deployment engine on this machine; return the results JSON.

    A :class:`LocalDeployment` with ``cfg.clients`` SuperNodes runs :data:`TEMPLATE` with
    ``cfg`` as its run config; its logs stay in ``<out>/deployment``.

    Raises
    ------
    RuntimeError
        If the run fails (the end of its log is in the message).
    """
    cfg = replace(cfg.check(), out=str(Path(cfg.out).resolve()), threads=local_threads(cfg))
    workdir = Path(cfg.out) / "deployment"
    workdir.mkdir(parents=True, exist_ok=True)
    results = Path(cfg.out) / "flower_results.json"
    results.unlink(missing_ok=True)
    with LocalDeployment(cfg.clients, workdir) as deployment:
        outcome = deployment.run(TEMPLATE, cfg.to_run_config(),
                                 timeout=cfg.rounds * 2 * cfg.timeout + 120)  # fmt: skip
    if not outcome.ok or not results.exists():
        raise RuntimeError(f"the Flower run {outcome.run_id} ended {outcome.status}; the end of "
                           f"its log:\n{outcome.log[-3000:]}")  # fmt: skip
    out: dict[str, Any] = json.loads(results.read_text())
    return out


_FLAG_HELP = HELP | {
    "clients": "SuperNodes to start (one partition each)",
    "fraction_evaluate": "fraction of nodes that evaluate the global model (0: none)",
    "faulty": "fault injection, 'partition:kind,...' with kind nan, missing or shape",
    "timeout": "seconds the server waits for nodes and for each round's replies",
    "out": "results and the global adapter",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the app on Flower's deployment engine here and print a summary."""
    ap = argparse.ArgumentParser(
        prog="glora flower run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    for f in fields(FlowerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in _BOOL:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=_FLAG_HELP.get(f.name))  # fmt: skip
        else:
            kind = int if f.name in _INT else float if f.name in _FLOAT else str
            ap.add_argument(flag, type=kind, default=None, help=_FLAG_HELP.get(f.name))
    a = ap.parse_args(argv)
    given = {k.replace("_", "-"): v for k, v in vars(a).items() if v is not None}
    try:
        cfg = FlowerConfig.from_run_config(given)
    except FlowerConfigError as err:
        ap.exit(2, f"error: {err}\n")
    try:
        res = run(cfg)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for row in res["rounds"]:
        ev = row["evaluate"] or {}
        print(
            f"round {row['round']}: accepted partitions {row['accepted_partitions']}, rejected "
            f"{row['rejected_partitions'] or 'none'}, aggregation error "
            f"{row['aggregation_error']}, accuracy {ev.get('accuracy')}"
        )
    print(f"wrote {Path(cfg.out) / 'flower_results.json'} and {res['global_adapter']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
