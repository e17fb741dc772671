"""Run an experiment config (operators x seeds) and write a results table (mean +- std).

``python -m integration.experiment integration/experiments/sst2_compare.json --device cuda``
writes ``<out>/<operator>-seed<k>/`` runs (resumable) and ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from integration.simulate import SimConfig, Simulation


def run_experiment(config: dict[str, Any], out: Path, device: str, resume: bool) -> str:
    """Run every (operator, seed) and return the markdown table."""
    rows = []
    for op in config["operators"]:
        finals = []
        for seed in config["seeds"]:
            run_dir = out / f"{op}-seed{seed}"
            cfg = SimConfig(
                **(
                    config["base"]
                    | {"operator": op, "seed": seed, "device": device, "out": str(run_dir)}
                )
            )
            metrics = Simulation(cfg).run(resume=resume)
            finals.append(metrics[-1])
        accs = [float(m["accuracy"]) for m in finals]
        errs = [float(m["aggregation_error"]) for m in finals]
        secs = [float(m["seconds"]) for m in finals]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(
            f"| {op} | {statistics.mean(accs):.4f} ± {std:.4f} | {statistics.mean(errs):.2e} | "
            f"{statistics.mean(secs):.1f} |"
        )
    head = (
        "| operator | final accuracy (mean ± std over seeds) | aggregation error, last round | "
        "seconds per round |\n| --- | --- | --- | --- |"
    )
    return head + "\n" + "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m integration.experiment", description=__doc__)
    p.add_argument("config")
    p.add_argument("--out", default="out/experiment")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    out = Path(args.out)
    table = run_experiment(config, out, args.device, args.resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{config.get('description', '')}\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
