"""The default operator has one home: ``glora_math.DEFAULT_OPERATOR``.

Every entry point that picks an operator when none is named (the runner's settings, the
framework-free server, the peft path and its command line, the Flower strategy and the
Flower app template) takes that constant, and README names it where it states the rule.
The constant follows the evidence: once study F's powered cell is complete, it is the
operator the pre-registered rule chose from the committed runs.
"""

from __future__ import annotations

import inspect
import json
import re
import tomllib
from pathlib import Path

from glora_math import DEFAULT_OPERATOR, get_operator
from integration.federated.server import FederatedServer
from integration.flower.config import FlowerConfig
from integration.flower.strategy import LoRAStrategy
from integration.peft import aggregate
from integration.runner.cells import ENTRY_KEYS, entries, run_id
from integration.runner.config import SimConfig, parse_args
from integration.runner.rule import UNTIL_APPLIED
from integration.runner.tables import decide_default

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


def test_the_default_is_the_rules_choice_once_the_powered_cell_is_complete() -> None:
    """Study F's rule, applied to the committed raw JSON, fixes ``DEFAULT_OPERATOR``.

    Until every compared run has every seed, the default is the one kept from before the
    study and README says the rule has not been applied; after, it is the chosen run's
    operator and README no longer says so.
    """
    cell = "f_sst2_powered"
    config = json.loads((ROOT / "integration" / "experiments" / f"{cell}.json").read_text())
    outcome = decide_default(config, cell, ROOT / "docs" / "experiments")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Which operator should I use?", 1)[1].split("\n## ", 1)[0]
    not_applied = "the rule has not been applied yet" in " ".join(section.split())
    assert outcome.applies
    if outcome.verdict is None:
        # A complete cell where the rule chose nothing needs a decision the rule does not make.
        assert outcome.why_not.startswith("Not applied yet"), (
            f"the powered cell is complete and the rule chose nothing: {outcome.why_not}"
        )
        assert DEFAULT_OPERATOR == UNTIL_APPLIED
        assert not_applied
    else:
        chosen = {run_id(e): e for e in entries(config)}[outcome.verdict.run]
        # The default is an operator with its defaults: the chosen entry sets nothing else.
        assert set(chosen) - set(ENTRY_KEYS) == {"operator"}, chosen
        todo = (
            f"the powered cell is complete and the rule chose {chosen['operator']!r} "
            f"({outcome.verdict}): set DEFAULT_OPERATOR (glora_math/operators/interface.py) and "
            "the Flower template's operator (integration/flower_template/pyproject.toml) to it, "
            "name it where README.md and docs/experiments.md say 'today `...`', and rewrite "
            "README's 'Which operator should I use?' from the cell's table"
        )
        assert DEFAULT_OPERATOR == chosen["operator"], todo
        assert not not_applied, f"README still says the rule has not been applied yet; {todo}"
