"""Aggregation benchmark: the read-once floor, GLoRA, FlexLoRA and the dense path, in one run.

For every size (d = k, N clients, rank r, server rank R = r) the same float32 client factors are
aggregated by

- ``fedit``: average the B's and the A's (FedIT): one read of the factors, the floor;
- ``gram_floor``: the least any exact consensus does on one side: the Gram matrix ``M^T M`` of
  the stacked weighted B's (float64, as the implicit route forms it) and its ``eigh`` (issue 33's
  floor; the exact routes are reported as multiples of it);
- ``glora_exact``: GLoRA with the exact consensus subspace, certified (the default);
- ``glora_uncertified``: the same with ``certify=False`` (the certificate's cost is the gap);
- ``glora_auto``: the side-aware GLoRA (both sides' consensus and certificate, ours);
- ``glora_sketch``: GLoRA with the randomized consensus (:class:`glora_math.Sketch`);
- ``glora_sketch_estimate``: the same with the certificate estimated from Gaussian probes
  (``Sketch(certificate="estimate")``, P15), linear in N;
- ``flexlora_factors``: FlexLoRA's truncated SVD of the mean, computed from the factors;
- ``dense``: what FlexLoRA's public code does: form the d x k mean, full SVD, truncate.

Reported per size and method: the median wall time over repeats, the ratios to FedIT and to
the dense path, and the peak *extra* memory of one call (resident memory on the CPU, the CUDA
allocator's peak on a GPU) next to the size of the client factors, N r (d + k) floats, and of
one dense update, d k floats. For the sketch, its subspace error against the exact consensus
(``||P_sketch - P_exact||_F / sqrt(2R)``, the root-mean-square sine of the principal angles)
and the relative difference of the two server updates. A least-squares fit of
``log t = c + a log N + b log r + e log d`` over the grid gives each method's scaling
exponents. Results go to a JSON file and a printed table.

Run ``python -m bench.aggregate`` (full grid, about 15 min on 2 CPU cores, most of it the dense
SVDs), ``--quick`` for a smoke run, ``--llama`` for the whole-model LLaMA-7B-shaped set.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from glora_math import LoRAFactors, Sketch, aggregate_modules, fedit, glora_aggregate
from glora_math.baselines import flexlora
from glora_math.linalg import lowrank_fro_norm, projector_distance

METHODS = (
    "fedit",
    "gram_floor",
    "glora_exact",
    "glora_uncertified",
    "glora_sketch",
    "glora_sketch_estimate",
    "glora_auto",
    "flexlora_factors",
    "dense",
)
SKETCH = Sketch(oversample=10, power_iters=2, seed=0)
#: The same sketch with the randomized certificate estimate (P15: linear in N).
SKETCH_ESTIMATE = Sketch(oversample=10, power_iters=2, seed=0, certificate="estimate")


# ----------------------------------------------------------------------------------------------
# Inputs


def make_clients(
    n: int, d: int, k: int, r: int, *, seed: int, device: torch.device
) -> list[LoRAFactors]:
    """float32 clients sharing an r-dim subspace plus private noise (a gapped consensus)."""
    g = torch.Generator().manual_seed(seed)
    shared, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
    out = []
    for _ in range(n):
        B = shared @ torch.randn(r, r, generator=g) + 0.3 * torch.randn(d, r, generator=g) / d**0.5
        A = torch.randn(r, k, generator=g) / k**0.5
        out.append(LoRAFactors(B.to(device), A.to(device)))
    return out


def dense_path(clients: Sequence[LoRAFactors], rank: int) -> LoRAFactors:
    """Form the mean update (d x k), take its full SVD, truncate to ``rank``."""
    W = clients[0].B @ clients[0].A
    for f in clients[1:]:
        W.addmm_(f.B, f.A)
    W /= len(clients)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return LoRAFactors(U[:, :rank] * s[:rank], Vh[:rank])


def gram_floor(clients: Sequence[LoRAFactors]) -> torch.Tensor:
    """``eigh`` of the Gram matrix of ``[sqrt(p_i) B_i]`` (equal weights), in float64."""
    n = len(clients)
    M = torch.cat([f.B.to(torch.float64) for f in clients], dim=1) / n**0.5
    eigvals: torch.Tensor = torch.linalg.eigh(M.mT @ M)[0]
    return eigvals


def runners(clients: Sequence[LoRAFactors], R: int) -> dict[str, Callable[[], object]]:
    """The benchmarked calls on one set of clients, by method name."""
    return {
        "fedit": lambda: fedit(clients),
        "gram_floor": lambda: gram_floor(clients),
        "glora_exact": lambda: glora_aggregate(clients, rank=R),
        "glora_sketch": lambda: glora_aggregate(clients, rank=R, sketch=SKETCH),
        "glora_sketch_estimate": lambda: glora_aggregate(clients, rank=R, sketch=SKETCH_ESTIMATE),
        "glora_uncertified": lambda: glora_aggregate(clients, rank=R, certify=False),
        "glora_auto": lambda: glora_aggregate(clients, rank=R, side="auto"),
        "flexlora_factors": lambda: flexlora(clients),
        "dense": lambda: dense_path(clients, R),
    }


# ----------------------------------------------------------------------------------------------
# Measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")  # pragma: no cover


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory one call adds on top of what is resident before it.

    CUDA: the allocator's peak minus its current allocation. CPU (Linux): the resident-set
    high-water mark, reset through ``/proc/self/clear_refs``, minus the resident set before
    the call, after returning freed heap pages to the OS. ``None`` where neither is available.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        del out
        return int(torch.cuda.max_memory_allocated(device) - base)
    try:
        _trim()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _proc_kib("VmRSS")
        out = fn()
        peak = _proc_kib("VmHWM")
        del out
        _trim()
        return max(peak - base, 0) * 1024
    except OSError:  # pragma: no cover - not Linux
        return None


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``repeats`` calls after one warm-up (device synchronised)."""
    fn()  # warm-up: allocator, kernels, lazy imports
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sketch_accuracy(clients: Sequence[LoRAFactors], R: int) -> tuple[float, float]:
    """(RMS sine of the principal angles, relative update difference) of sketch vs exact."""
    ex = glora_aggregate(clients, rank=R)
    sk = glora_aggregate(clients, rank=R, sketch=SKETCH)
    sin_rms = projector_distance(ex.U.double(), sk.U.double()) / math.sqrt(2 * R)
    diff = lowrank_fro_norm(
        torch.cat([ex.U, -sk.U], dim=1).double(), torch.cat([ex.S, sk.S], dim=0).double()
    )
    return sin_rms, diff / lowrank_fro_norm(ex.U.double(), ex.S.double())


