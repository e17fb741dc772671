"""The old name of :mod:`integration.runner.simulate` (the runner).

Kept for existing imports: ``import integration.simulate`` gives the very module
``integration.runner.simulate`` (one module object, so its names, and anything patched on it, are
shared).
"""

from __future__ import annotations

import importlib
import sys

_new = importlib.import_module(f"{__package__}.runner.simulate")
if __name__ == "__main__":
    raise SystemExit(_new.main())
# Loaders that execute this file without the import system's sys.modules lookup (Flower's app
# loader) still find every name here.
globals().update({k: v for k, v in vars(_new).items() if not k.startswith("__")})
sys.modules[__name__] = _new
