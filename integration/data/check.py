"""``glora data [DIR]``: the layout of a data folder for the built-in tasks, and a check of one.

Prints where each task's files belong (:data:`~.loaders.TASK_FILES`), then, for the folder
given (else ``$GLORA_DATA`` or a ``shared/data`` beside the checkout or the working folder),
whether each task loads: its rows and classes per split, or the one-line reason it does not.
Exit status 0 when every task loads, 1 otherwise, 2 when there is no folder at all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .loaders import TASK_FILES, DataError, default_data_dir, load_task


def check_data_dir(root: Path) -> dict[str, str]:
    """Per built-in task: ``"ok: ..."`` with rows and classes per split, or what is wrong."""
    out = {}
    for task in TASK_FILES:
        try:
            parts = []
            for split in ("train", "dev"):
                ex = load_task(task, split, root)
                parts.append(f"{split} {len(ex)} rows, {len(set(ex.labels))} classes")
            out[task] = "ok: " + "; ".join(parts)
        except DataError as err:
            out[task] = f"problem: {err}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``glora data``."""
    p = argparse.ArgumentParser(prog="glora data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("dir", nargs="?", default=None, help="the data folder to check")
    args = p.parse_args(argv)
    print("A data folder for the built-in tasks holds these files (GLUE's TSVs as released; the "
          "sentence tasks as '<label> <text>' lines):")  # fmt: skip
    for task, (train, dev) in TASK_FILES.items():
        print(f"  {task:5}  train: {train:28} dev: {dev}" if train != dev else
              f"  {task:5}  {train} (cut 90/10 into train and dev by a fixed shuffle)")  # fmt: skip
    print("Or --data-dir hub: the same tasks from the Hugging Face Hub (downloads; the Hub's "
          "own splits).")  # fmt: skip
    try:
        root = Path(args.dir) if args.dir else default_data_dir()
    except DataError as err:
        print(f"glora data: error: {err}", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"glora data: error: {root} is not a folder", file=sys.stderr)
        return 2
    print(f"\n{root}:")
    found = check_data_dir(root)
    for task, status in found.items():
        print(f"  {task:5}  {status}")
    return 0 if all(s.startswith("ok") for s in found.values()) else 1


__all__ = ["check_data_dir", "main"]
