"""The old name of :mod:`integration.runner.causal_lm` (the causal-LM objective).

Kept for existing imports: ``import integration.causal_lm`` gives the very module
``integration.runner.causal_lm`` (one module object, so its names, and anything patched on it, are
shared).
"""

from __future__ import annotations

import importlib
import sys

_new = importlib.import_module(f"{__package__}.runner.causal_lm")
if __name__ == "__main__":
    raise SystemExit(_new.main())
sys.modules[__name__] = _new
