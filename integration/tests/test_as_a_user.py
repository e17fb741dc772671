"""As a user: the wheel, installed outside the source tree, runs every CLI command and README snippet.

The wheel is built from this checkout and installed (without dependencies) into a fresh
virtual environment; the dependencies come from the test environment through a ``.pth``
path, which does not activate this checkout's editable install. Every command runs from an
empty temporary folder, so nothing of the source tree can be imported by accident.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Installed:
    python: Path
    bin: Path

    def run(
        self, args: list[str], cwd: Path, timeout: float = 300, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GLORA_DATA")}
        env.update(extra or {})
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["GLORA_HYPOTHESIS_PROFILE"] = "dev"
        return subprocess.run(
            args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(tmp / "dist")],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("glora_math-*.whl")
    venv = tmp / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "deps_of_the_test_environment.pth").write_text("\n".join(sorted(deps)) + "\n")
    return Installed(python, venv / "bin")


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def test_the_wheel_installs_only_inside_the_glora_math_namespace(
    installed: Installed, tmp_path: Path
) -> None:
    code = (
        "import importlib.util as u, glora_math, glora_math.integration.peft_io, glora_math.testing\n"
        "assert 'site-packages' in glora_math.__file__, glora_math.__file__\n"
        "for name in ('integration', 'proofs', 'property_tests'):\n"
        "    assert u.find_spec(name) is None, name\n"
        "print(glora_math.__version__)\n"
    )
    assert _ok(installed.run([str(installed.python), "-c", code], tmp_path)).strip()
    lic = installed.run([str(installed.python), "-c",
                         "import importlib.metadata as m; print(m.metadata('glora-math')['License'])"], tmp_path)  # fmt: skip
    assert "Apache" in _ok(lic)


def test_every_cli_command_runs_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    glora = str(installed.bin / "glora")
    assert _ok(installed.run([glora, "--version"], tmp_path)).startswith("glora-math ")
    assert "GLoRA" in _ok(
        installed.run([glora, "demo", "--d", "48", "--k", "32", "--trials", "1"], tmp_path)
    )
    out = _ok(installed.run([glora, "compare", "--d", "48", "--k", "32", "--trials", "1",
                             "--operators", "fedit,glora,glora_auto"], tmp_path))  # fmt: skip
    assert "glora_auto" in out
    verify = _ok(installed.run([glora, "verify", "--only", "P1,P12"], tmp_path))
    assert "2/2 propositions verified" in verify
    assert re.search(r"P1 .* ok", verify)
    sim = installed.run(
        [glora, "simulate", "--model", "tiny-roberta", "--clients", "2", "--rounds", "1",
         "--local-steps", "1", "--max-train", "16", "--max-eval", "8", "--batch-size", "4",
         "--data-dir", str(DATA), "--out", "run"],
        tmp_path,
    )  # fmt: skip
    # The run says which operator it used: the installed package's default.
    default = _ok(installed.run(
        [str(installed.python), "-c", "import glora_math; print(glora_math.DEFAULT_OPERATOR)"],
        tmp_path,
    )).strip()  # fmt: skip
    assert f'"operator": "{default}"' in _ok(sim)
    assert (tmp_path / "run" / "results.json").is_file()
    # Without data: one line saying what to pass, exit 2, no traceback.
    bare = installed.run([glora, "simulate", "--model", "tiny-roberta", "--out", "x"], tmp_path)
    assert bare.returncode == 2
    assert "--data-dir" in bare.stderr
    assert "Traceback" not in bare.stderr
    for module in (
        "glora_math.integration.experiment",
        "glora_math.integration.flower_app",
        "glora_math.integration.flower.faults",
    ):
        assert "usage" in _ok(
            installed.run([str(installed.python), "-m", module, "--help"], tmp_path)
        )
    # The Flower app from the wheel: written where the user asks, never over their files.
    assert "wrote the Flower app" in _ok(installed.run([glora, "flower", "new", "app"], tmp_path))
    template = ROOT / "integration" / "flower_template"
    for name in ("pyproject.toml", "flower-config.toml", "README.md"):
        assert (tmp_path / "app" / name).read_text() == (template / name).read_text()
    again = installed.run([glora, "flower", "new", "app"], tmp_path)
    assert again.returncode == 2
    assert "not an empty folder" in again.stderr
    assert "--client-ranks" in _ok(installed.run([glora, "flower", "run", "--help"], tmp_path))
    # The study notebooks ship in the wheel.
    _ok(installed.run([glora, "notebooks", "nb"], tmp_path))
    # Every one of them (test_notebooks.py holds the list).
    shipped = sorted(p.name for p in (tmp_path / "nb").glob("*.ipynb"))
    assert shipped
    assert shipped == sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_readme_blocks("python"))))
def test_readme_python_snippets_run_as_written(
    installed: Installed, tmp_path: Path, index: int
) -> None:
    code = _readme_blocks("python")[index]
    script = tmp_path / "snippet.py"
    script.write_text(code)
    proc = installed.run([str(installed.python), str(script)], tmp_path, timeout=600)
    assert proc.returncode == 0, f"README python block {index}:\n{code}\n{proc.stderr[-3000:]}"


def test_readme_command_lines_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented commands' flags exist and validate (running them is the CI's job).
    from integration.flower import app
    from integration.simulate import parse_args

    checked: list[object] = []
    monkeypatch.setattr(
        app, "run", lambda cfg: checked.append(cfg) or {"rounds": [], "global_adapter": None}
    )

    for block in _readme_blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["glora", "simulate"]:
                parse_args(words[2:])
            elif words[:3] == ["glora", "flower", "run"]:
                assert app.main(words[3:]) == 0, line
            elif words[:3] == ["glora", "flower", "new"]:
                assert len(words) == 4 or words[4] == "&&", line
            elif words[:2] == ["glora", "aggregate"]:
                from integration.peft.aggregate import build_parser as aggregate_parser

                aggregate_parser().parse_args(words[2:])
            elif words[:1] == ["glora"]:
                from glora_math.cli import build_parser

                build_parser().parse_args(words[1:])
    assert len(checked) == sum(b.count("glora flower run") for b in _readme_blocks("bash"))


NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.py"))


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_runs_from_the_installed_package(
    installed: Installed, tmp_path: Path, script: Path
) -> None:
    # The jupytext scripts are the notebooks' cells as plain Python: run them with the wheel's
    # interpreter from an empty folder (no source tree on the path).
    # Outside the source tree the data folder is found through GLORA_DATA, as README says.
    copy = tmp_path / script.name
    copy.write_text(script.read_text())
    extra = {"MPLBACKEND": "Agg", "GLORA_DATA": str(DATA)}
    proc = installed.run([str(installed.python), str(copy)], tmp_path, timeout=600, extra=extra)
    assert proc.returncode == 0, f"{script.name}:\n{proc.stderr[-3000:]}"


def test_a_user_journey_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    """From an empty folder: own sentence-pair data (a BOM, unbalanced quotes) -> a trained
    adapter that peft loads and runs; three adapter folders -> one aggregated round; an
    experiment config on the same data -> its table, all under the folders asked for."""
    glora = str(installed.bin / "glora")
    rows = [(f'"quoted {i}', f"second text {i}", str(i % 2)) for i in range(24)]
    for name in ("train", "dev"):
        body = "sentence1\tsentence2\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows)
        (tmp_path / f"{name}.tsv").write_text("\ufeff" + body, encoding="utf-8")
    data = ["--train-file", "train.tsv", "--eval-file", "dev.tsv", "--text-column",
            "sentence1", "--text-pair-column", "sentence2"]  # fmt: skip
    tiny = ["--model", "tiny-roberta", "--clients", "2", "--rounds", "1", "--local-steps", "1",
            "--batch-size", "4", "--max-eval", "8", "--threads", "1"]  # fmt: skip
    _ok(installed.run([glora, "simulate", *tiny, *data, "--out", "run"], tmp_path))
    use = (
        "import torch\n"
        "from peft import PeftModel\n"
        "from glora_math.integration.models import build_model\n"
        "base, tok = build_model('tiny-roberta', 2, 0)\n"
        "model = PeftModel.from_pretrained(base, 'run/global_adapter')\n"
        "batch = tok(['\"quoted 1 [SEP] second text 1'], return_tensors='pt')\n"
        "print('logits', tuple(model(**batch).logits.shape))\n"
    )
    assert "logits (1, 2)" in _ok(installed.run([str(installed.python), "-c", use], tmp_path))
    make = (
        "import torch\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from glora_math.integration.models import build_model\n"
        "for i in range(3):\n"
        "    base, _ = build_model('tiny-roberta', 2, 0)\n"
        "    torch.manual_seed(i)\n"
        "    m = get_peft_model(base, LoraConfig(r=2, target_modules=['query', 'value']))\n"
        "    for name, p in m.named_parameters():\n"
        "        if 'lora_B' in name:\n"
        "            torch.nn.init.normal_(p)  # as if trained: peft starts B at 0\n"
        "    m.save_pretrained(f'client{i}')\n"
    )
    _ok(installed.run([str(installed.python), "-c", make], tmp_path))
    agg = _ok(installed.run([glora, "aggregate", "client0", "client1", "client2", "--weights",
                             "1,2,3", "--out", "server"], tmp_path))  # fmt: skip
    assert "wrote server/global" in agg
    assert (tmp_path / "server" / "global" / "adapter_model.safetensors").is_file()
    config = {"name": "mine", "seeds": [0], "runs": [{"operator": "fedit"}],
              "base": {"model": "tiny-roberta", "clients": 2, "rounds": 1, "local_steps": 1,
                       "batch_size": 4, "max_eval": 8, "threads": 1,
                       "train_file": "train.tsv", "eval_file": "dev.tsv",
                       "text_column": "sentence1", "text_pair_column": "sentence2"}}  # fmt: skip
    (tmp_path / "mine.json").write_text(__import__("json").dumps(config))
    _ok(installed.run([glora, "experiment", "mine.json", "--out", "study"], tmp_path))
    assert "Floor" in (tmp_path / "study" / "mine.md").read_text()
    assert (tmp_path / "study" / "runs" / "fedit-seed0" / "global_adapter").is_dir()
    # A shipped cell that names another shipped cell (m's other_trajectory, cell g) finds it
    # in the installed package, and says where it stands before anything has run.
    m, env = "m_sst2_counterfactual_flexlora", {"GLORA_DATA": str(DATA)}
    cell = [glora, "experiment", m, "--out", "cells"]
    assert "5 runs left, not estimated" in _ok(installed.run([*cell, "--list"], tmp_path))
    _ok(installed.run([*cell, "--table"], tmp_path, extra=env))  # the floor reads SST-2
    table = (tmp_path / "cells" / f"{m}.md").read_text()
    assert "d along fedit's trajectory (g_sst2_counterfactual, run fedit-arms) | 0 |" in table
