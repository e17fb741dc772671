"""The import graph of the integration layer: no cycles, and no app imports another app.

The apps are the runner (:mod:`integration.runner.simulate`, driven by
:mod:`integration.runner.experiment`) and the Flower app (:mod:`integration.flower.app`); the
shared Hugging Face and peft helpers live in :mod:`integration.federated.models`, which imports
neither. The core never imports the integration layer. The rooms (``peft``, ``data``,
``federated``, ``runner``, ``flower``) are walked with the modules they hold; the old
top-level names are aliases.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APPS = {"integration.runner.simulate", "integration.flower.app", "integration.runner.experiment"}


def _imports(path: Path, module: str, root: str) -> set[str]:
    """Modules of this project imported anywhere in the file (top level or in functions).

    Relative imports (``from ..data import ...``) resolve against ``module``'s package.
    """
    out = set()
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            out.add(".".join([*base, node.module] if node.module else base))
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("glora_math", "integration", "proofs", root)}


def _graph(root: str) -> dict[str, set[str]]:
    graph = {}
    for p in sorted((ROOT / root).rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("").parts
        if "tests" in rel:
            continue
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        graph[name] = _imports(p, name if rel[-1] != "__init__" else name + ".__init__", root)
    return graph


def test_the_integration_layer_has_no_import_cycle() -> None:
    graph = _graph("integration")
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state = seen.get(m, 0)
        assert state != 1, f"import cycle: {' -> '.join([*stack, m])}"
        if state == 2:
            return
        seen[m] = 1
        for n in sorted((graph.get(m, set()) & set(graph)) - {m}):  # a self-import is no cycle
            visit(n, [*stack, m])
        seen[m] = 2

    for m in graph:
        visit(m, [])


def test_no_app_imports_another_app_and_models_import_no_app() -> None:
    graph = _graph("integration")
    for m, deps in graph.items():
        others = (deps & APPS) - {m}
        if m == "integration.runner.experiment":  # the experiment driver drives the runner
            others -= {"integration.runner.simulate"}
        assert not others, f"{m} imports the app(s) {sorted(others)}"
    assert not graph["integration.federated.models"] & APPS
    # The rooms: every module of the layer lives in one, but for the old names (aliases).
    rooms = {"peft", "data", "federated", "runner", "flower"}
    packages = {p.parent.name for p in (ROOT / "integration").glob("*/__init__.py")}
    assert packages == rooms | {"tests"}
    for path in sorted((ROOT / "integration").glob("*.py")):
        if path.stem != "__init__":
            assert "old name" in path.read_text().split('"""')[1], path


def test_the_core_never_imports_the_integration_layer() -> None:
    for m, deps in _graph("glora_math").items():
        if m == "glora_math.cli":  # the CLI's simulate/verify commands load them on demand
            continue
        layers = ("integration", "proofs", "glora_math.integration", "glora_math.proofs")
        assert not {d for d in deps if d.startswith(layers)}, m


def test_no_module_edits_sys_path_and_proofs_import_no_test_module() -> None:
    # The CLI finds proofs/ and integration/ as glora_math.proofs / glora_math.integration
    # (installed, or editable); glora verify selects its properties by pytest node id.
    for folder in ("glora_math", "integration", "proofs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "tests" not in path.parts:
                assert "sys.path" not in path.read_text(), path
    for m, deps in _graph("proofs").items():
        assert not {d for d in deps if "property_tests" in d or "tests" in d.split(".")}, m
