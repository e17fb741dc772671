"""Tiny end-to-end federated runs (tiny random RoBERTa, 3 clients, 2 rounds) on real data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glora_math import LoRAFactors
from glora_math.tolerances import product_tol
from integration.simulate import SimConfig, Simulation, parse_args

TINY = {
    "model": "tiny-roberta",
    "clients": 3,
    "rounds": 2,
    "local_steps": 2,
    "max_train": 48,
    "max_eval": 32,
    "batch_size": 8,
}


def _run(tmp_path: Path, name: str, **kw: object) -> list[dict[str, object]]:
    cfg = SimConfig(**(TINY | {"out": str(tmp_path / name)} | kw))  # type: ignore[arg-type]
    return Simulation(cfg).run()


def test_glora_run_with_heterogeneous_ranks_and_sparse_participation(tmp_path: Path) -> None:
    metrics = _run(
        tmp_path, "glora", operator="glora", client_ranks=[2, 4, 3], server_rank=6,
        participation=0.5,
    )  # fmt: skip
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(len(m["participants"]) == 2 for m in metrics)  # ceil(0.5 * 3)
    assert all(0.0 <= float(m["accuracy"]) <= 1.0 for m in metrics)  # type: ignore[arg-type]
    out = tmp_path / "glora"
    for f in ("results.json", "accuracy.png", "aggregation_error.png", "checkpoint.json"):
        assert (out / f).is_file()
    assert json.loads((out / "results.json").read_text())["metrics"] == metrics


@pytest.mark.parametrize("operator", ["fedex_lora", "flora", "fedrot_lora", "ffa_lora", "rolora"])
def test_folding_and_stateful_operators_run(tmp_path: Path, operator: str) -> None:
    # RoLoRA: round 1 trains B with the shared A frozen, round 2 A with the averaged B frozen;
    # the server's protocol check (a frozen factor must be identical) passes only if the
    # runner froze the right factor, and the update is then the exact mean.
    metrics = _run(tmp_path, operator, operator=operator)
    if operator in ("fedex_lora", "flora", "ffa_lora", "rolora"):  # exact: the mean update
        # Relative error in float64 factors of the tiny model (hidden 32, 3 clients of rank 4).
        tol = product_tol(torch.float64, n=32 + 32 + 3 * 4, scale=1.0)
        assert all(float(m["aggregation_error"]) <= tol for m in metrics)  # type: ignore[arg-type]
    if operator == "fedrot_lora":
        flat = load_file(str(tmp_path / operator / "checkpoint-2.safetensors"))
        assert any(k.startswith("state.") and k.endswith("round_index") for k in flat)


@pytest.mark.parametrize("operator", ["fedrot_lora", "fedex_lora", "fedsa_lora"])
def test_resume_after_a_kill_gives_the_uninterrupted_results(tmp_path: Path, operator: str) -> None:
    # Carried operator state (FedRot), dense folds (FedEx), personal factors (FedSA).
    full = _run(tmp_path, "full", operator=operator)
    # "Kill" after round 1, then resume to round 2 in a fresh process state.
    Simulation(
        SimConfig(**(TINY | {"out": str(tmp_path / "cut"), "rounds": 1, "operator": operator}))
    ).run()  # type: ignore[arg-type]
    resumed = Simulation(
        SimConfig(**(TINY | {"out": str(tmp_path / "cut"), "operator": operator}))
    ).run(resume=True)  # type: ignore[arg-type]
    timing = ("seconds", "eval_seconds")
    strip = [{k: v for k, v in m.items() if k not in timing} for m in full]
    assert [{k: v for k, v in m.items() if k not in timing} for m in resumed] == strip
    a = load_file(str(tmp_path / "full" / "checkpoint-2.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint-2.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_flags_parse() -> None:
    cfg, resume = parse_args(
        [
            "--operator",
            "flexlora",
            "--client-ranks",
            "2,4",
            "--clients",
            "2",
            "--server-rank",
            "8",
            "--resume",
        ]
    )
    assert cfg.operator == "flexlora"
    assert cfg.client_ranks == [2, 4]
    assert cfg.server_rank == 8
    assert resume


def test_the_packaged_pretrained_minilm_loads_offline() -> None:
    from safetensors.torch import load_file as load

    from integration.models import build_model, minilm_path

    model, tok = build_model("minilm", num_labels=2, seed=0)
    shipped = load(str(minilm_path() / "model.safetensors"))
    key = next(k for k in shipped if k.endswith("embeddings.word_embeddings.weight"))
    mine = dict(model.named_parameters())
    match = next(v for k, v in mine.items() if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(match.detach(), shipped[key])  # real pretrained weights, not random
    assert tok("a test")["input_ids"][0] == tok.cls_token_id


def test_absent_clients_receive_the_current_broadcast(tmp_path: Path) -> None:
    # 3 clients, 2 participate per round; the absent one must not keep stale factors.
    sim = Simulation(
        SimConfig(
            **(
                TINY
                | {
                    "out": str(tmp_path / "b"),
                    "operator": "glora_auto",  # mixed ranks: not FedIT
                    "participation": 0.5,
                    "client_ranks": [2, 2, 3],
                    "server_rank": 4,
                }
            )
        )
    )  # type: ignore[arg-type]
    row = sim.step()
    who = row["participants"]
    assert isinstance(who, list)
    absent = next(i for i in range(3) if i not in who)
    init = sim.server.start_for(absent, [2, 2, 3][absent])
    assert init is not None
    for name, f in init.items():
        assert f.rank == [2, 2, 3][absent]
        # The broadcast at rank r is the best rank-r approximation of the server update.
        upd = sim.server.global_update[name].delta()
        s = torch.linalg.svdvals(upd)
        best = float(s[f.rank :].pow(2).sum().sqrt())
        tol = product_tol(upd.dtype, n=sum(upd.shape) + 4, scale=float(s[0]) + 1.0)
        assert abs(float((f.delta() - upd).norm()) - best) <= tol


def _lora_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from integration.peft_io import PREFIX

    return {
        n.removeprefix(PREFIX).removesuffix(".lora_A.default.weight"): p.detach().clone()
        for n, p in model.named_parameters()
        if ".lora_A." in n
    }


def test_clients_start_from_one_shared_init(tmp_path: Path) -> None:
    cfg = SimConfig(**(TINY | {"out": str(tmp_path / "s"), "client_ranks": [4, 2, 4]}))  # type: ignore[arg-type]
    sim = Simulation(cfg)
    a0 = _lora_a(sim._load_client(0, 4, sim.server, 0))
    a1 = _lora_a(sim._load_client(1, 2, sim.server, 0))
    a2 = _lora_a(sim._load_client(2, 4, sim.server, 0))
    assert a0
    assert set(a0) == set(a1) == set(a2)
    for name in a0:
        assert torch.equal(a0[name], a2[name])  # same rank: the same A
        assert torch.equal(a1[name], a0[name][:2])  # rank 2: the first 2 rows of the rank-4 A
    # The ablation: per-client inits differ.
    per = Simulation(SimConfig(**(TINY | {"out": str(tmp_path / "p"), "per_client_init": True})))  # type: ignore[arg-type]
    p0, p1 = (_lora_a(per._load_client(i, 4, per.server, 0)) for i in (0, 1))
    assert not any(torch.equal(p0[n], p1[n]) for n in p0)


def test_flora_draws_one_shared_fresh_init_per_round(tmp_path: Path) -> None:
    sim = Simulation(SimConfig(**(TINY | {"out": str(tmp_path / "f"), "operator": "flora"})))  # type: ignore[arg-type]
    sim.step()
    assert all(sim.server.start_for(i, 4) is None for i in range(3))  # FLoRA re-initialises
    r1 = [_lora_a(sim._load_client(i, 4, sim.server, sim.round)) for i in range(3)]
    for name in r1[0]:
        assert torch.equal(r1[0][name], r1[1][name])
        assert torch.equal(r1[0][name], r1[2][name])
    r0 = _lora_a(sim._load_client(0, 4, sim.server, 0))
    assert not any(torch.equal(r0[n], r1[0][n]) for n in r0)  # a new draw each round


@pytest.mark.parametrize(
    ("operator", "server_rank"), [("glora", 2), ("glora_auto", 2), ("flexlora", 2)]
)
def test_certified_residual_equals_the_aggregation_error(
    tmp_path: Path, operator: str, server_rank: int
) -> None:
    cfg = SimConfig(**(TINY | {"out": str(tmp_path / operator), "operator": operator,
                               "rank": 2, "server_rank": server_rank, "max_residual": 1e-12}))  # type: ignore[arg-type]  # fmt: skip
    row = Simulation(cfg).step()
    err, cert = float(row["aggregation_error"]), row["certified_residual"]
    assert isinstance(cert, float)
    assert 0.0 < err < 1.0
    # Both are the exact relative error in float64, computed two ways (certificates: the
    # difference of squared norms or the direct norm).
    assert abs(cert - err) <= 1e-9 + 1e-6 * err
    assert abs(float(row["certified_residual_max"]) - float(row["aggregation_error_max"])) <= 1e-6
    assert row["server_rank"] == server_rank
    sides = row["sides"]
    if operator == "flexlora":  # certified (the spectrum's tail), but no consensus side
        assert sides is None
        sides = {"left": 4}
    assert isinstance(sides, dict)
    assert sum(sides.values()) == 4  # 2 layers x (query, value)
    if operator == "glora":
        assert sides["right"] == 0
    warned = [w for w in row["warnings"] if w.startswith("ResidualWarning")]  # type: ignore[union-attr]
    assert len(warned) == 4  # max_residual 1e-12: every module warns, named


def test_non_certified_operators_report_no_certificate(tmp_path: Path) -> None:
    row = Simulation(SimConfig(**(TINY | {"out": str(tmp_path / "x"), "operator": "fedit"}))).step()  # type: ignore[arg-type]
    assert row["certified_residual"] is None
    assert row["sides"] is None
    assert float(row["aggregation_error"]) > 0.0


def test_scrambled_gauges_keep_products_and_glora_but_change_fedit(tmp_path: Path) -> None:
    from integration.peft_io import AdapterModule, ClientAdapter
    from integration.simulate import scramble_adapter

    g = torch.Generator().manual_seed(0)
    f = LoRAFactors(torch.randn(6, 3, generator=g, dtype=torch.float64),
                    torch.randn(3, 5, generator=g, dtype=torch.float64))  # fmt: skip
    ad = ClientAdapter({"m": AdapterModule("m", f, 8.0, False)})
    sc = scramble_adapter(ad, 10.0, seed=1).modules["m"].factors
    assert not torch.allclose(sc.B, f.B)
    assert torch.allclose(sc.delta(), f.delta(), atol=1e-12)

    def update(operator: str, scramble: float) -> dict[str, torch.Tensor]:
        cfg = SimConfig(**(TINY | {"out": str(tmp_path / f"{operator}{scramble}"),
                                   "operator": operator, "scramble_gauge": scramble}))  # type: ignore[arg-type]  # fmt: skip
        sim = Simulation(cfg)
        sim.step()
        return {n: u.delta() for n, u in sim.server.global_update.items()}

    plain, scrambled = update("glora", 0.0), update("glora", 10.0)
    for n in plain:  # gauge invariant: the same server update up to rounding
        assert torch.allclose(plain[n], scrambled[n], atol=1e-9 * (1 + float(plain[n].abs().max())))
    fp, fs = update("fedit", 0.0), update("fedit", 10.0)
    assert any(not torch.allclose(fp[n], fs[n], atol=1e-6) for n in fp)


def test_encoder_pads_like_the_tokenizer_and_mcc() -> None:
    from transformers import AutoTokenizer

    from integration.models import Encoder, matthews_corrcoef, minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    texts = ["a short one", "a much longer sentence " * 20, "mid length text here"]
    enc = Encoder(tok, 16)
    got = enc.batch(texts, torch.device("cpu"))
    want = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert matthews_corrcoef([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert matthews_corrcoef([1, 1, 0, 0], [1, 1, 1, 1]) == 0.0  # undefined: 0, as in GLUE
    # tp=2, tn=1, fp=1, fn=0: (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1)
    assert abs(matthews_corrcoef([1, 1, 0, 0], [1, 1, 1, 0]) - 2 / 12**0.5) < 1e-12


def test_experiment_smoke_config_runs_resumably_and_writes_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from integration import experiment

    config = Path(__file__).parents[1] / "experiments" / "smoke.json"
    out, docs = tmp_path / "out", tmp_path / "docs"
    args = [str(config), "--out", str(out), "--docs", str(docs)]
    assert experiment.main(args) == 0
    cfg = json.loads(config.read_text())
    ids = [experiment.run_id(e) for e in experiment.entries(cfg)]
    assert ids[0] == experiment.CEILING_ID  # the centralised ceiling comes first
    for rid in ids:
        rec = json.loads((docs / "raw" / "smoke" / f"{rid}-seed0.json").read_text())
        assert [r["round"] for r in rec["rounds"]] == [1]
        assert {"accuracy", "eval_loss", "aggregation_error", "seconds"} <= set(rec["rounds"][0])
        assert rec["versions"]["torch"] == torch.__version__  # what computed the numbers
    ceiling = json.loads((docs / "raw" / "smoke" / "ceiling-seed0.json").read_text())
    assert ceiling["config"]["clients"] == 1
    table = (docs / "smoke.md").read_text()
    assert "Floor" in table
    assert "glora (R = 2r)" in table
    # Finished runs are skipped: a second pass trains nothing.
    monkeypatch.setattr(experiment.Simulation, "run", lambda *a, **k: pytest.fail("reran"))
    assert experiment.main(args) == 0
    assert experiment.main([*args, "--table"]) == 0
    # A folder or a record written with other settings is refused, not silently reused: the
    # record first (the driver checks the cell's records before it runs anything).
    changed = cfg | {"base": cfg["base"] | {"lr": 0.5}}
    other = tmp_path / "changed.json"
    other.write_text(json.dumps(changed))
    assert experiment.main([str(other), "--out", str(out), "--docs", str(docs)]) == 2
    capsys.readouterr()
    assert experiment.main([str(other), "--out", str(out), "--docs", str(tmp_path / "new")]) == 2
    assert "was written with another config" in capsys.readouterr().err


def test_glora_experiment_on_own_data_writes_everything_under_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from glora_math.cli import main

    rows = [(f"text number {i} is {'nice' if i % 3 else 'awful'}", "yes" if i % 3 else "no")
            for i in range(40)]  # fmt: skip
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text(
            "review\tverdict\n" + "".join(f"{t}\t{y}\n" for t, y in rows)
        )
    base = TINY | {"rounds": 1, "threads": 1, "train_file": str(tmp_path / "train.tsv"),
                   "eval_file": str(tmp_path / "dev.tsv"), "text_column": "review",
                   "label_column": "verdict"}  # fmt: skip
    cfg = {"name": "mine", "seeds": [0], "base": base, "runs": [{"operator": "fedit"}]}
    (tmp_path / "mine.json").write_text(json.dumps(cfg))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "results"
    assert main(["experiment", str(tmp_path / "mine.json"), "--out", str(out)]) == 0
    assert (out / "runs" / "fedit-seed0" / "results.json").is_file()
    assert (out / "raw" / "mine" / "fedit-seed0.json").is_file()
    table = (out / "mine.md").read_text()
    # The floor is the majority rate of the user's evaluation sample, the runner's own draw.
    from integration.runner.config import SimConfig as Sim

    ev = Sim(**base).load_data()[1]  # type: ignore[arg-type]
    want = max(ev.labels.count(y) for y in set(ev.labels)) / len(ev)
    assert f"- Floor (majority-class rate of the evaluation set): {want:.4f}" in table
    assert list(work.iterdir()) == []  # nothing written where it ran
    with pytest.raises(SystemExit):
        main(["experiment", "no_such_cell", "--out", str(out)])


def test_own_data_files_run_and_results_record_versions(tmp_path: Path) -> None:
    # A user's TSV files instead of a built-in task: two labels given by name.
    rows = [(f"text number {i} is {'nice' if i % 2 else 'awful'}", "yes" if i % 2 else "no")
            for i in range(40)]  # fmt: skip
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text(
            "review\tverdict\n" + "".join(f"{t}\t{y}\n" for t, y in rows)
        )
    metrics = _run(tmp_path, "own", rounds=1, train_file=str(tmp_path / "train.tsv"),
                   eval_file=str(tmp_path / "dev.tsv"), text_column="review",
                   label_column="verdict")  # fmt: skip
    assert len(metrics) == 1
    saved = json.loads((tmp_path / "own" / "results.json").read_text())
    assert set(saved["versions"]) >= {"python", "glora-math", "torch", "transformers", "peft",
                                      "cpu"}  # fmt: skip


def test_bad_settings_are_refused_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, match in (
        (["--client-ranks", "2,0"], "--client-ranks = 2,0 must be positive whole numbers"),
        (["--participation", "0"], "--participation = 0.0 must be in (0, 1]"),
        (["--rounds", "0"], "--rounds = 0 must be at least 1"),
        (["--client-ranks", "2,x", "--clients", "2"], "take numbers"),
        (["--task", "imdb"], "--task = 'imdb' is not one of"),
        (["--operator", "fedit", "--sketch"], "--sketch: operator 'fedit' has no randomized"),
        (["--model", "no-such-model"], "not in the Hugging Face cache; nothing is downloaded"),
        (["--model", "/"], "/ is not a Hugging Face model folder (no config.json in it)"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--train-file", "a.tsv"], "go together"),
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--version"])
    assert "glora-math" in capsys.readouterr().out


def test_target_modules_the_model_lacks_are_one_line_errors_naming_its_layers(
    tmp_path: Path,
) -> None:
    from integration.simulate import ConfigError

    cfg = SimConfig(**(TINY | {"out": str(tmp_path / "t"), "target_modules": ["query", "qkv"]}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no linear layer.*named .*query"):
        Simulation(cfg)


def test_resume_refuses_a_changed_configuration(tmp_path: Path) -> None:
    from integration.simulate import ConfigError

    _run(tmp_path, "r", rounds=1, operator="glora_auto")
    at_r = TINY | {"out": str(tmp_path / "r"), "operator": "glora_auto"}
    changed = SimConfig(**(at_r | {"operator": "fedit"}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"operator: 'glora_auto' there, 'fedit' now"):
        Simulation(changed).run(resume=True)
    # Settings that do not change results (threads, device, out) may differ.
    same = SimConfig(**(at_r | {"threads": 1}))  # type: ignore[arg-type]
    assert len(Simulation(same).run(resume=True)) == 2
    # More rounds extend a run; fewer than it has reached would make a record it is not.
    fewer = SimConfig(**(at_r | {"rounds": 1}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="has reached round 2, past the 1 rounds asked for"):
        Simulation(fewer).run(resume=True)
    # A checkpoint made with a setting this version does not have is not this run either: the
    # refusal names it (the same comparison the driver makes for run folders and records).
    from integration.runner.checkpoint import read_checkpoint, write_checkpoint

    found = read_checkpoint(tmp_path / "r")
    assert found is not None
    meta, flat = found
    meta["config"]["retired_setting"] = 3
    keep = {k: meta[k] for k in ("server", "config", "metrics")}
    write_checkpoint(tmp_path / "r", int(meta["round"]), flat, keep)
    with pytest.raises(ConfigError, match=r"retired_setting: 3 there, not a setting now"):
        Simulation(same).run(resume=True)


def test_held_out_test_set_is_evaluated_and_never_trained_on(tmp_path: Path) -> None:
    from integration.data import hold_out, load_task

    rows = _run(tmp_path, "held", test_holdout=40, rounds=1)
    assert {"test_accuracy", "test_loss"} <= set(rows[0])
    assert 0.0 <= float(rows[0]["test_accuracy"]) <= 1.0  # type: ignore[arg-type]
    sim = Simulation(SimConfig(**(TINY | {"out": str(tmp_path / "s"), "test_holdout": 40})))  # type: ignore[arg-type]
    _, test = hold_out(load_task("sst2", "train"), 40)
    assert sim.test is not None
    assert sim.test.texts == test.texts
    trained = {t for shard in sim.shards for t in shard.texts}
    assert trained.isdisjoint(test.texts)
    # Held out but not evaluated: the same training shards, no test metrics.
    quiet = SimConfig(**(TINY | {"out": str(tmp_path / "q"), "test_holdout": 40,  # type: ignore[arg-type]
                                 "evaluate_test": False}))  # fmt: skip
    assert [s.texts for s in Simulation(quiet).shards] == [s.texts for s in sim.shards]
    assert "test_accuracy" not in _run(tmp_path, "quiet", test_holdout=40, rounds=1,
                                       evaluate_test=False)[0]  # fmt: skip


def test_experiment_pairs_runs_by_seed_and_selects_on_validation(tmp_path: Path) -> None:
    from integration import experiment

    cfg = {
        "name": "paired",
        "seeds": [0, 1],
        "reference": "fedit",
        "select": {"among": ["fedit", "flexlora"]},
        "primary": {"metric": "last3", "runs": ["flexlora"], "default_rule": True},
        "base": TINY | {"rounds": 3, "test_holdout": 40, "max_len": 32, "threads": 1},
        "runs": [{"operator": "fedit"}, {"operator": "flexlora"}],
    }
    path = tmp_path / "paired.json"
    path.write_text(json.dumps(cfg))
    docs = tmp_path / "docs"
    assert experiment.main([str(path), "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 0
    text = (docs / "paired.md").read_text()
    assert "## Paired by seed against fedit" in text
    assert "Chosen by the rule: **" in text
    assert "## Primary comparisons (pre-registered): `last3`, family-wise 95%" in text
    # The paired cells are recomputed from the raw JSON: per-seed differences of the last-3
    # mean of test accuracy.
    raw = docs / "raw" / "paired"
    last3 = {
        rid: [
            sum(r["test_accuracy"] for r in json.loads(
                (raw / f"{rid}-seed{s}.json").read_text())["rounds"][-3:]) / 3
            for s in (0, 1)
        ]
        for rid in ("fedit", "flexlora")
    }  # fmt: skip
    want = experiment.paired(last3["flexlora"], last3["fedit"])
    section = text.split("## Paired by seed")[1]
    row = next(line for line in section.splitlines() if line.startswith("| flexlora |"))
    assert row.split(" | ")[3] == str(want)
    # The default rule, recomputed by hand from the same raw JSON: FlexLoRA if its primary
    # interval lies above zero, else the smaller mean aggregation error (both keep R = r)
    # unless FlexLoRA's interval lies below zero.
    err = {
        rid: sum(
            sum(r["aggregation_error"] for r in rounds) / len(rounds)
            for rounds in (json.loads((raw / f"{rid}-seed{s}.json").read_text())["rounds"]
                           for s in (0, 1))
        ) / 2
        for rid in ("fedit", "flexlora")
    }  # fmt: skip
    if want.low > 0:
        chosen = "flexlora"
    elif want.high < 0:
        chosen = "fedit"
    else:
        chosen = min(err, key=lambda rid: err[rid])
    assert f"Chosen: **{chosen}** (" in text.split("## The default, by the pre-registered rule")[1]
    # An incomplete cell chooses nothing.
    path.write_text(json.dumps(cfg | {"seeds": [0, 1, 2]}))
    assert experiment.main([str(path), "--table", "--docs", str(docs)]) == 0
    text = (docs / "paired.md").read_text()
    assert "Not applied yet: 2 of 3 seeds are in for every compared run." in text
    assert "Chosen: **" not in text


def test_any_operator_option_reaches_the_operator(tmp_path: Path) -> None:
    from integration.flower_app import FlowerConfig, FlowerConfigError

    cfg = SimConfig(**(TINY | {"out": str(tmp_path / "o"), "operator": "lora_fair",  # type: ignore[arg-type]
                               "options": {"lam": 0.5, "steps": 3.0}}))  # fmt: skip
    assert Simulation(cfg).server.options == {"lam": 0.5, "steps": 3.0}
    wrong = SimConfig(**(TINY | {"operator": "fedit", "options": {"lam": 0.5}}))  # type: ignore[arg-type]
    assert any("--options = lam=0.5 names ['lam']" in p for p in wrong.problems())
    parsed, _ = parse_args(["--operator", "lora_fair", "--options", "lam=0.5,steps=3"])
    assert parsed.options == {"lam": 0.5, "steps": 3.0}
    flower = FlowerConfig.from_run_config({"operator": "lora_fair", "options": "lam=0.5"})
    assert flower.operator_options() == {"lam": 0.5}
    with pytest.raises(FlowerConfigError, match="options"):
        FlowerConfig.from_run_config({"operator": "fedit", "options": "lam=0.5"})


def test_counterfactual_rounds_use_the_same_uploads_and_change_nothing(tmp_path: Path) -> None:
    base = {"rounds": 2, "test_holdout": 40, "operator": "glora_auto"}
    plain = _run(tmp_path, "plain", **base)
    cf = ["glora_auto", "fedit", "flexlora", "glora"]  # the run's own operator first
    rows = _run(tmp_path, "cf", counterfactual=cf, **base)
    again = _run(tmp_path, "again", counterfactual=cf, **base)
    for p, r, a in zip(plain, rows, again, strict=True):
        # The run itself is bit-identical with or without its counterfactual rounds ...
        for key in ("accuracy", "eval_loss", "test_accuracy", "test_loss", "aggregation_error"):
            assert p[key] == r[key]
        # ... and so are the counterfactual rounds on a rerun.
        assert r["counterfactual"] == a["counterfactual"]
        got = r["counterfactual"]
        assert list(got) == cf  # type: ignore[arg-type]
        # The run's own operator on the same uploads is the run's own global model.
        own = got["glora_auto"]  # type: ignore[index]
        assert own["split"] == "test"
        assert (own["accuracy"], own["loss"]) == (r["test_accuracy"], r["test_loss"])
        assert own["aggregation_error"] == r["aggregation_error"]
        assert got["glora"]["certified_residual"] is not None  # type: ignore[index]
    assert any(
        "--counterfactual" in m for m in SimConfig(counterfactual=["fedrot_lora"]).problems()
    )
    parsed, _ = parse_args(["--counterfactual", "fedit,glora"])
    assert parsed.counterfactual == ["fedit", "glora"]


def test_one_round_further_arms_reproduce_the_run_and_change_nothing(tmp_path: Path) -> None:
    # Arm (b) and the broadcast-split arm train forks of the server one round further. The
    # run's own operator in arm (b), and its "own" split, are exactly the run's next round (the
    # same uploads, the same batches); the run itself is bit-identical with or without them.
    base = {"rounds": 3, "test_holdout": 40, "operator": "fedit"}
    plain = _run(tmp_path, "plain", **base)
    rows = _run(
        tmp_path, "arms", counterfactual=["fedit", "glora_auto"], counterfactual_next=True,
        broadcast_splits=["own", "balanced", "left", "right"], counterfactual_every=2, **base,
    )  # fmt: skip
    for p, r in zip(plain, rows, strict=True):
        for key in ("accuracy", "test_accuracy", "test_loss", "aggregation_error"):
            assert p[key] == r[key]
    assert [("counterfactual_next" in r, "broadcast_split" in r) for r in rows] == [
        (True, True),
        (False, False),
        (True, True),
    ]  # rounds 1 and 3 (every 2)
    nxt, split, later = rows[0]["counterfactual_next"], rows[0]["broadcast_split"], rows[1]
    for own in (nxt["fedit"], split["own"]):  # type: ignore[index]
        assert own["split"] == "test"
        assert (own["loss"], own["accuracy"]) == (later["test_loss"], later["test_accuracy"])
        assert own["aggregation_error"] == later["aggregation_error"]
    # The other splits hand back the same product in other gauges: FedIT's next aggregate,
    # an average of factors, differs (the arm measures something).
    assert {k: v["loss"] for k, v in split.items()} != dict.fromkeys(split, split["own"]["loss"])  # type: ignore[union-attr,index]
    assert nxt["glora_auto"]["certified_residual"] is not None  # type: ignore[index]
    bad = SimConfig(counterfactual_next=True, broadcast_splits=["top"], counterfactual_every=0)
    found = " ".join(bad.problems())
    for flag in ("--counterfactual-next", "--broadcast-splits", "--counterfactual-every"):
        assert flag in found
    for op in ("ffa_lora", "flora"):  # frozen factors; clients restart: nothing to re-split
        assert "does not broadcast one update" in " ".join(
            SimConfig(operator=op, broadcast_splits=["own", "left"]).problems()
        )
    assert "must include own" in " ".join(SimConfig(broadcast_splits=["left"]).problems())
    assert "list the run's own operator" in " ".join(
        SimConfig(operator="fedit", counterfactual=["glora"], counterfactual_next=True).problems()
    )
    parsed, _ = parse_args(["--broadcast-splits", "own,left", "--counterfactual-every", "3"])
    assert (parsed.broadcast_splits, parsed.counterfactual_every) == (["own", "left"], 3)
    for every in (2.5, "3", True):  # a config file's value is refused, not rounded or crashed
        assert f"--counterfactual-every must be an integer >= 1, got {every!r}" in " ".join(
            SimConfig(counterfactual_every=every).problems()  # type: ignore[arg-type]
        )


def test_fork_and_rebroadcast_leave_the_server_alone() -> None:
    from glora_math.errors import GloraError
    from integration.federated.server import FederatedServer
    from integration.peft.io import AdapterModule, ClientAdapter

    def adapter(seed: int) -> ClientAdapter:
        g = torch.Generator().manual_seed(seed)
        B = torch.randn(6, 2, generator=g, dtype=torch.float64)
        A = torch.randn(2, 5, generator=g, dtype=torch.float64)
        return ClientAdapter({"m": AdapterModule("m", LoRAFactors(B, A), 8.0, False)})

    srv = FederatedServer("fedit")
    srv.aggregate([0, 1], [adapter(0), adapter(1)], [1.0, 1.0])
    before = {
        c: {n: (f.B.clone(), f.A.clone()) for n, f in m.items()} for c, m in srv.client_init.items()
    }
    fork = srv.fork()
    fork.rebroadcast("right")
    for c, mods in srv.client_init.items():  # the original keeps what it sent
        assert torch.equal(mods["m"].B, before[c]["m"][0])
    upd = srv.global_update["m"]
    got = fork.client_init[0]["m"]
    tol = product_tol(torch.float64, n=6, scale=float(upd.B.norm() * upd.A.norm()))
    assert float((got.delta() - upd.delta()).norm()) <= tol  # one product, another gauge
    eye = torch.eye(2, dtype=torch.float64)
    assert float((got.B.T @ got.B - eye).norm()) <= product_tol(torch.float64, n=6, scale=1.0)
    with pytest.raises(GloraError, match="stateful"):
        srv.fork("fedrot_lora")
    flora = FederatedServer("flora")
    flora.aggregate([0, 1], [adapter(0), adapter(1)], [1.0, 1.0])
    with pytest.raises(GloraError, match="nothing to split"):
        flora.fork().rebroadcast("left")


def test_experiment_tables_the_counterfactual_rounds(tmp_path: Path) -> None:
    from integration import experiment

    cfg = {
        "name": "cf",
        "seeds": [0, 1],
        "base": TINY
        | {"rounds": 2, "test_holdout": 40, "max_len": 32, "threads": 1, "operator": "fedit"},
        "runs": [
            {
                "operator": "fedit",
                "counterfactual": ["fedit", "flexlora", "glora_auto"],
                "counterfactual_next": True,
                "broadcast_splits": ["own", "left"],
                "counterfactual_every": 2,
            }
        ],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(cfg))
    docs = tmp_path / "docs"
    assert experiment.main([str(path), "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 0
    text = (docs / "cf.md").read_text()
    assert "## The aggregation step isolated (counterfactual rounds)" in text
    # arm (a) and arm (b): 2 operators against FedIT each; the split: left against own
    assert "this section holds 5 comparisons, none corrected for the others." in text
    assert "Interim" not in text  # both seeds are in
    for name in ("| fedit |", "| flexlora |", "| glora_auto |"):
        assert name in text.split("counterfactual rounds")[-1]
    rid = experiment.run_id(cfg["runs"][0])  # type: ignore[index]
    rounds = json.loads((docs / "raw" / "cf" / f"{rid}-seed0.json").read_text())["rounds"]
    assert set(rounds[0]["counterfactual"]) == {"fedit", "flexlora", "glora_auto"}
    assert set(rounds[0]["counterfactual_next"]) == {"fedit", "flexlora", "glora_auto"}
    assert set(rounds[0]["broadcast_split"]) == {"own", "left"}
    assert "counterfactual_next" not in rounds[1]  # every 2 rounds: round 1 only
    arm_b = text.split("#### Arm (b)")[1].split("####")[0]
    assert "2 seeds, rounds [1]" in arm_b
    assert "| flexlora |" in arm_b
    assert "| fedit | " in arm_b
    assert "(reference)" in arm_b
    split = text.split("#### Broadcast split")[1]
    assert "| left |" in split
    assert "| own |" in split


def test_the_runner_saves_the_global_adapter_peft_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    from glora_math.tolerances import storage_tol
    from integration.models import build_model
    from integration.peft_io import load_adapter

    cfg = SimConfig(**(TINY | {"out": str(tmp_path / "run"), "save_every_round": True}))  # type: ignore[arg-type]
    sim = Simulation(cfg)
    sim.run()
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["label_names"] == ["0", "1"]
    assert results["global_adapter"] == [
        "global_adapter/adapter_model.safetensors",
        "global_adapter/adapter_config.json",
    ]
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["1", "2"]
    assert not (out / "global_adapter.tmp").exists()
    saved = load_adapter(out / "global_adapter")
    for name, f in sim.server.global_update.items():
        got = saved.modules[name].factors
        scale = float(f.B.norm() * f.A.norm())
        # Unfolding and refolding the LoRA scale rounds once in the stored dtype (float32).
        assert float((got.delta().double() - f.delta().double()).norm()) <= storage_tol(
            torch.float32, scale=scale
        )
    base, _ = build_model("tiny-roberta", sim.num_labels, cfg.seed)
    model = PeftModel.from_pretrained(base, str(out / "global_adapter"))
    batch = sim.tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, sim.num_labels)


def test_every_shipped_experiment_cell_is_a_valid_plan(tmp_path: Path) -> None:
    # Each cell's every (entry, seed) passes the settings' checks before anything is loaded,
    # so that a cell queued for hours does not fail on a typo at its 40th run.
    from integration.runner.experiment import cell_problems, plan

    cells = sorted((Path(__file__).parents[1] / "experiments").glob("*.json"))
    assert len(cells) >= 10
    for path in cells:
        config = json.loads(path.read_text())
        assert cell_problems(config) == [], path.name
        runs = plan(config, tmp_path)
        assert runs, path.name
        for _, _, cfg in runs:
            assert cfg.problems() == [], (path.name, cfg.problems())


def test_an_entry_with_its_own_seeds_runs_only_at_those(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A reference that is in no comparison may run at fewer seeds than the compared runs; its
    # ``seeds`` are not a setting (same folder and id as without them) and must be the cell's.
    from integration.runner.experiment import main, plan, run_id

    base = {"model": "tiny-roberta", "task": "sst2", "rounds": 1}
    config = {
        "seeds": [0, 1, 2],
        "base": base,
        "ceiling": {"seeds": [0]},
        "runs": [{"operator": "fedit"}, {"operator": "flexlora", "seeds": [1, 2]}],
    }
    runs = [(run_id(e), s) for e, s, _ in plan(config, tmp_path)]
    assert runs == [("ceiling", 0), ("fedit", 0), ("fedit", 1), ("flexlora", 1),
                    ("fedit", 2), ("flexlora", 2)]  # fmt: skip
    folders = {Path(cfg.out).name for _, _, cfg in plan(config, tmp_path)}
    assert "flexlora-seed1" in folders
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(config | {"runs": [{"operator": "fedit", "seeds": [0, 5]}]}))
    with pytest.raises(SystemExit):
        main([str(path), "--list"])
    assert "fedit: its seeds [5] are not among the cell's" in capsys.readouterr().err
    # A compared run (here the reference) must run at every seed, or nothing could be paired.
    path.write_text(json.dumps(config | {"reference": "flexlora"}))
    with pytest.raises(SystemExit):
        main([str(path), "--list"])
    assert "flexlora: a compared run" in capsys.readouterr().err


def test_a_cell_config_is_checked_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The cell's seeds, its reference and its primary comparisons are checked with the
    # entries, in one line each, before a run or a table starts (not hours later, at the
    # first table).
    from integration.runner.experiment import cell_problems, main

    base = {"model": "tiny-roberta", "task": "sst2", "rounds": 1}
    good = {"seeds": [0, 1], "base": base, "reference": "fedit",
            "primary": {"metric": "last3", "runs": ["flexlora"]},
            "runs": [{"operator": "fedit"}, {"operator": "flexlora"},
                     {"operator": "fedit", "id": "central", "compared": False}]}  # fmt: skip
    assert cell_problems(good) == []
    cases = {
        "'seeds' must be a non-empty list of integers, got None": {"seeds": None},
        "'seeds' must be a non-empty list of integers, got []": {"seeds": []},
        "reference 'fedavg' is not a run of the cell": {"reference": "fedavg"},
        "primary: metric 'best' is not one of": {"primary": {"metric": "best",
                                                              "runs": ["flexlora"]}},
        "primary: runs ['central'] are not compared runs": {"primary": {"metric": "last3",
                                                                         "runs": ["central"]}},
        "select: runs ['lr9'] are not runs of the cell": {"select": {"among": ["fedit", "lr9"]}},
        "select: 'among' must be a non-empty list of run ids, got []": {"select": {"among": []}},
    }  # fmt: skip
    path = tmp_path / "cell.json"
    for message, change in cases.items():
        config = good | change
        assert any(message in m for m in cell_problems(config)), (message, cell_problems(config))
        path.write_text(json.dumps(config))
        with pytest.raises(SystemExit) as exc:
            main([str(path), "--table", "--out", str(tmp_path / "o")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    path.write_text(json.dumps(good))
    with pytest.raises(SystemExit):
        main([str(path), "--list", "--seeds", "0,x"])
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was written for a refused config


def test_list_says_where_each_run_stands(tmp_path: Path) -> None:
    from dataclasses import asdict

    from integration.runner.experiment import RunFolderError, RunState, run_state
    from integration.runner.files import held

    cfg = SimConfig(model="tiny-roberta", rounds=20, out=str(tmp_path / "run"))
    assert str(run_state(cfg)) == "not started"
    with pytest.raises(ValueError, match="status 'recorded' with record None"):
        RunState("recorded", 20, 20)  # a recorded run names its record
    (tmp_path / "run").mkdir()
    assert str(run_state(cfg)) == "not started"
    with held(tmp_path / "run"):  # a process has started it and saved no round yet
        assert str(run_state(cfg)) == "round 0 of 20, running"
    (tmp_path / "run" / "checkpoint.json").write_text('{"round": 7}')
    assert str(run_state(cfg)) == "round 7 of 20, stopped"
    state = run_state(cfg)
    assert (state.status, state.done, state.finished) == ("stopped", 7, False)
    with held(tmp_path / "run"):  # a process is running it
        assert str(run_state(cfg)) == "round 7 of 20, running"
    (tmp_path / "run" / "checkpoint.json").write_text('{"round": ')
    assert str(run_state(cfg)).startswith("checkpoint unreadable")
    (tmp_path / "run" / "results.json").write_text("{}")  # damaged: no config
    with pytest.raises(RunFolderError, match="is unreadable or holds no config"):
        run_state(cfg)
    (tmp_path / "run" / "results.json").unlink()
    # A checkpoint saved by the same run with fewer rounds asked for: the run is extended.
    (tmp_path / "run" / "checkpoint.json").write_text(
        json.dumps({"round": 7, "config": asdict(cfg) | {"rounds": 10}})
    )
    assert str(run_state(cfg)) == "round 7 of 20, stopped"
    past = dataclasses.replace(cfg, rounds=5)  # now asks for fewer rounds than it has run
    with pytest.raises(RunFolderError, match="has reached round 7, past the 5 rounds the run"):
        run_state(past)
    (tmp_path / "run" / "checkpoint.json").write_text(  # any other setting: refused
        json.dumps({"round": 7, "config": asdict(cfg) | {"rounds": 10, "lr": 1}})
    )
    with pytest.raises(RunFolderError, match=r"checkpoint.json was written with another config"):
        run_state(cfg)
    (tmp_path / "run" / "results.json").write_text(json.dumps({"config": asdict(cfg)}))
    with pytest.raises(RunFolderError, match="holds no config or metrics"):  # no metrics
        run_state(cfg)
    (tmp_path / "run" / "results.json").write_text(
        json.dumps({"config": asdict(cfg), "metrics": []})
    )
    assert str(run_state(cfg)) == "finished"
    (tmp_path / "run" / "results.json").write_text(
        json.dumps({"config": asdict(cfg) | {"lr": 1}, "metrics": []})
    )
    with pytest.raises(RunFolderError, match=r"written with another config \(lr: 1 there"):
        run_state(cfg)


def test_list_estimates_the_time_left_round_by_round_from_finished_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--list` says how long the runs left take: each round at the median, over the run's
    # finished seeds, of what that round took (a round paused for hours in one seed does not
    # count), from the round a stopped run has saved; a run with no finished seed is not
    # estimated, and a cell with nothing finished gets no estimate.
    from dataclasses import asdict

    from integration.runner.experiment import main, plan
    from integration.tests.synthetic import CELL, synthetic_cell

    config = CELL | {"seeds": [0, 1, 2, 3], "runs": [*CELL["runs"], {"operator": "glora_auto"}]}
    path, out, docs = tmp_path / "cell.json", tmp_path / "out", tmp_path / "docs"
    path.write_text(json.dumps(config))
    assert main([str(path), "--out", str(out), "--docs", str(docs), "--list"]) == 0
    assert (
        capsys.readouterr()
        .out.rstrip()
        .endswith(  # nothing finished: no estimate
            "20 runs left, not estimated (no finished seed of their run)"
        )
    )
    synthetic_cell(docs / "raw" / "cell", [0, 1, 2], config)  # every round took 1 s
    hours = {0: [1, 2, 3], 1: [3, 4, 100], 2: [2, 3, 4]}  # fedit; round-wise medians 2, 3, 4
    for seed, took in hours.items():
        f = docs / "raw" / "cell" / f"fedit-seed{seed}.json"
        rec = json.loads(f.read_text())
        for row, h in zip(rec["rounds"], took, strict=True):
            row["seconds"] = 3600.0 * h
        f.write_text(json.dumps(rec))
    (cfg,) = [c for e, s, c in plan(config, out / "runs") if s == 3 and e["operator"] == "fedit"
              and "id" not in e]  # fmt: skip
    Path(cfg.out).mkdir(parents=True)  # fedit seed 3 stopped after its first round
    (Path(cfg.out) / "checkpoint.json").write_text(json.dumps({"round": 1, "config": asdict(cfg)}))
    assert main([str(path), "--out", str(out), "--docs", str(docs), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "[round 1 of 3, stopped]" in listed
    # fedit: rounds 2 and 3 at 3 h and 4 h; flexlora, glora_auto_rank, central: 3 s each.
    assert listed.rstrip().endswith(
        "about 7.0 one-core hours left for 4 runs (each round at the median seconds of that "
        "round over the run's finished seeds); 4 runs not estimated (no finished seed of "
        "their run)"
    )
    # --seeds lists seed 3 only; the pace still comes from every finished seed of the cell.
    assert main([str(path), "--out", str(out), "--docs", str(docs), "--list", "--seeds", "3"]) == 0
    assert "about 7.0 one-core hours left for 4 runs" in capsys.readouterr().out
    # Where no run left has a finished seed of its own, they are counted, not estimated.
    only = {k: v for k, v in config.items() if k != "primary"}
    path.write_text(
        json.dumps(only | {"runs": [{"operator": "fedit"}, {"operator": "glora_auto"}]})
    )
    assert main([str(path), "--out", str(out), "--docs", str(docs), "--list", "--seeds", "0"]) == 0
    assert (
        capsys.readouterr()
        .out.rstrip()
        .endswith(
            "1 of 2 runs finished, 0 running, 0 stopped partway (they resume)\n"
            "1 run left, not estimated (no finished seed of their run)"
        )
    )


def test_a_fresh_clone_continues_a_cell_from_its_committed_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Run folders are not committed; the raw JSON is. A fresh clone (the run folders gone)
    # must take a run whose raw JSON was written with the same settings as done, not redo
    # it (hours, for a real cell), and must refuse a record written with other settings
    # rather than overwrite it or take it for this run.
    import shutil

    from integration.runner.experiment import main

    base = {"model": "tiny-roberta", "task": "sst2", "clients": 2, "rounds": 1,
            "local_steps": 1, "batch_size": 4, "rank": 2, "max_train": 16, "max_eval": 8,
            "max_len": 16, "threads": 1}  # fmt: skip
    config = {"name": "cell", "seeds": [0, 1], "base": base, "runs": [{"operator": "fedit"}]}
    path, out, docs = tmp_path / "cell.json", tmp_path / "out", tmp_path / "docs"
    path.write_text(json.dumps(config | {"seeds": [0]}))
    assert main([str(path), "--out", str(out), "--docs", str(docs)]) == 0
    record = docs / "raw" / "cell" / "fedit-seed0.json"
    written = record.read_bytes()
    shutil.rmtree(out)  # a fresh clone: the record without the run folder

    path.write_text(json.dumps(config))
    assert main([str(path), "--out", str(out), "--docs", str(docs), "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"fedit seed 0: {out / 'runs' / 'fedit-seed0'} [finished (recorded in {record})]" in (
        listed
    )
    assert f"fedit seed 1: {out / 'runs' / 'fedit-seed1'} [not started]" in listed
    assert "1 of 2 runs finished, 0 running, 0 stopped partway" in listed
    assert main([str(path), "--out", str(out), "--docs", str(docs)]) == 0
    said = capsys.readouterr().out
    assert f"fedit seed 0 is recorded in {record}; skipping it" in said
    assert "running fedit seed 1" in said
    assert "running fedit seed 0" not in said
    assert not (out / "runs" / "fedit-seed0").exists()
    assert record.read_bytes() == written

    # The same run with another learning rate: the record is not this run's.
    path.write_text(json.dumps(config | {"base": base | {"lr": 0.5}}))
    for args in ([], ["--list"]):
        assert main([str(path), "--out", str(out), "--docs", str(docs), *args]) == 2
        err = capsys.readouterr().err
        assert f"{record} records this run with other settings (lr: " in err
        assert "restore the cell's config" in err
    assert record.read_bytes() == written
    # The device is not a setting: a record computed on a GPU is the same run.
    rec = json.loads(written)
    record.write_text(json.dumps(rec | {"config": rec["config"] | {"device": "cuda"}}))
    path.write_text(json.dumps(config | {"seeds": [0]}))
    assert main([str(path), "--out", str(out), "--docs", str(docs)]) == 0
    assert "fedit seed 0 is recorded in" in capsys.readouterr().out
    record.write_text(json.dumps(rec | {"rounds": []}))  # a record missing its round
    assert main([str(path), "--out", str(out), "--docs", str(docs)]) == 2
    assert f"{record} holds 0 of the run's 1 rounds" in capsys.readouterr().err
    record.write_text('{"config": ')
    assert main([str(path), "--out", str(out), "--docs", str(docs)]) == 2
    assert f"{record}: unreadable raw record" in capsys.readouterr().err
    # A fresh --out without --docs has its own (empty) record: everything is computed there.
    fresh = tmp_path / "fresh"
    assert main([str(path), "--out", str(fresh)]) == 0
    assert "running fedit seed 0" in capsys.readouterr().out
    again = json.loads((fresh / "raw" / "cell" / "fedit-seed0.json").read_text())["rounds"]
    timing = ("seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == [
        {k: v for k, v in r.items() if k not in timing} for r in rec["rounds"]
    ]  # the runner is deterministic: recomputed, the same numbers


def test_a_run_folder_with_other_settings_is_refused_naming_what_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The twin of the record's check: a run folder's results.json written with another
    # setting stops the driver (nothing is run or overwritten) and says which setting.
    from dataclasses import asdict

    from integration.runner.experiment import main, plan

    config = {"name": "cell", "seeds": [0], "base": {"model": "tiny-roberta", "rounds": 1},
              "runs": [{"operator": "fedit"}]}  # fmt: skip
    path, out = tmp_path / "cell.json", tmp_path / "out"
    path.write_text(json.dumps(config))
    ((_, _, cfg),) = plan(config, out / "runs")
    folder = Path(cfg.out)
    folder.mkdir(parents=True)
    saved = json.dumps({"config": asdict(cfg) | {"lr": 0.5}, "metrics": []})
    (folder / "results.json").write_text(saved)
    assert main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"glora experiment: error: {folder / 'results.json'} was written with "
                          "another config (lr: 0.5 there, ")  # fmt: skip
    assert (folder / "results.json").read_text() == saved
    assert not (out / "raw").exists() or not any((out / "raw").rglob("*.json"))
    # A damaged results.json (not JSON, or JSON without a config) is refused the same way,
    # naming the file and what to do, and left as it is.
    for damaged in ("{not json", json.dumps({"metrics": []}), json.dumps([1, 2])):
        (folder / "results.json").write_text(damaged)
        assert main([str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{folder / 'results.json'} is unreadable or holds no config or metrics (" in err
        assert f"remove {folder} to rerun the run" in err
        assert (folder / "results.json").read_text() == damaged


def test_every_committed_run_counts_as_finished_for_its_cell(tmp_path: Path) -> None:
    # The committed raw JSON of a shipped cell's run must match the cell's config as it is
    # now: an edited config, or a setting whose default changed, would stop a queued chain
    # at that run ("records this run with other settings") instead of failing here.
    from integration.runner.experiment import plan, raw_file, recorded, run_id

    docs = Path(__file__).parents[2] / "docs" / "experiments" / "raw"
    if not docs.is_dir():
        pytest.skip("the committed record (docs/experiments/raw) is in the source checkout")
    checked = 0
    for path in sorted((Path(__file__).parents[1] / "experiments").glob("*.json")):
        config = json.loads(path.read_text())
        cell = str(config.get("name") or path.stem)
        for entry, seed, cfg in plan(config, tmp_path):
            record = raw_file(docs / cell, run_id(entry), seed)
            if record.is_file():
                assert recorded(cfg, record), record
                checked += 1
    assert checked >= 200


def test_processes_share_a_cell_a_run_held_elsewhere_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another process holding a run's folder is running that run: the driver leaves it to that
    # process, runs the rest, and --list says which is running and how many are done.
    import fcntl
    import os

    from integration.runner.experiment import main

    config = Path(__file__).parents[1] / "experiments" / "smoke.json"
    out, docs = tmp_path / "out", tmp_path / "docs"
    taken = out / "runs" / "glora_auto-seed0"
    taken.mkdir(parents=True)
    fd = os.open(taken, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main([str(config), "--out", str(out), "--docs", str(docs)]) == 0
        said = capsys.readouterr().out
        assert "skipping glora_auto seed 0: another process is running it" in said
        raw = docs / "raw" / "smoke"
        assert not (raw / "glora_auto-seed0.json").exists()
        assert (raw / "fedit-seed0.json").is_file()
        assert main([str(config), "--out", str(out), "--list"]) == 0
        listed = capsys.readouterr().out
        assert "glora_auto seed 0: " in listed
        assert "[round 0 of 1, running]" in listed.split("glora_auto seed 0: ")[1].splitlines()[0]
        assert "5 of 6 runs finished, 1 running, 0 stopped partway" in listed
    finally:
        os.close(fd)


def test_shipped_cells_share_a_run_folder_only_for_the_same_run(tmp_path: Path) -> None:
    # Cells may share an output folder so that identical runs are done once; two different
    # runs in one folder would stop the second cell at its first run ("written with another
    # config"), hours after it was queued.
    from dataclasses import asdict

    from integration.runner.config import results_config
    from integration.runner.experiment import plan

    seen: dict[str, tuple[str, dict[str, object]]] = {}
    for path in sorted((Path(__file__).parents[1] / "experiments").glob("*.json")):
        config = json.loads(path.read_text())
        out = tmp_path / str(config.get("out") or path.stem)
        for _, _, cfg in plan(config, out):
            settings = results_config(asdict(cfg))
            first = seen.setdefault(cfg.out, (path.name, settings))
            assert first[1] == settings, f"{path.name} and {first[0]} both use {cfg.out}"


def test_the_run_queue_runs_every_cell_study_f_still_needs_once() -> None:
    # The two chains of run_queue.sh are how study F's cells get computed on a 2-core
    # machine: a cell left out, named twice or misspelt would be noticed only hours later.
    import re

    root = Path(__file__).parents[1] / "experiments"
    script = (root / "run_queue.sh").read_text()
    named = re.findall(r"\$X/([\w.]+)\.json", script)
    assert all((root / f"{n}.json").is_file() for n in named), named
    cells = {"f_sst2_powered", "g_sst2_counterfactual", "h_llm_subj", "i_sst2_alpha0.1",
             "j_sst2_steps50", "k_sst2_hetero", "l_sst2_alpha0.1_counterfactual",
             "m_sst2_counterfactual_flexlora"}  # fmt: skip
    assert set(named) == cells
    # Each cell once, except the powered cell, whose seeds the two chains split between them.
    assert sorted(n for n in named if n != "f_sst2_powered") == sorted(cells - {"f_sst2_powered"})
    seeds = [{int(s) for s in m.split(",")} for m in re.findall(r"--seeds ([\d,]+)", script)]
    assert len(seeds) == 2
    assert not seeds[0] & seeds[1]
    powered = json.loads((root / "f_sst2_powered.json").read_text())
    assert seeds[0] | seeds[1] == set(powered["seeds"])


def test_no_two_runs_of_a_cell_look_alike_in_its_curves() -> None:
    # The issue asks for plots where no two operators share a colour, and a distinct colour
    # and line style per operator: up to 20 runs, all colours differ; up to 80, no two runs
    # share colour, line style and marker.
    from integration.runner.tables import plot_styles

    for n in (1, 6, 10, 11, 20):
        colours = [s["color"] for s in plot_styles(n)]
        assert len(set(colours)) == n, n
    looks = [(s["color"], s["linestyle"], s["marker"]) for s in plot_styles(80)]
    assert len(set(looks)) == 80
