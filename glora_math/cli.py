"""Command-line interface: ``glora demo`` (and ``python -m glora_math demo``)."""

from __future__ import annotations

import argparse
import importlib
import math
import shutil
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from glora_math import __version__
from glora_math.aggregate import glora_aggregate
from glora_math.baselines import fedit
from glora_math.compare import compare_operators
from glora_math.errors import GloraError, GloraWarning
from glora_math.formatting import format_table
from glora_math.gauge import apply_gauge, random_invertible
from glora_math.metrics import (
    best_rank_approx,
    fro_distance,
    fro_norm,
    mean_update,
    state_factors,
)
from glora_math.operators import list_operators
from glora_math.readout import eckart_young_error, readout
from glora_math.synthetic import random_clients, shared_init_clients
from glora_math.types import GaugeMode, LoRAFactors, Side

Operator = Callable[[list[LoRAFactors]], LoRAFactors]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _gauged(clients: list[LoRAFactors], cond: float, gen: torch.Generator) -> list[LoRAFactors]:
    return [
        apply_gauge(f, random_invertible(f.rank, cond=cond, generator=gen, dtype=f.B.dtype))
        for f in clients
    ]


def run_demo(args: argparse.Namespace) -> str:
    """Build the demo report (a string) from parsed arguments."""
    dtype = _DTYPES[args.dtype]
    clients = random_clients(
        n_clients=args.clients,
        d=args.d,
        k=args.k,
        rank=args.rank,
        shared_dim=args.shared_dim,
        heterogeneity=args.heterogeneity,
        seed=args.seed,
        dtype=dtype,
    )
    mean = mean_update(clients)
    mean_norm = fro_norm(mean)
    gen = torch.Generator().manual_seed(args.seed + 1)
    draws = [_gauged(clients, args.gauge_cond, gen) for _ in range(args.trials)]
    total_rank = args.clients * args.rank

    R = args.server_rank
    ops: list[tuple[str, Operator]] = [
        ("FedIT (factor averaging)", fedit),
        (f"GLoRA (qr) R={R}", _GloraOp(R, "qr")),
        (f"GLoRA (svd) R={R}", _GloraOp(R, "svd")),
        (f"GLoRA side=auto R={R} (ours)", _GloraOp(R, "qr", "auto")),
        (f"GLoRA (qr) R={total_rank} = N*r", _GloraOp(total_rank, "qr")),
    ]
    rows = _accuracy_rows(ops, clients, draws)
    floor = fro_distance(best_rank_approx(mean, R), mean) / mean_norm
    rows.append([f"best rank-{R} of W_bar (floor)", "-", f"{floor:.2e}", "-"])
    trap = shared_init_clients(
        n_clients=args.clients, d=args.d, k=args.k, rank=args.rank, seed=args.seed, dtype=dtype
    )
    trap_draws = [_gauged(trap, args.gauge_cond, gen) for _ in range(args.trials)]
    trap_ops: list[tuple[str, Operator]] = [
        ("FedIT (factor averaging)", fedit),
        (f"GLoRA (qr) R={args.rank} (paper)", _GloraOp(args.rank, "qr")),
        (f"GLoRA side=auto R={args.rank} (ours)", _GloraOp(args.rank, "qr", "auto")),
    ]
    trap_rows = _accuracy_rows(trap_ops, trap, trap_draws)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = glora_aggregate(clients, rank=args.server_rank)
    server = state_factors(state)
    server_norm = fro_norm(server)
    ro_rows = []
    ranks = sorted({1, 2, args.rank, args.server_rank // 2, args.server_rank} - {0})
    for r in ranks:
        ro = readout(state, r)
        ro_rows.append(
            [
                str(r),
                f"{fro_distance(ro, server) / server_norm:.6e}",
                f"{eckart_young_error(state, r) / server_norm:.6e}",
                f"{fro_distance(ro, mean) / mean_norm:.3e}",
            ]
        )
    head = (
        f"glora-math demo: N={args.clients} clients, d={args.d}, k={args.k}, client rank "
        f"r={args.rank}, server rank R={args.server_rank}, {args.dtype}, seed {args.seed}\n"
        f"Client subspaces share a {args.shared_dim}-dim subspace, heterogeneity "
        f"{args.heterogeneity}. Gauges: {args.trials} draws of independent random G_i in GL(r) "
        f"with cond(G_i) = {args.gauge_cond:g}, (B_i, A_i) -> (B_i G_i, G_i^-1 A_i).\n"
        f"W_bar = exact mean update; gap at R: {state.gap:.3e}."
    )
    cols = [
        "operator",
        "change under gauges / |W_bar|",
        "error to W_bar / |W_bar|",
        "certified (GLoRA)",
    ]
    t1 = format_table(cols, rows)
    t3 = format_table(cols, trap_rows)
    t2 = format_table(
        [
            "readout rank",
            "|B A - U S| / |U S|",
            "Eckart-Young sqrt(sum s_j^2, j>r)",
            "error to W_bar",
        ],
        ro_rows,
    )
    third = _wrap(
        f"3. The shared-init regime (every round's start: A_i = A_0 + 1% noise, B_i small and "
        f"independent; r = R = {args.rank}): the paper's left consensus is flat and its "
        "certificate says so; side=auto keeps the row spaces"
    )
    return (
        "\n".join(_wrap(line) for line in head.splitlines())
        + f"\n\n1. Gauge invariance and accuracy\n{t1}\n\n"
        f"2. Rank-compatible readout from one GLoRA state (R={args.server_rank})\n{t2}\n\n"
        f"{third}\n{t3}\n"
    )


class _GloraOp:
    """GLoRA as a factors-to-factors operator that remembers its last certificate."""

    def __init__(self, rank: int, gauge: GaugeMode, side: Side = "left") -> None:
        self.rank, self.gauge, self.side = rank, gauge, side
        self.certified: float | None = None

    def __call__(self, cs: list[LoRAFactors]) -> LoRAFactors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GloraWarning)
            state = glora_aggregate(cs, rank=self.rank, gauge=self.gauge, side=self.side)
        self.certified = state.relative_residual
        return state_factors(state)


def _accuracy_rows(
    ops: Sequence[tuple[str, Operator]],
    clients: list[LoRAFactors],
    draws: Sequence[list[LoRAFactors]],
) -> list[list[str]]:
    """Per operator: largest change under the gauge draws, error to W_bar, its certificate."""
    mean = mean_update(clients)
    mean_norm = fro_norm(mean)
    rows = []
    for name, op in ops:
        base = op(clients)
        cert = op.certified if isinstance(op, _GloraOp) else None
        change = max(fro_distance(op(g), base) for g in draws) / mean_norm
        err = fro_distance(base, mean) / mean_norm
        rows.append([name, f"{change:.2e}", f"{err:.2e}", "-" if cert is None else f"{cert:.2e}"])
    return rows


def adapter_clients(folders: Sequence[str], module: str | None) -> tuple[list[LoRAFactors], str]:
    """One module's folded factors from peft adapter folders (safetensors and JSON only)."""
    try:
        io = importlib.import_module("glora_math.integration.peft.io")
    except ImportError as err:
        raise GloraError(f"--adapters needs the integration extra: {err}") from None
    adapters = [io.load_adapter(f, client=i) for i, f in enumerate(folders)]
    names = sorted(adapters[0].modules)
    name = module or names[0]
    for i, a in enumerate(adapters):
        if name not in a.modules:
            raise GloraError(f"client {i}: {folders[i]} has no module {name!r} (its modules: "
                             f"{', '.join(sorted(a.modules)[:6])} ...)")  # fmt: skip
    others = f"; --module picks one of {len(names)}" if len(names) > 1 else ""
    return [
        a.modules[name].factors for a in adapters
    ], f"module {name!r} of {len(folders)} adapter folders{others}"


def load_clients(path: str) -> tuple[list[LoRAFactors], torch.Tensor | None]:
    """Client factors from a safetensors file: ``clients.<i>.B``, ``clients.<i>.A``, ``weights``.

    Only safetensors is read (never pickle): client payloads are untrusted.
    """
    try:
        from safetensors.torch import load_file  # noqa: PLC0415 - optional 'io' extra
    except ImportError as err:  # pragma: no cover - the io extra is installed by make
        raise SystemExit(
            "loading client factors needs safetensors: pip install safetensors"
        ) from err
    try:
        flat = load_file(path)
    except Exception as err:  # a missing, truncated or foreign file (safetensors' own error)
        raise GloraError(
            f"{path}: cannot read safetensors ({type(err).__name__}: {err})"[:300]
        ) from None
    found: set[int] = set()
    for key in flat:
        parts = key.split(".")
        if key.startswith("clients.") and (len(parts) != 3 or not parts[1].isdigit()):
            raise GloraError(f"{path}: tensor {key[:60]!r} is not clients.<i>.B or clients.<i>.A")
        if key.startswith("clients."):
            found.add(int(parts[1]))
    ids = sorted(found)
    if not ids:
        raise GloraError(f"{path}: no 'clients.<i>.B' / 'clients.<i>.A' tensors found")
    clients = []
    for i in ids:
        try:
            clients.append(LoRAFactors(flat[f"clients.{i}.B"], flat[f"clients.{i}.A"]))
        except KeyError as err:
            raise GloraError(f"{path}: missing tensor {err.args[0]}", client=i) from None
        except GloraError as err:
            raise err.with_context(client=i) from None
    return clients, flat.get("weights")


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "n/a" if x is None else format(x, spec)


def run_compare(args: argparse.Namespace) -> str:
    """Build the comparison report (a string) from parsed arguments."""
    weights: torch.Tensor | None = None
    if args.adapters:
        clients, source = adapter_clients(args.adapters, args.module)
        weights = None if args.weights is None else torch.tensor(args.weights, dtype=torch.float64)
    elif args.load:
        clients, weights = load_clients(args.load)
        source = f"loaded from {args.load}"
    else:
        ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else args.rank
        clients = random_clients(
            n_clients=args.clients,
            d=args.d,
            k=args.k,
            rank=ranks,
            shared_dim=args.shared_dim,
            heterogeneity=args.heterogeneity,
            seed=args.seed,
            dtype=_DTYPES[args.dtype],
        )
        source = (
            f"random: N={args.clients}, d={args.d}, k={args.k}, ranks "
            f"{ranks}, heterogeneity {args.heterogeneity}, seed {args.seed}"
        )
    names = args.operators.split(",") if args.operators else None
    rows = compare_operators(
        clients,
        weights,
        rank=args.server_rank,
        names=names,
        trials=args.trials,
        cond=args.gauge_cond,
        seed=args.seed,
    )
    table = format_table(
        ["operator", "error to W_bar", "GL-gauge change", "O-gauge change", "floats up",
         "floats down", "time ms", "note"],
        [
            [
                row.name,
                _fmt(row.error),
                _fmt(row.sensitivity_gl),
                _fmt(row.sensitivity_o),
                str(row.up),
                str(row.down),
                _fmt(row.time_ms, ".2f"),
                "refused" if row.error is None else "reconstr." if row.note else "",
            ]
            for row in rows
        ],
    )  # fmt: skip
    refused = [f"{row.name}: {row.note}" for row in rows if row.error is None and row.note]
    d, k = clients[0].shape
    head = (
        f"glora-math compare: clients {source}; server rank R={args.server_rank}. Errors and "
        f"gauge changes are relative to |W_bar| (W_bar = exact mean update); gauge changes are "
        f"the largest over {args.trials} draws of per-client gauges (GL: cond "
        f"{args.gauge_cond:g}). Communication: floats per client per round (d={d}, k={k}). "
        "Stateful FedRot starts from a warm reference (FedIT of these clients). Times: median "
        "of 3 runs on this machine."
    )
    papers = "Papers: " + "; ".join(
        f"{row.name} {row.paper.split(' (')[0]}"
        + (" (reconstructed)" if "recon" in row.note else "")
        for row in rows
    )
    notes = [_wrap(why) for why in refused] + [_wrap(papers)]
    return "\n".join([_wrap(head), "", table, "", *notes, ""])


#: The width the command's reports fit in.
WIDTH = 120


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=WIDTH, break_on_hyphens=False)