@dataclass
class Row:
    """One benchmarked size: times, peak memory and the sketch's accuracy."""

    d: int
    k: int
    n: int
    r: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_extra_bytes: dict[str, int | None] = field(default_factory=dict)
    sketch_sin_rms: float = math.nan
    sketch_rel_update_diff: float = math.nan

    @property
    def factor_bytes(self) -> int:
        """Bytes of the client factors, N r (d + k) float32 numbers."""
        return 4 * self.n * self.r * (self.d + self.k)

    @property
    def dense_bytes(self) -> int:
        """Bytes of one dense d x k float32 update."""
        return 4 * self.d * self.k


def bench_size(
    d: int, n: int, r: int, *, methods: Sequence[str], repeats: int, dense_repeats: int,
    device: torch.device, seed: int,
) -> Row:  # fmt: skip
    """Time every method on one set of clients, then measure memory and sketch accuracy."""
    clients = make_clients(n, d, d, r, seed=seed, device=device)
    row = Row(d=d, k=d, n=n, r=r)
    run = runners(clients, r)
    for name in methods:
        reps = dense_repeats if name == "dense" else repeats
        row.seconds[name] = median_seconds(run[name], reps, device)
        row.peak_extra_bytes[name] = peak_extra_bytes(run[name], device)
    if "glora_sketch" in methods:
        row.sketch_sin_rms, row.sketch_rel_update_diff = sketch_accuracy(clients, r)
    return row


