"""``glora flower new DIR``: write the Flower app template.

It copies the app folder users deploy (``pyproject.toml`` with the components and every
run-config key, ``flower-config.toml`` with the SuperLink connection, ``README.md`` with the
recipe) out of the installed package. ``glora flower run ...`` (starting a SuperLink and
SuperNodes here, running the app and stopping them) is :func:`integration.flower.app.main`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from glora_math.errors import GloraError

from ..peft.io import write_folder

#: The app folder shipped inside the package.
TEMPLATE = Path(__file__).resolve().parents[1] / "flower_template"
FILES = ("pyproject.toml", "flower-config.toml", "README.md")


def new_app(folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write the Flower app template to ``folder`` (new or empty unless ``overwrite``).

    Raises
    ------
    integration.peft.io.OutputError
        If ``folder`` is a file, a non-empty folder without ``overwrite``, or not writable.
    """

    def write(tmp: Path) -> None:
        for name in FILES:
            shutil.copyfile(TEMPLATE / name, tmp / name)

    return write_folder(folder, write, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``glora flower``."""
    args = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="glora flower", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="write the Flower app template to DIR")
    new.add_argument("dir", help="the app folder to create (new or empty)")
    new.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    sub.add_parser("run", help="run the app here: glora flower run --help", add_help=False)
    ns = p.parse_args(args)
    try:
        folder = new_app(ns.dir, overwrite=ns.overwrite)
    except GloraError as err:
        sys.stderr.write(f"glora flower new: error: {err}\n")
        return 2
    print(f"wrote the Flower app to {folder}; next: {folder / 'README.md'}")
    return 0


__all__ = ["FILES", "TEMPLATE", "main", "new_app"]
