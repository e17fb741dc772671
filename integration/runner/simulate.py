"""Federated LoRA fine-tuning simulation: N clients, any registered operator, resumable.

``python -m integration.simulate --operator glora --rounds 5`` (or ``glora simulate``) trains
sequence classification with peft LoRA on N simulated clients (Dirichlet label skew), aggregates
each round with the chosen operator, folds dense residuals or merged updates into the base
weights where the operator prescribes it, evaluates the global model, and checkpoints every
round atomically. ``--resume`` continues a killed run with the same results as an uninterrupted
one: all randomness is derived from (seed, round, client), never carried in hidden state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from tqdm import tqdm  # type: ignore[import-untyped]

from glora_math.errors import GloraError
from glora_math.gauge import apply_gauge, random_invertible
from glora_math.operators import get_operator

from ..data import Examples, dirichlet_split
from ..federated.models import (
    BatchLoss,
    Encoder,
    build_model,
    classification_loss,
    evaluate_classifier,
    lora_config,
    merged_model,
    missing_targets,
    seed_for,
    start_client,
    target_weights,
    train_local,
)
from ..federated.server import FederatedServer
from ..peft.io import PREFIX, ClientAdapter, adapter_from_state_dict
from .causal_lm import build_causal_lm, lm_batch_loss, lm_evaluate, template
from .checkpoint import CheckpointError, read_checkpoint, restore_server, write_checkpoint
from .config import (
    ConfigError,
    SimConfig,
    differences,
    parse_args,
    versions,
)
from .files import held, write_atomic, write_text_atomic


def scramble_adapter(adapter: ClientAdapter, cond: float, seed: int) -> ClientAdapter:
    """Each module's factors in a random gauge ``(B G, G^-1 A)``, cond(G) = ``cond``.

    One generator seeded by ``seed`` draws G for the modules in sorted order. Products (and
    hence the exact mean update) are unchanged up to rounding; factor averages are not.
    """
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        G = random_invertible(m.factors.rank, cond=cond, generator=g, dtype=m.factors.B.dtype)
        modules[name] = dataclasses.replace(m, factors=apply_gauge(m.factors, G))
    return ClientAdapter(modules, adapter.dense, adapter.config)


class Simulation:
    """State of one federated run; ``run()`` executes (or resumes) it."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = torch.device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        cfg.check()
        self.op = get_operator(cfg.operator)  # the one lookup of the run's operator
        train, self.eval, self.test, names = cfg.load_data(test_holdout=cfg.test_holdout)
        # The held-out test set that every round (and every arm) is evaluated on, if any.
        self.round_test = self.test if cfg.evaluate_test else None
        self.num_labels = max(*train.labels, *self.eval.labels) + 1
        self.label_names = names or [str(i) for i in range(self.num_labels)]
        parts = dirichlet_split(train.labels, cfg.clients, cfg.dirichlet, cfg.seed)
        self.shards = [train.subset(p) for p in parts]
        if cfg.objective == "causal_lm":
            template(cfg.task)  # fail early for a task without an instruction template
            self.base, self.tok = build_causal_lm(cfg.model, cfg.seed)
        elif cfg.objective == "classification":
            self.base, self.tok = build_model(cfg.model, self.num_labels, cfg.seed)
        else:
            raise ValueError(f"unknown objective {cfg.objective!r}")
        trouble = missing_targets(self.base, cfg.modules())
        if trouble:
            raise ConfigError(f"--target-modules: {trouble}")
        torch.nn.Module.to(self.base, self.device)
        for prm in self.base.parameters():
            prm.requires_grad_(False)
        self.models: dict[int, torch.nn.Module] = {}
        self._eval_model: torch.nn.Module | None = None
        # Every shard and the evaluation set are tokenised once, here.
        self.encoder = Encoder(self.tok, cfg.max_len)
        if cfg.objective == "classification":
            self.encoder.prefill(train.texts)
            self.encoder.prefill(self.eval.texts)
            if self.round_test is not None:
                self.encoder.prefill(self.round_test.texts)
        self.round = 0
        self.metrics: list[dict[str, Any]] = []
        # Called after each client's local training: (clients done, clients this round).
        self._progress: Callable[[int, int], object] = lambda done, total: None
        # Round 0 starts every client from the same initial head (modules_to_save).
        first = get_peft_model_state_dict(self._model(cfg.ranks()[0]))
        heads = {k.removeprefix(PREFIX): v for k, v in first.items() if ".lora_" not in k}
        # The server state carried between rounds (checkpointed with every round); it holds
        # the operator, looked up once here.
        self.server = FederatedServer(
            self.op,
            server_rank=cfg.server_rank or max(cfg.ranks()),
            options=cfg.operator_options(),
            dense=heads,
        )

    # ------------------------------------------------------------------ models and training

    def _lora_config(self, r: int) -> LoraConfig:
        return lora_config(r, self.cfg.modules(), head=self.cfg.objective == "classification")

    def _config_dict(self, r: int) -> dict[str, Any]:
        out: dict[str, Any] = self._lora_config(r).to_dict()  # type: ignore[no-untyped-call]
        return out

    def _model(self, r: int) -> torch.nn.Module:
        if r not in self.models:
            torch.manual_seed(seed_for(self.cfg.seed, 7, r))
            self.models[r] = get_peft_model(copy.deepcopy(self.base), self._lora_config(r))
        return self.models[r]

    def _target_weights(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return target_weights(model)

    def _load_client(
        self, i: int, r: int, server: FederatedServer, round_index: int
    ) -> torch.nn.Module:
        model = self._model(r)
        # Base weights plus every dense fold so far (FedEx, GLoRA+residual, FLoRA merges).
        base_sd = self.base.state_dict()
        folds = server.base_fold
        for name, w in self._target_weights(model).items():
            w.data.copy_(base_sd[f"{name}.weight"])
            if name in folds:
                w.data.add_(folds[name].to(w.dtype))
        start_client(
            model,
            r,
            init=server.start_for(i, r),
            dense=server.dense,
            client=i,
            seed=self.cfg.seed,
            round_index=round_index,
            top_rank=max(self.cfg.ranks()),
            freeze_a=server.op.shared_A,
            per_client_init=self.cfg.per_client_init,
        )
        return model

    def _train(
        self, model: torch.nn.Module, shard: Examples, i: int, server: FederatedServer,
        round_index: int,
    ) -> None:  # fmt: skip
        # The factor the operator keeps frozen this round (FFA-LoRA: A; RoLoRA: A, then B).
        frozen = server.op.frozen_factor(round_index + 1)
        train_local(
            model,
            self.tok,
            shard,
            steps=self.cfg.local_steps,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.lr,
            max_len=self.cfg.max_len,
            seed=seed_for(self.cfg.seed, round_index, i, 2),
            freeze_a=frozen == "A",
            freeze_b=frozen == "B",
            device=self.device,
            batch_loss=self._batch_loss(),
        )

    def _batch_loss(self) -> BatchLoss:
        if self.cfg.objective == "causal_lm":
            cfg, tok, dev = self.cfg, self.tok, self.device
            return lambda m, x, y: lm_batch_loss(m, tok, cfg.task, x, y, max_len=cfg.max_len,
                                                 device=dev)  # fmt: skip
        return classification_loss(self.tok, self.cfg.max_len, self.device, self.encoder)

    # ------------------------------------------------------------------------- a round

    def _participants(self, round_index: int) -> list[int]:
        n = self.cfg.clients
        m = max(1, math.ceil(self.cfg.participation * n))
        g = torch.Generator().manual_seed(seed_for(self.cfg.seed, round_index, 3))
        return sorted(torch.randperm(n, generator=g)[:m].tolist())

    def _local_round(
        self, server: FederatedServer, round_index: int
    ) -> tuple[list[int], list[ClientAdapter], list[float]]:
        """Round ``round_index`` (from 0) of local training from what ``server`` sent.

        Returns the participants, their uploads and their weights. Every random choice is
        derived from (seed, round, client), so the same round from the same server state gives
        the same uploads: the counterfactual arms train their clients through here too.
        """
        ranks = self.cfg.ranks()
        who = self._participants(round_index)
        adapters: list[ClientAdapter] = []
        for done, i in enumerate(who, start=1):
            model = self._load_client(i, ranks[i], server, round_index)
            self._train(model, self.shards[i], i, server, round_index)
            self._progress(done, len(who))
            sd = {
                k: v.detach().to("cpu", torch.float64)
                for k, v in get_peft_model_state_dict(model).items()
            }
            adapter = adapter_from_state_dict(sd, self._config_dict(ranks[i]), client=i)
            if self.cfg.scramble_gauge > 0:
                adapter = scramble_adapter(
                    adapter, self.cfg.scramble_gauge, seed_for(self.cfg.seed, round_index, i, 4)
                )
            adapters.append(adapter)
        return who, adapters, [float(len(self.shards[i])) for i in who]

    def step(self) -> dict[str, Any]:
        """One federated round: local training, aggregation, folds, evaluation."""
        t0 = time.perf_counter()
        ranks = self.cfg.ranks()
        who, adapters, weights = self._local_round(self.server, self.round)
        client_ranks = [ranks[i] for i in who]
        # Counterfactual rounds first: the other operators on these very uploads; nothing of the
        # run changes (no state, no randomness consumed).
        counterfactual = {name: self._what_if(name, adapters, weights)
                          for name in self.cfg.counterfactual or []}  # fmt: skip
        arms = self.cfg.further_arms_at(self.round + 1)
        # Arm (b): each operator's own server, forked before this round's aggregation.
        forks = {name: self.server.fork(name) for name in self.cfg.counterfactual or []
                 if arms and self.cfg.counterfactual_next}  # fmt: skip
        for fork in forks.values():
            fork.aggregate(who, adapters, weights, client_ranks=client_ranks)
        outcome = self.server.aggregate(who, adapters, weights, client_ranks=client_ranks)
        next_round = {name: self._one_round_further(fork) for name, fork in forks.items()}
        splits = {}
        for split in (self.cfg.broadcast_splits or []) if arms else []:
            fork = self.server.fork()
            if split != "own":
                fork.rebroadcast(split)  # type: ignore[arg-type]  # checked by SimConfig
            splits[split] = self._one_round_further(fork)
        t_agg = time.perf_counter()
        ev = self.evaluate()
        row: dict[str, Any] = {
            "round": self.round + 1,
            "participants": who,
            "accuracy": ev["accuracy"],
            "eval_loss": ev["eval_loss"],
        }
        if self.cfg.task.lower() == "cola" and "mcc" in ev:
            row["mcc"] = ev["mcc"]
        if self.round_test is not None:
            te = self.evaluate(self.round_test)
            row["test_accuracy"], row["test_loss"] = te["accuracy"], te["eval_loss"]
        row.update(outcome.metrics())
        row["seconds"] = time.perf_counter() - t0
        row["eval_seconds"] = time.perf_counter() - t_agg
        row["warnings"] = outcome.warnings
        if counterfactual:
            row["counterfactual"] = counterfactual
        if next_round:
            row["counterfactual_next"] = next_round
        if splits:
            row["broadcast_split"] = splits
        self.metrics.append(row)
        self.round += 1
        return row

    def _what_if(
        self, name: str, adapters: list[ClientAdapter], weights: list[float]
    ) -> dict[str, Any]:
        """One counterfactual aggregate of this round's uploads, evaluated (arm a)."""
        deltas, dense, metrics = self.server.what_if(name, adapters, weights)
        return self._arm_row(deltas, dense, metrics)

    def _one_round_further(self, server: FederatedServer) -> dict[str, Any]:
        """The next round of local training from ``server``'s broadcast, aggregated by it.

        ``server`` is a fork; the run itself does not change. The next round's participants
        train with the batches the run's own next round uses (arm b, the broadcast split).
        """
        who, adapters, weights = self._local_round(server, self.round + 1)
        ranks = self.cfg.ranks()
        outcome = server.aggregate(who, adapters, weights, client_ranks=[ranks[i] for i in who])
        return self._arm_row(server.dense_deltas(), server.dense, outcome.metrics())

    def _arm_row(
        self,
        deltas: Mapping[str, torch.Tensor],
        dense: Mapping[str, torch.Tensor],
        metrics: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The record of one arm's global model, with its aggregation error and certificate.

        Evaluated on the test set if there is one, else on the validation set.
        """
        examples = self.eval if self.round_test is None else self.round_test
        ev = self._evaluate_model(self._global_model(deltas, dense), examples)
        return {
            "split": "validation" if self.round_test is None else "test",
            "accuracy": ev["accuracy"],
            "loss": ev["eval_loss"],
            "aggregation_error": metrics["aggregation_error"],
            "certified_residual": metrics["certified_residual"],
        }

    def _global_model(
        self, deltas: Mapping[str, torch.Tensor], dense: Mapping[str, torch.Tensor]
    ) -> torch.nn.Module:
        """Base + dense folds + ``deltas`` + averaged head, in the one evaluation model."""
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self.base)
        return merged_model(self.base, deltas, dense, into=self._eval_model)

    def _evaluate_model(self, model: torch.nn.Module, examples: Examples) -> dict[str, float]:
        """``accuracy``, ``eval_loss`` (and ``mcc``, classification) of ``model``."""
        if self.cfg.objective == "causal_lm":
            acc, loss = lm_evaluate(
                model, self.tok, self.cfg.task, examples, max_len=self.cfg.max_len,
                device=self.device,
            )  # fmt: skip
            return {"accuracy": acc, "eval_loss": loss}
        return evaluate_classifier(
            model, self.tok, examples, max_len=self.cfg.max_len, device=self.device,
            encoder=self.encoder,
        )  # fmt: skip

    def evaluate(
        self, examples: Examples | None = None, *, server: FederatedServer | None = None
    ) -> dict[str, float]:
        """``accuracy``, ``eval_loss`` (and ``mcc``, classification) of the global model.

        On ``examples`` (default: the validation set), of ``server`` (default: the run's).
        """
        server = self.server if server is None else server
        model = self._global_model(server.dense_deltas(), server.dense)
        return self._evaluate_model(model, self.eval if examples is None else examples)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write the checkpoint atomically: tensors first, then the JSON that points at them.

        The JSON is a manifest: the run's full configuration, the metrics so far, the tensor
        file's name and SHA-256, and a digest of the JSON itself, so that ``--resume`` can
        refuse a damaged or edited checkpoint.
        """
        write_checkpoint(self.out, self.round, self.server.state_tensors(), {
            "server": self.server.state_meta(),
            "config": asdict(self.cfg),
            "metrics": self.metrics,
        })  # fmt: skip

    def load(self) -> bool:
        """Restore the last checkpoint, if any (False: nothing to resume, start fresh).

        Raises
        ------
        CheckpointError
            One line saying what is wrong: tensors without their ``checkpoint.json``, a JSON
            or tensor file that is damaged or edited (digest or SHA-256 mismatch), a tensor
            path outside the run folder, inconsistent rounds, or a different configuration.
        """
        found = read_checkpoint(self.out)
        if found is None:
            return False
        meta, flat = found
        tensors = self.out / meta["tensors"]
        # More rounds may be asked for (fewer, down to the round reached); nothing else that
        # defines results may change.
        diff = differences(meta["config"], self.cfg, ignore=("rounds",))
        if diff:
            raise ConfigError(
                f"--resume: the checkpoint in {self.out} was made with other settings "
                f"({'; '.join(diff[:5])}); use another --out or the same settings"
            )
        if int(meta["round"]) > self.cfg.rounds:
            raise ConfigError(
                f"--resume: the checkpoint in {self.out} has reached round {meta['round']}, past "
                f"the {self.cfg.rounds} rounds asked for; ask for at least {meta['round']} "
                "rounds, or use another --out"
            )
        self.round = int(meta["round"])
        self.metrics = list(meta["metrics"])
        restore_server(self.server, meta, flat, tensors)
        self._check_restored(flat, tensors)
        return True

    def _check_restored(self, flat: Mapping[str, torch.Tensor], tensors: Path) -> None:
        """Every restored value against this run: finite, floating point, the model's shapes.

        The hashes prove the files are the ones written; this proves they can be what this
        run writes (a NaN update, an Inf head or a wrong-shaped factor is refused).
        """
        for key, v in flat.items():
            if key.endswith("round_index"):
                continue
            if not v.is_floating_point():
                raise CheckpointError(f"{tensors}: tensor {key!r} is {v.dtype}, not floating point")
            if not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{tensors}: tensor {key!r} has NaN/Inf entries")
        base = self.base.state_dict()
        top = sum(self.cfg.ranks())  # no update or readout can exceed the clients' total rank
        srv = self.server
        factors = [(n, f) for n, f in srv.global_update.items()]
        factors += [(n, f) for init in srv.client_init.values() for n, f in init.items()]
        for name, f in factors:
            w = base.get(f"{name}.weight")
            if w is None or w.ndim != 2:
                raise CheckpointError(f"{tensors}: module {name!r} is not a LoRA target here")
            if (f.shape != tuple(w.shape) and f.shape != tuple(w.shape)[::-1]) or f.rank > top:
                raise CheckpointError(
                    f"{tensors}: module {name!r} has factors {tuple(f.B.shape)} x "
                    f"{tuple(f.A.shape)}, the model's weight is {tuple(w.shape)}"
                )
        for name, fold in srv.base_fold.items():
            w = base.get(f"{name}.weight")
            if w is None or tuple(fold.shape) != tuple(w.shape):
                raise CheckpointError(f"{tensors}: base fold of {name!r} does not fit the model")
        for key, v in srv.dense.items():
            plain = key.replace("modules_to_save.default.", "")
            if plain in base and tuple(base[plain].shape) != tuple(v.shape):
                raise CheckpointError(f"{tensors}: head {key!r} has shape {tuple(v.shape)}")

    def _show_progress(self, bar: Any, done: int, total: int) -> None:
        bar.set_postfix_str(f"round {self.round + 1}: client {done}/{total} trained")

    def run(self, *, resume: bool = False) -> list[dict[str, Any]]:
        """Run the remaining rounds, checkpointing after each; write results and plots.

        The run folder is held for the whole run: a second process on the same folder is
        refused before it trains or writes anything
        (:class:`~integration.runner.files.FolderInUseError`) rather than interleaving its
        checkpoints with this one's.
        """
        with held(self.out, wait=False):
            if resume:
                self.load()
            # disable=None: no bar when stderr is not a terminal (logs, notebooks, CI)
            bar = tqdm(range(self.round, self.cfg.rounds), desc=f"{self.cfg.operator}",
                       unit="round", disable=None)  # fmt: skip
            for _ in bar:
                self._progress = functools.partial(self._show_progress, bar)
                row = self.step()
                self.save()
                if self.cfg.save_every_round:
                    self.save_adapter(self.out / "rounds" / str(self.round))
                bar.set_postfix(acc=f"{row['accuracy']:.3f}",
                                agg_err=f"{row['aggregation_error']:.2e}")  # fmt: skip
            written = self.save_adapter(self.out / "global_adapter")
            extra = {"label_names": self.label_names,
                     "global_adapter": [str(p.relative_to(self.out)) for p in written]}  # fmt: skip
            write_results(self.out, self.cfg, self.metrics, extra)
        return self.metrics

    def base_model(self) -> str | None:
        """The base model's name or path as an adapter names it (None: a random test model)."""
        return self.cfg.base_model_path()

    def save_adapter(self, folder: Path) -> list[Path]:
        """The current global model as a peft adapter folder (``PeftModel.from_pretrained``).

        Written to a fresh temporary folder first and moved into place, so that ``folder``
        never holds a mix of two rounds' files.
        """
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        written = self.server.save_global_adapter(
            tmp, self._config_dict(max(self.cfg.ranks())), base_model=self.base_model()
        )
        if folder.exists():
            shutil.rmtree(folder)
        if tmp.exists():
            tmp.rename(folder)
        return [folder / p.name for p in written]


def write_results(
    out: Path,
    cfg: SimConfig,
    metrics: list[dict[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """results.json (config, versions, metrics and ``extra``) and PNG plots per round."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": asdict(cfg), "versions": versions(), "metrics": metrics, **(extra or {})}
    write_text_atomic(out / "results.json", json.dumps(doc, indent=2))
    if not metrics:
        return
    # The object-oriented API: no pyplot, no global backend change (a notebook keeps its own).
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy, only needed for the plots
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    rounds = [m["round"] for m in metrics]
    task = Path(cfg.train_file).name if cfg.train_file else cfg.task
    for key, fname, ylabel, title in (
        ("accuracy", "accuracy.png", "accuracy", "global model accuracy"),
        ("aggregation_error", "aggregation_error.png", "relative error to the mean update",
         "server update vs the exact mean update"),
    ):  # fmt: skip
        fig = Figure(figsize=(5, 3.4))
        ax = fig.subplots()
        ax.plot(rounds, [m[key] for m in metrics], marker="o", label=cfg.operator)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{task}, {cfg.clients} clients, {cfg.operator}", fontsize=9)
        if key == "aggregation_error":
            ax.set_yscale("symlog", linthresh=1e-16)
        ax.legend()
        fig.tight_layout()
        write_atomic(out / fname, functools.partial(fig.savefig, dpi=100, format="png"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m integration.simulate`` / ``glora simulate``."""
    cfg, resume = parse_args(argv)
    try:
        metrics = Simulation(cfg).run(resume=resume)
    except GloraError as err:  # bad data, a changed config on --resume, a refused round
        sys.stderr.write(f"glora simulate: error: {err}\n")
        return 2
    last = metrics[-1] if metrics else {}
    print(json.dumps({"operator": cfg.operator, "final": last}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