def fit_exponents(rows: Sequence[Row], method: str) -> dict[str, float] | None:
    """Least-squares exponents of ``t ~ N^a r^b d^e`` over the rows that timed ``method``."""
    pts = [(x.n, x.r, x.d, x.seconds[method]) for x in rows if method in x.seconds]
    cols = [i for i in range(3) if len({p[i] for p in pts}) > 1]
    if len(pts) < len(cols) + 2 or not cols:
        return None
    X = torch.tensor([[1.0] + [math.log(p[i]) for i in cols] for p in pts], dtype=torch.float64)
    y = torch.tensor([math.log(p[3]) for p in pts], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)
    names = ("N", "r", "d")
    return {names[c]: round(float(coef[j + 1]), 2) for j, c in enumerate(cols)}


# ----------------------------------------------------------------------------------------------
# Whole model: a LLaMA-7B-shaped adapter set, batched by shape

LLAMA_7B_SHAPES = {  # (d, k) of the update -> modules per model (32 layers)
    (4096, 4096): 4 * 32,  # q, k, v, o
    (11008, 4096): 2 * 32,  # gate, up (out x in)
    (4096, 11008): 1 * 32,  # down
}


#: What the LLaMA-7B-shaped set measures. Two operators as the peft path, the runner and Flower
#: call one on a whole model (``aggregate_modules``): ``default_glora_auto``, ``glora_auto``, the
#: default operator when this benchmark was written (the name is kept so that saved results
#: still read), and ``flexlora_modules``, FlexLoRA, the default since study F's rule chose it.
LLAMA_METHODS = ("fedit", "gram_floor", "glora_exact", "glora_sketch", "glora_exact_certified",
                 "glora_sketch_estimate", "default_glora_auto", "flexlora_modules")  # fmt: skip


