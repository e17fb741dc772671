"""The property suite's strategies live in the package (:mod:`glora_math.testing.strategies`)."""

from glora_math.testing.strategies import *  # noqa: F403
from glora_math.testing.strategies import __all__ as __all__  # noqa: PLC0414
