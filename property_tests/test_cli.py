"""The ``glora demo`` command prints the core claim, computed (not hard-coded)."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from glora_math.cli import main
from glora_math.tolerances import product_tol

# Relative tolerance for the demo's float64 numbers: d + k + N r dimensions, gauges of cond 10.
TOL = product_tol(torch.float64, n=64 + 48 + 4 * 4, scale=1.0, kappa=10.0)


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) >= 3:
            rows[parts[0]] = parts[1:]
    return rows


def test_demo_table_shows_fedit_moves_and_glora_does_not(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--d", "64", "--k", "48", "--clients", "4", "--server-rank", "6"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    fedit_change = float(rows["FedIT (factor averaging)"][0])
    glora_change = float(rows["GLoRA (qr) R=6"][0])
    exact = rows["GLoRA (qr) R=16 = N*r"]
    assert fedit_change > 1e-2  # O(1) in practice; any change far above TOL is a witness
    assert glora_change < TOL
    assert float(exact[1]) < TOL  # R = N r spans every client: the exact mean (P2)
    # Readout at R reproduces the state; at r < R it matches the Eckart-Young prediction.
    for r in ("1", "2", "4"):
        got, predicted = float(rows[r][0]), float(rows[r][1])
        assert abs(got - predicted) < TOL
    assert float(rows["6"][0]) < TOL


def test_demo_seed_changes_the_numbers(capsys) -> None:  # type: ignore[no-untyped-def]
    main(["demo", "--d", "32", "--k", "24", "--clients", "3", "--seed", "1"])
    a = capsys.readouterr().out
    main(["demo", "--d", "32", "--k", "24", "--clients", "3", "--seed", "2"])
    b = capsys.readouterr().out
    assert a != b


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "glora_math", "demo", "--d", "24", "--k", "16", "--clients", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Gauge invariance and accuracy" in out


def test_compare_lists_every_operator_with_its_guarantees_visible(capsys) -> None:  # type: ignore[no-untyped-def]
    from glora_math.operators import list_operators

    assert main(["compare", "--d", "40", "--k", "30", "--clients", "4", "--server-rank", "6"]) == 0
    rows = _rows(capsys.readouterr().out)
    for name in list_operators():
        assert name in rows, name
    # Measured, not hard-coded: exact operators have tiny errors, GL-invariant ones tiny
    # gauge changes, FedIT neither; FFA-LoRA and RoLoRA get their protocol's shared factor and
    # are exact, with no per-client gauge sensitivity (gauges would break the shared factor).
    # columns: error to W_bar, GL-gauge change, O-gauge change, floats up, floats down, time
    assert float(rows["flora"][0]) < TOL
    assert float(rows["glora"][1]) < TOL
    assert float(rows["fedit"][1]) > 1e-2
    assert float(rows["fedrot_lora"][2]) < TOL  # O(r)-invariant given its reference
    for name in ("ffa_lora", "rolora"):
        assert float(rows[name][0]) < TOL
        assert rows[name][1] == "n/a"


def test_compare_loads_clients_from_safetensors(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    from glora_math.synthetic import random_clients

    clients = random_clients(n_clients=3, d=20, k=12, rank=[2, 3, 2], seed=5)
    flat = {
        f"clients.{i}.{n}": getattr(c, n).contiguous() for i, c in enumerate(clients) for n in "BA"
    }
    flat["weights"] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    path = tmp_path / "clients.safetensors"
    save_file(flat, str(path))
    assert (
        main(
            [
                "compare",
                "--load",
                str(path),
                "--server-rank",
                "4",
                "--operators",
                "glora,flexlora,fedit",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = _rows(out)
    assert "loaded from" in out
    assert set(rows) >= {"glora", "flexlora", "fedit"}
    assert rows["fedit"][-1] == "refused"
    assert "fedit: refused (ShapeMismatchError)" in out
    assert "needs equal ranks" in " ".join(out.split())
    # A file with a broken client is rejected with a typed, client-naming error.
    flat["clients.1.A"] = torch.zeros(5, 12, dtype=torch.float64)
    save_file(flat, str(path))
    assert main(["compare", "--load", str(path)]) == 1
    assert "client 1: inner dimensions differ" in capsys.readouterr().err


def test_bad_arguments_get_one_line_errors_and_exit_2(capsys) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from glora_math.cli import main

    for argv, text in (
        (["demo", "--d", "0"], "--d: expected an integer >= 1, got 0"),
        (["compare", "--ranks", "2,4,x"], "--ranks: expected an integer >= 1, got 'x'"),
        (["compare", "--operators", "nope"], "unknown operator(s) ['nope']"),
        (["demo", "--heterogeneity", "2"], "expected a number in [0, 1]"),
        (["demo", "--gauge-cond", "0.5"], "expected a condition number >= 1"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert text in capsys.readouterr().err
    assert main(["verify", "--only", "P99"]) == 2
    assert "--only takes ids among" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("glora-math ")


def test_reports_fit_120_columns(capsys) -> None:  # type: ignore[no-untyped-def]
    from glora_math.cli import WIDTH

    small = ["--d", "40", "--k", "30", "--trials", "1", "--clients", "4"]
    for argv in (["demo", *small], ["compare", *small, "--ranks", "2,4,4,2"]):
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(len(line) for line in lines) <= WIDTH == 120, argv
