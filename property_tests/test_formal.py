"""The machine-checked proofs (proofs/coq, Coq + mathcomp) and their registry (proofs.formal).

The first tests need no Coq: they read the sources (no escape hatch such as Admitted or Axiom
outside comments; every listed theorem exists) and the registry's consistency. The others run
coqc: the whole library compiles and every listed theorem is closed under the global context;
and the checker itself reports an admitted lemma, an axiom and a missing theorem as failures.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from glora_math.proofs import formal
from glora_math.proofs.propositions import PROPOSITIONS

COQ_DIR = Path(formal.__file__).resolve().parent / "coq"
# Vernacular that would let a theorem stand on an unproved fact. (Section "Variable"s for the
# objects are fine: hypotheses are part of the theorem statements.)
FORBIDDEN = (
    "Admitted",
    "admit",
    "give_up",
    "Axiom",
    "Axioms",
    "Parameter",
    "Parameters",
    "Conjecture",
    "Hypothesis",
    "Hypotheses",
)
NEEDS_COQ = pytest.mark.skipif(
    not formal.coq_available(),
    reason="coqc or a mathcomp library (algebra, field, real-closed) is missing: the Coq proofs "
    "cannot be compiled here (`make formal` installs them where apt-get and root are available)",
)


def strip_comments_and_strings(text: str) -> str:
    """Coq source without its (nested) comments and string literals."""
    out: list[str] = []
    depth, i, n = 0, 0, len(text)
    while i < n:
        if text.startswith("(*", i):
            depth, i = depth + 1, i + 2
        elif depth and text.startswith("*)", i):
            depth, i = depth - 1, i + 2
        elif depth:
            i += 1
        elif text[i] == '"':
            j = text.find('"', i + 1)
            while j != -1 and text.startswith('""', j):  # "" escapes a quote in Coq strings
                j = text.find('"', j + 2)
            i = n if j == -1 else j + 1
            out.append(" ")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def forbidden_words(text: str) -> list[str]:
    code = strip_comments_and_strings(text)
    return [w for w in FORBIDDEN if re.search(rf"(?<![\w']){w}(?![\w'])", code)]


def coq_sources() -> list[Path]:
    return sorted(COQ_DIR.glob("*.v"))


def test_the_stripper_sees_code_and_ignores_comments() -> None:
    assert forbidden_words("Lemma x : True. Admitted.") == ["Admitted"]
    assert forbidden_words("Proof. admit. Qed.") == ["admit"]
    assert forbidden_words("Axiom ax : False.") == ["Axiom"]
    assert forbidden_words("Parameter p : nat.") == ["Parameter"]
    assert forbidden_words("(* Admitted (* nested *) Axiom *) Lemma x : True. Qed.") == []
    assert forbidden_words('Definition s := "Admitted".') == []
    assert forbidden_words("Lemma admitted_like' : True. Qed.") == []
    assert forbidden_words("(* a (* b *) c *) Conjecture c : True.") == ["Conjecture"]


def test_no_escape_hatch_in_the_coq_sources() -> None:
    sources = coq_sources()
    assert sources, f"no Coq sources in {COQ_DIR}"
    found = {p.name: forbidden_words(p.read_text()) for p in sources}
    assert not {k: v for k, v in found.items() if v}, found


def test_every_module_is_built_and_every_listed_theorem_exists() -> None:
    mods = formal.modules()
    assert sorted(f"{m}.v" for m in mods) == sorted(p.name for p in coq_sources())
    for pid, names in formal.THEOREMS.items():
        assert names, pid
        for name in names:
            mod, thm = name.split(".")
            assert mod in mods, name
            code = strip_comments_and_strings((COQ_DIR / f"{mod}.v").read_text())
            assert re.search(rf"\b(Theorem|Lemma)\s+{re.escape(thm)}\b", code), name


def test_registry_is_consistent_with_the_propositions() -> None:
    ids = {p.id for p in PROPOSITIONS}
    assert set(formal.THEOREMS) <= ids
    assert set(formal.NOT_CHECKED) == ids - set(formal.THEOREMS)
    assert set(formal.SCOPE) == set(formal.THEOREMS)
    assert {"P1", "P2", "P3", "P6", "P7", "P10", "P11", "P12", "L1"} <= set(formal.THEOREMS)
    all_names = [n for names in formal.THEOREMS.values() for n in names]
    assert len(all_names) == len(set(all_names))


def test_check_without_theorems_needs_no_coq() -> None:
    assert formal.check(["P15"]) == {"P15": "not machine-checked"}
    with pytest.raises(KeyError):
        formal.check(["P99"])


def test_check_reports_no_coqc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formal.shutil, "which", lambda _name: None)
    assert not formal.coq_available()
    assert formal.check(["P1", "P15"]) == {"P1": "no coqc", "P15": "not machine-checked"}


def test_check_reports_a_missing_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A coqc whose library tree has no mathcomp real_closed (as on a machine with Coq and
    # mathcomp algebra but not the real-closed package): reported, not a failure.
    fake = tmp_path / "coqc"
    for lib in ("ssreflect", "algebra", "field"):
        (tmp_path / "lib" / "user-contrib" / "mathcomp" / lib).mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\necho {tmp_path / 'lib'}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(formal.shutil, "which", lambda _name: str(fake))
    monkeypatch.delenv("COQPATH", raising=False)
    assert formal.missing_libraries(str(fake)) == ["real_closed"]
    assert not formal.coq_available()
    got = formal.check(["P1"])
    assert got == {"P1": "no Coq library: mathcomp real_closed"}


@NEEDS_COQ
def test_every_listed_proposition_is_machine_checked() -> None:
    result = formal.check()
    for pid in formal.THEOREMS:
        assert result[pid] == "checked", (pid, result[pid])
    for pid in formal.NOT_CHECKED:
        assert result[pid] == "not machine-checked", (pid, result[pid])


@NEEDS_COQ
def test_the_checker_rejects_admitted_axioms_and_missing_theorems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "_CoqProject").write_text("-Q . GLoRA\nBase.v\nUser.v\nBroken.v\n")
    (tmp_path / "Base.v").write_text(
        "Lemma good : True. Proof. exact I. Qed.\n"
        "Lemma holey : 1 = 2. Admitted.\n"
        "Axiom ax : forall n : nat, n = 0.\n"
        "Lemma uses_ax : 1 = 0. Proof. exact (ax 1). Qed.\n"
    )
    (tmp_path / "User.v").write_text(
        "From GLoRA Require Import Base.\nLemma also_good : True. Proof. exact good. Qed.\n"
    )
    (tmp_path / "Broken.v").write_text("Lemma wrong : 1 = 2. Proof. reflexivity. Qed.\n")
    monkeypatch.setattr(formal, "COQ_DIR", tmp_path)
    monkeypatch.setattr(
        formal,
        "THEOREMS",
        {
            "P1": ("Base.good", "User.also_good"),
            "P2": ("Base.good", "Base.holey"),
            "P3": ("Base.uses_ax",),
            "P6": ("Base.missing",),
            "P7": ("Broken.wrong",),
        },
    )
    result = formal.check(["P1", "P2", "P3", "P6", "P7", "P4"])
    assert result["P1"] == "checked"
    assert result["P2"].startswith("failed: Base.holey is not closed"), result["P2"]
    assert result["P3"].startswith("failed: Base.uses_ax is not closed"), result["P3"]
    assert result["P6"].startswith("failed: Check_P6.v:"), result["P6"]
    assert result["P7"].startswith("failed: Broken.v:"), result["P7"]
    assert result["P4"] == "not machine-checked"
    assert all("\n" not in v for v in result.values())