def _weight_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _bounded(
    kind: type[int] | type[float], low: float, high: float, what: str
) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` in ``[low, high]``, described as ``what``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _bounded(int, 1, math.inf, "an integer >= 1")
_non_negative_int = _bounded(int, 0, math.inf, "an integer >= 0")
_fraction = _bounded(float, 0.0, 1.0, "a number in [0, 1]")
_condition = _bounded(float, 1.0, math.inf, "a condition number >= 1")


def _rank_list(text: str) -> str:
    """An argparse type: comma-separated integers >= 1 (kept as text, parsed later)."""
    for part in text.split(","):
        _positive_int(part.strip())
    return text


def _operator_list(text: str) -> str:
    """An argparse type: comma-separated registered operator names."""
    known = list_operators()
    unknown = [n for n in (x.strip() for x in text.split(",")) if n and n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown operator(s) {unknown}; known: {known}")
    return text


def _problem_flags(p: argparse.ArgumentParser, *, trials: int) -> None:
    """The synthetic-problem flags shared by ``demo`` and ``compare``."""
    p.add_argument("--clients", type=_positive_int, default=8, help="number of clients N")
    p.add_argument("--d", type=_positive_int, default=256, help="rows of each update (out)")
    p.add_argument("--k", type=_positive_int, default=192, help="columns of each update (in)")
    p.add_argument("--rank", type=_positive_int, default=4, help="client LoRA rank r")
    p.add_argument("--server-rank", type=_positive_int, default=8, help="server rank R")
    p.add_argument("--shared-dim", type=_positive_int, default=6,
                   help="dimension of the subspace the clients share")  # fmt: skip
    p.add_argument("--heterogeneity", type=_fraction, default=0.5,
                   help="weight of each client's private directions, in [0, 1]")  # fmt: skip
    p.add_argument("--gauge-cond", type=_condition, default=10.0,
                   help="condition number of the random per-client gauges")  # fmt: skip
    p.add_argument("--trials", type=_positive_int, default=trials, help="random gauges drawn")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every draw")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float64", help="client dtype")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``glora`` command."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="glora",
        description="Gauge-invariant federated LoRA aggregation (glora-math).",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"glora-math {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="show gauge invariance and readout on random clients", formatter_class=fmt
    )
    _problem_flags(demo, trials=5)
    cmp = sub.add_parser(
        "compare", help="every registered operator on the same clients", formatter_class=fmt
    )
    cmp.add_argument("--load", help="safetensors file with clients.<i>.B/A (and weights)")
    cmp.add_argument(
        "--adapters",
        nargs="+",
        metavar="DIR",
        help="peft adapter folders, one per client (the integration extra)",
    )
    cmp.add_argument(
        "--module",
        help="with --adapters: the module to compare (default: the first; the report lists them)",
    )
    cmp.add_argument("--weights", type=_weight_list, help="with --adapters: client weights, "
                     "comma-separated (default: equal)")  # fmt: skip
    cmp.add_argument("--ranks", type=_rank_list,
                     help="comma-separated per-client ranks, e.g. 2,4,8")  # fmt: skip
    cmp.add_argument("--operators", type=_operator_list,
                     help="comma-separated operator names (default: all)")  # fmt: skip
    _problem_flags(cmp, trials=3)
    sub.add_parser(
        "simulate", help="federated fine-tuning run (see: glora simulate --help)", add_help=False
    )
    sub.add_parser(
        "aggregate",
        help="one round over peft adapter folders (see: glora aggregate --help)",
        add_help=False,
    )
    sub.add_parser(
        "data",
        help="the data folder layout of the built-in tasks, and a check of one (glora data DIR)",
        add_help=False,
    )
    sub.add_parser(
        "experiment",
        help="runs x seeds of a config, resumable, with its paired table "
        "(see: glora experiment --help)",
        add_help=False,
    )
    sub.add_parser(
        "flower",
        help="the Flower app: glora flower new DIR writes it, glora flower run runs it here",
        add_help=False,
    )
    nbs = sub.add_parser(
        "notebooks",
        help="write the study notebooks (.ipynb) to DIR; open them with jupyter notebook",
        formatter_class=fmt,
    )
    nbs.add_argument("dir", help="a new or empty folder")
    ver = sub.add_parser(
        "verify",
        help="symbolic proofs, high-precision checks and properties of P1-P16 and the lemmas",
        formatter_class=fmt,
    )
    ver.add_argument("--dps", type=_positive_int, default=50,
                     help="mpmath digits (>= 50 recommended)")  # fmt: skip
    ver.add_argument("--no-properties", action="store_true", help="skip the hypothesis runs")
    ver.add_argument(
        "--no-formal", action="store_true", help="skip compiling the Coq proofs (proofs/coq)"
    )
    ver.add_argument("--only", help="comma-separated proposition ids, e.g. P1,P3 (default: all)")
    return parser


def notebooks_folder() -> Path:
    """Where the study notebooks are: in the wheel (glora_math/notebooks) or a checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "notebooks", here.parent / "notebooks"):
        if any(folder.glob("[0-9]*.ipynb")):
            return folder
    raise FileNotFoundError("the study notebooks are not installed with this copy of glora-math")


def run_notebooks(args: argparse.Namespace) -> int:
    """Copy the study notebooks into a new or empty folder."""
    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.stderr.write(f"glora notebooks: error: {out} is not a new or empty folder\n")
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        for nb in sorted(notebooks_folder().glob("[0-9]*.ipynb")):
            shutil.copyfile(nb, out / nb.name)
    except OSError as err:
        sys.stderr.write(f"glora notebooks: error: {out}: {err.strerror or err}\n")
        return 2
    sys.stdout.write(f"wrote the study notebooks to {out}; open them with: jupyter notebook "
                     f"{out} (pip install 'glora-math[notebooks]' installs Jupyter)\n")  # fmt: skip
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Run :mod:`glora_math.proofs.verify` (the ``proofs`` extra: sympy and mpmath)."""
    try:
        verify = importlib.import_module("glora_math.proofs.verify")
    except ImportError as err:
        sys.stderr.write(f"glora verify needs the proofs and test extras: {err}\n")
        return 2
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    known = [p.id for p in verify.PROPOSITIONS]
    if only is not None and (not only or set(only) - set(known)):
        sys.stderr.write(
            f"glora verify: error: --only takes ids among {known}, got {args.only!r}\n"
        )
        return 2
    code: int = verify.main(
        dps=args.dps, properties=not args.no_properties, only=only, formal=not args.no_formal
    )
    return code


def _forward(command: str, module: str, argv: list[str]) -> int:
    """Run ``glora COMMAND`` from the integration layer's ``module`` (its ``main(argv)``)."""
    try:
        target = importlib.import_module(module)
    except ImportError as err:
        sys.stderr.write(f"glora {command} needs the integration extra: {err}\n")
        return 2
    code: int = target.main(argv)
    return code


def run_simulate(argv: list[str]) -> int:
    """Forward to :mod:`glora_math.integration.runner.simulate` (transformers and peft)."""
    return _forward("simulate", "glora_math.integration.runner.simulate", argv)


def run_aggregate(argv: list[str]) -> int:
    """Forward to :mod:`glora_math.integration.peft.aggregate` (peft adapter folders)."""
    return _forward("aggregate", "glora_math.integration.peft.aggregate", argv)


def run_data(argv: list[str]) -> int:
    """Forward to :mod:`glora_math.integration.data.check` (layout and check of a folder)."""
    return _forward("data", "glora_math.integration.data.check", argv)


def run_experiment(argv: list[str]) -> int:
    """Forward to :mod:`glora_math.integration.runner.experiment` (cells of runs x seeds)."""
    return _forward("experiment", "glora_math.integration.runner.experiment", argv)


def run_flower(argv: list[str]) -> int:
    """``glora flower run``: :mod:`glora_math.integration.flower.app`; ``new``: its ``cli``."""
    if argv[:1] == ["run"]:
        return _forward("flower", "glora_math.integration.flower.app", argv[1:])
    return _forward("flower", "glora_math.integration.flower.cli", argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``glora`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = {
        "simulate": run_simulate,
        "aggregate": run_aggregate,
        "flower": run_flower,
        "experiment": run_experiment,
        "data": run_data,
    }
    if argv[:1] and argv[0] in forwarded:  # commands of the integration layer
        return forwarded[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "demo": lambda a: _print(run_demo(a)),
        "compare": lambda a: _print(run_compare(a)),
        "verify": run_verify,
        "notebooks": run_notebooks,
    }
    try:
        return commands[args.command](args)
    except (GloraError, KeyError) as err:
        sys.stderr.write(f"glora: error: {err}\n")
        return 1


def _print(text: str) -> int:
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
