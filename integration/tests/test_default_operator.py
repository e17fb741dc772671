"""The default operator has one home: ``glora_math.DEFAULT_OPERATOR``.

Every entry point that picks an operator when none is named (the runner's settings, the
framework-free server, the peft path and its command line, the Flower strategy and the
Flower app template) takes that constant, and README names it where it states the rule.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

from glora_math import DEFAULT_OPERATOR, get_operator
from integration.federated.server import FederatedServer
from integration.flower.config import FlowerConfig
from integration.flower.strategy import LoRAStrategy
from integration.peft import aggregate
from integration.runner.config import SimConfig, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_default_is_a_registered_operator() -> None:
    assert get_operator(DEFAULT_OPERATOR).name == DEFAULT_OPERATOR


def test_every_entry_point_defaults_to_the_one_constant() -> None:
    assert SimConfig().operator == DEFAULT_OPERATOR
    assert FlowerConfig().operator == DEFAULT_OPERATOR
    assert parse_args([])[0].operator == DEFAULT_OPERATOR
    for fn in (FederatedServer.__init__, LoRAStrategy.__init__,
               aggregate.aggregate_peft, aggregate.aggregate_adapters):  # fmt: skip
        assert inspect.signature(fn).parameters["operator"].default == DEFAULT_OPERATOR, fn
    assert aggregate.build_parser().get_default("operator") == DEFAULT_OPERATOR


def test_flower_template_and_readme_name_the_default() -> None:
    toml = tomllib.loads((ROOT / "integration/flower_template/pyproject.toml").read_text())
    assert toml["tool"]["flwr"]["app"]["config"]["operator"] == DEFAULT_OPERATOR
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Which operator should I use?", 1)[1].split("\n## ", 1)[0]
    stated = re.search(r"The default today is `([a-z_]+)`", section)
    # Wherever the docs name the default, they name the constant and today's value.
    for doc in (readme, (ROOT / "docs" / "experiments.md").read_text()):
        named = re.findall(r"DEFAULT_OPERATOR`,\s+today\s+`([a-z_]+)`", doc)
        assert named
        assert set(named) == {DEFAULT_OPERATOR}
    assert stated is not None
    assert stated.group(1) == DEFAULT_OPERATOR