def bench_llama(
    *, n: int, r: int, repeats: int, device: torch.device, seed: int, layers: int = 32
) -> dict[str, Any]:
    """Whole-model aggregation, one batched call per distinct module shape."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for (d, k), count in LLAMA_7B_SHAPES.items():
        L = count * layers // 32
        # As in make_clients: a shared r-dim subspace per module plus private noise.
        shared, _ = torch.linalg.qr(torch.randn(L, d, r, generator=g))
        Bs = [
            (shared @ torch.randn(L, r, r, generator=g) + 0.3 * torch.randn(L, d, r, generator=g)
             / d**0.5).to(device)
            for _ in range(n)
        ]  # fmt: skip
        As = [(torch.randn(L, r, k, generator=g) / k**0.5).to(device) for _ in range(n)]
        groups.append((Bs, As))
    out: dict[str, Any] = {
        "modules": sum(c * layers // 32 for c in LLAMA_7B_SHAPES.values()),
        "n": n,
        "r": r,
        "factor_bytes": sum(
            4 * n * r * (d + k) * c * layers // 32 for (d, k), c in LLAMA_7B_SHAPES.items()
        ),
    }

    def fedit_all() -> None:
        for Bs, As in groups:
            torch.stack(Bs).mean(0), torch.stack(As).mean(0)

    stacks = [[LoRAFactors(B, A) for B, A in zip(Bs, As, strict=True)] for Bs, As in groups]

    def floor_all() -> None:
        # One side's floor per module, batched per shape: the float64 Gram of the stacked
        # B's and its eigenvalues (as gram_floor in the grid).
        for Bs, _ in groups:
            M = torch.cat([B.to(torch.float64) for B in Bs], dim=-1) / len(Bs) ** 0.5
            torch.linalg.eigh(M.mT @ M)

    def glora_all(sketch: Sketch | None, *, certify: bool = False) -> Callable[[], None]:
        def run() -> None:
            for clients in stacks:  # one stacked call per distinct module shape
                glora_aggregate(clients, rank=r, sketch=sketch, certify=certify)

        return run

    # The default operator on the whole model, as the peft path, the runner and Flower call it:
    # one round over every module (glora_auto: both sides, certified; same-shape modules in one
    # batched glora_aggregate_stack call, with per-client readouts).
    modules = {
        f"{d}x{k}.{layer}": [LoRAFactors(B[layer], A[layer]) for B, A in zip(Bs, As, strict=True)]
        for ((d, k), _), (Bs, As) in zip(LLAMA_7B_SHAPES.items(), groups, strict=True)
        for layer in range(Bs[0].shape[0])
    }

    def default_all() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aggregate_modules(modules, operator="glora_auto", rank=r)

    def flexlora_all() -> None:
        aggregate_modules(modules, operator="flexlora", rank=r)

    for name, fn in (
        ("fedit", fedit_all),
        ("gram_floor", floor_all),
        ("glora_exact", glora_all(None)),
        ("glora_sketch", glora_all(SKETCH)),
        ("glora_exact_certified", glora_all(None, certify=True)),
        ("glora_sketch_estimate", glora_all(SKETCH_ESTIMATE, certify=True)),
        ("default_glora_auto", default_all),
        ("flexlora_modules", flexlora_all),
    ):
        out[f"{name}_seconds"] = median_seconds(fn, repeats, device)
        out[f"{name}_peak_extra_bytes"] = peak_extra_bytes(fn, device)
    return out


# ----------------------------------------------------------------------------------------------
# Report


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def table(rows: Sequence[Row], methods: Sequence[str]) -> str:
    """Markdown table of times and ratios."""
    head = ["d", "N", "r"] + [f"{m} ms" for m in methods]
    head += ["glora_exact/fedit", "glora_exact/floor", "glora_auto/floor", "glora_sketch/fedit",
             "sketch_estimate/fedit", "dense/glora_exact", "sketch sin"]  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for x in rows:
        cells = [str(x.d), str(x.n), str(x.r)]
        cells += [f"{x.seconds[m] * 1e3:.1f}" if m in x.seconds else "-" for m in methods]

        def ratio(a: str, b: str, row: Row = x) -> str:
            if a in row.seconds and b in row.seconds:
                return f"{row.seconds[a] / row.seconds[b]:.1f}"
            return "-"

        cells += [
            ratio("glora_exact", "fedit"),
            ratio("glora_exact", "gram_floor"),
            ratio("glora_auto", "gram_floor"),
            ratio("glora_sketch", "fedit"),
            ratio("glora_sketch_estimate", "fedit"),
            ratio("dense", "glora_exact"),
            f"{x.sketch_sin_rms:.1e}",
        ]
        lines.append(" | ".join(cells))
    return "\n".join("| " + line + " |" for line in lines)


def memory_table(rows: Sequence[Row], methods: Sequence[str]) -> str:
    """Markdown table of peak extra memory next to the input sizes."""
    head = ["d", "N", "r", "factors MiB", "one d x k MiB"] + [f"{m} MiB" for m in methods]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for x in rows:
        cells = [str(x.d), str(x.n), str(x.r), _mib(x.factor_bytes), _mib(x.dense_bytes)]
        cells += [_mib(x.peak_extra_bytes.get(m)) for m in methods]
        lines.append(" | ".join(cells))
    return "\n".join("| " + line + " |" for line in lines)


def report(result: Mapping[str, Any]) -> str:
    """Markdown tables (times, ratios, memory, exponents, LLaMA set) of a saved result."""
    rows = []
    for x in result["rows"]:
        row = Row(d=x["d"], k=x["k"], n=x["n"], r=x["r"], seconds=x["seconds"],
                  peak_extra_bytes=x["peak_extra_bytes"], sketch_sin_rms=x["sketch_sin_rms"],
                  sketch_rel_update_diff=x["sketch_rel_update_diff"])  # fmt: skip
        rows.append(row)
    methods = [m for m in METHODS if any(m in x.seconds for x in rows)]
    out = [f"Machine: {result['machine']}", "", table(rows, methods), "",
           memory_table(rows, methods), "", "Scaling exponents (t ~ N^a r^b d^e):", ""]  # fmt: skip
    out += [f"- {m}: {e}" for m, e in result["exponents"].items()]
    ll = result.get("llama7b")
    if ll:
        out += ["", f"LLaMA-7B-shaped set ({ll['modules']} modules, N={ll['n']}, r={ll['r']}, "
                f"factors {_mib(ll['factor_bytes'])} MiB):", ""]  # fmt: skip
        out += [
            f"- {m}: {ll[m + '_seconds']:.2f} s ({ll[m + '_seconds'] / ll['fedit_seconds']:.1f}x "
            f"FedIT"
            + (
                f", {ll[m + '_seconds'] / ll['gram_floor_seconds']:.2f}x the floor"
                if "gram_floor_seconds" in ll
                else ""
            )
            + f"), peak extra {_mib(ll[m + '_peak_extra_bytes'])} MiB"
            for m in LLAMA_METHODS
            if m + "_seconds" in ll
        ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the grid (and the LLaMA-7B-shaped set), print and save."""
    ap = argparse.ArgumentParser(prog="python -m bench.aggregate", description=__doc__)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dense-repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    ap.add_argument("--llama", action="store_true", help="also the LLaMA-7B-shaped model set")
    ap.add_argument("--llama-layers", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/aggregate.json"))
    ap.add_argument("--report", type=Path, default=None, help="print the tables of a saved JSON")
    args = ap.parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    if args.quick:
        args.dims, args.clients, args.ranks = [128], [4, 8], [4]
        args.repeats = args.dense_repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for d in args.dims:
        for n in args.clients:
            for r in args.ranks:
                row = bench_size(
                    d, n, r, methods=args.methods, repeats=args.repeats,
                    dense_repeats=args.dense_repeats, device=device, seed=args.seed,
                )  # fmt: skip
                rows.append(row)
                print(f"d={d} N={n} r={r}: " + ", ".join(
                    f"{m} {row.seconds[m] * 1e3:.1f} ms" for m in args.methods
                ), file=sys.stderr, flush=True)  # fmt: skip
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device)
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        },
        "sketch": asdict(SKETCH),
        "rows": [
            {**asdict(x), "factor_bytes": x.factor_bytes, "dense_bytes": x.dense_bytes}
            for x in rows
        ],
        "exponents": {m: fit_exponents(rows, m) for m in args.methods},
    }
    if args.llama:
        result["llama7b"] = bench_llama(
            n=16, r=16, repeats=max(1, min(args.repeats, 3)), device=device, seed=args.seed,
            layers=args.llama_layers,
        )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(rows, args.methods))
    print()
    print(memory_table(rows, args.methods))
    print()
    print("scaling exponents (t ~ N^a r^b d^e):")
    for m, e in result["exponents"].items():
        print(f"  {m}: {e}")
    if args.llama:
        ll = result["llama7b"]
        print(
            f"LLaMA-7B-shaped set ({ll['modules']} modules, N={ll['n']}, r={ll['r']}, "
            f"factors {_mib(ll['factor_bytes'])} MiB): "
            + ", ".join(
                f"{m} {ll[m + '_seconds']:.2f} s (+{_mib(ll[m + '_peak_extra_bytes'])} MiB)"
                for m in LLAMA_METHODS
            )
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
