"""The property suite's helpers live in the package (:mod:`glora_math.testing.helpers`)."""

from glora_math.testing.helpers import *  # noqa: F403
from glora_math.testing.helpers import __all__ as __all__  # noqa: PLC0414
