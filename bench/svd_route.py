"""The SVD route crossover: the cost model's prediction against measured times.

``python -m bench.svd_route`` times both exact routes to the thin SVD of ``B A`` (the
factor route of :func:`glora_math.linalg.lowrank_svd`, and the dense product plus its SVD)
for growing stacked rank m at fixed (d, k), and prints, per m, the faster route measured and
the route :func:`glora_math.linalg.svd_route` predicts. Results go to
``bench/results/svd_route.json``; docs/benchmarks.md has the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from glora_math.linalg import lowrank_svd, svd_costs, svd_route


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(d: int, k: int, ms: Sequence[int], *, repeats: int, seed: int) -> list[dict[str, Any]]:
    """One row per m: both routes' median seconds, the measured and the predicted winner."""
    g = torch.Generator().manual_seed(seed)
    warm = torch.randn(d, k, generator=g)
    torch.linalg.svd(warm, full_matrices=False)  # LAPACK's first call pays its set-up
    rows = []
    for m in ms:
        B = torch.randn(d, m, generator=g)
        A = torch.randn(m, k, generator=g)
        t_f = _median_seconds(functools.partial(lowrank_svd, B, A, route="factors"), repeats)
        t_d = _median_seconds(functools.partial(lowrank_svd, B, A, route="dense"), repeats)
        cost = svd_costs(d, k, m)
        rows.append(
            {
                "d": d,
                "k": k,
                "m": m,
                "factors_seconds": t_f,
                "dense_seconds": t_d,
                "measured": "factors" if t_f <= t_d else "dense",
                "predicted": svd_route(d, k, m),
                "predicted_ratio": cost["dense"] / cost["factors"],
                "measured_ratio": t_d / t_f,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(prog="python -m bench.svd_route", description=__doc__)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--ms", default="16,64,256,512,768,960,1023")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/svd_route.json")
    a = ap.parse_args(argv)
    rows = measure(a.d, a.k, [int(x) for x in a.ms.split(",")], repeats=a.repeats, seed=a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
    head = ["m", "factors (ms)", "dense (ms)", "measured faster", "predicted",
            "dense/factors measured", "predicted"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['m']} | {1e3 * r['factors_seconds']:.1f} | {1e3 * r['dense_seconds']:.1f} | "
            f"{r['measured']} | {r['predicted']} | {r['measured_ratio']:.2f} | "
            f"{r['predicted_ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
