"""Hypothesis profiles: ``ci`` (default), ``dev`` (fewer examples), ``nightly`` (many).

``ci`` is derandomized (the same examples on every run, so CI is reproducible); ``dev`` and
``nightly`` explore with fresh random draws and keep failures in the local example database.

Choose with ``GLORA_HYPOTHESIS_PROFILE=nightly make test``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=100, **_COMMON)
settings.register_profile("nightly", max_examples=2000, **_COMMON)
# Mutation testing reruns the suite once per mutant: few, fixed examples.
settings.register_profile("mutation", max_examples=15, derandomize=True, database=None, **_COMMON)
settings.load_profile(os.environ.get("GLORA_HYPOTHESIS_PROFILE", "ci"))

# A second numerical configuration (`make numerics`, run by .ci/run): with GLORA_DETERMINISTIC=1
# torch refuses nondeterministic kernels and picks its deterministic ones, which round
# differently from the defaults; no assertion of the suite may depend on either rounding.
if os.environ.get("GLORA_DETERMINISTIC") == "1":
    import torch

    torch.use_deterministic_algorithms(True)
