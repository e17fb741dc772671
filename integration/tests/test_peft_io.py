"""peft adapters <-> folded factors, against real peft models (tiny random configs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from glora_math import NonFiniteError, ShapeMismatchError, glora_aggregate, readout
from glora_math.errors import OptionError, ResidualWarning
from glora_math.tolerances import certificate_tol, product_tol
from integration.peft_io import (
    AdapterError,
    adapter_from_state_dict,
    aggregate_adapters,
    load_adapter,
    save_adapter,
)

TINY = RobertaConfig(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=40,
    num_labels=2,
)


def _peft_roberta(seed: int, **lora: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = RobertaForSequenceClassification(TINY)
    cfg = LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"], **lora)  # type: ignore[arg-type]
    model = get_peft_model(base, cfg)
    # peft initialises B = 0; give every adapter a non-zero update so products are testable.
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0.0, 0.5)
    return model


def _adapter_folders(tmp_path: Path, n: int = 3) -> list[str]:
    """``n`` saved peft adapter folders (rank 4, independent inits and B's)."""
    folders = []
    for s in range(n):
        folders.append(str(tmp_path / f"c{s}"))
        _peft_roberta(s, r=4, lora_alpha=8).save_pretrained(folders[-1])
    return folders


def _deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's own delta weights (scale included, in the base weight's layout)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").detach()
    return out


def _tol(x: torch.Tensor) -> float:
    return product_tol(x.dtype, n=sum(x.shape), scale=float(x.norm()) + 1.0)


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "use_rslora": True},
        {
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"layer.1.attention.self.query": 2},
            "alpha_pattern": {"value": 16},
        },
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_folded_factors_reproduce_peft_delta_weights(lora: dict[str, object]) -> None:
    model = _peft_roberta(0, **lora)
    cfg = model.peft_config["default"].to_dict()
    adapter = adapter_from_state_dict(get_peft_model_state_dict(model), cfg)
    deltas = _deltas(model)
    assert set(adapter.modules) == set(deltas)
    for name, mod in adapter.modules.items():
        assert float((mod.factors.delta() - deltas[name]).norm()) <= _tol(deltas[name]), name
    assert any(k.startswith("classifier") for k in adapter.dense)  # modules_to_save head


def test_fan_in_fan_out_layers_keep_the_out_in_product() -> None:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    )
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_()
    adapter = adapter_from_state_dict(
        get_peft_model_state_dict(model), model.peft_config["default"].to_dict()
    )
    deltas = _deltas(model)
    for name, mod in adapter.modules.items():
        assert mod.fan_in_fan_out
        # peft's delta for Conv1D is (B A)^T: the base weight is (in, out).
        assert float((mod.factors.delta().mT - deltas[name]).norm()) <= _tol(deltas[name])


@pytest.mark.parametrize("operator", ["glora", "glora_auto", "glora_auto_rank"])
def test_written_readouts_load_into_peft_with_the_same_product(
    tmp_path: Path, operator: str
) -> None:
    clients = [_peft_roberta(s, r=4, lora_alpha=8) for s in range(3)]
    adapters = [
        adapter_from_state_dict(get_peft_model_state_dict(m), m.peft_config["default"].to_dict())
        for m in clients
    ]
    want = [{name: r for name in adapters[0].modules} for r in (2, 3, 4)]  # heterogeneous
    rnd = aggregate_adapters(
        adapters, [1.0, 2.0, 3.0], operator=operator, rank=6, client_ranks=want
    )
    # Every module is certified; readouts of either side are written and loaded the same way.
    assert all(res.certificate is not None for res in rnd.results.values())
    out = tmp_path / "client1"
    mods = rnd.client_modules[1]
    assert mods is not None
    save_adapter(out, mods, rnd.dense, adapters[0].config)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3
    torch.manual_seed(1)
    fresh = PeftModel.from_pretrained(RobertaForSequenceClassification(TINY), str(out))
    deltas = _deltas(fresh)
    for name, f in mods.items():
        assert f.rank == 3
        assert float((f.delta() - deltas[name]).norm()) <= _tol(deltas[name])
    # And a reload through safetensors gives the same folded factors back.
    again = load_adapter(out)
    for name, f in mods.items():
        assert float((again.modules[name].factors.delta() - f.delta()).norm()) <= _tol(f.delta())


def test_batched_adapter_aggregation_equals_the_per_module_operator() -> None:
    models = [_peft_roberta(s, r=4, lora_alpha=8) for s in range(4)]
    adapters = [
        adapter_from_state_dict(get_peft_model_state_dict(m), m.peft_config["default"].to_dict())
        for m in models
    ]
    w = [1.0, 1.0, 2.0, 4.0]
    rnd = aggregate_adapters(adapters, w, operator="glora", rank=5)
    for name in adapters[0].modules:
        ref = glora_aggregate([a.modules[name].factors for a in adapters], w, rank=5)
        got = rnd.results[name].update.delta()
        assert float((got - ref.delta()).norm()) <= _tol(ref.delta()) * 10, name
        r4 = readout(ref, 4)
        mods = rnd.client_modules[0]
        assert mods is not None
        assert float((mods[name].delta() - r4.delta()).norm()) <= _tol(ref.delta()) * 10
    # modules_to_save: plain FedAvg with normalised weights.
    p = torch.tensor(w) / sum(w)
    for key, value in rnd.dense.items():
        manual = sum(float(p[i]) * a.dense[key] for i, a in enumerate(adapters))
        assert torch.allclose(value, manual, rtol=0, atol=_tol(manual))


@pytest.mark.parametrize("operator", ["fedit", "flexlora", "fedex_lora", "flora", "fedrot_lora"])
def test_other_operators_run_on_whole_adapters(operator: str) -> None:
    models = [_peft_roberta(s, r=2, lora_alpha=4) for s in range(3)]
    adapters = [
        adapter_from_state_dict(get_peft_model_state_dict(m), m.peft_config["default"].to_dict())
        for m in models
    ]
    rnd = aggregate_adapters(adapters, operator=operator, rank=2)
    assert set(rnd.results) == set(adapters[0].modules)
    if operator == "flora":
        assert rnd.client_modules == [None, None, None]  # clients re-initialise
    else:
        assert all(m is not None for m in rnd.client_modules)


def test_bad_payloads_are_rejected_naming_client_and_module(tmp_path: Path) -> None:
    models = [_peft_roberta(s, r=2, lora_alpha=4) for s in range(2)]
    sds = [get_peft_model_state_dict(m) for m in models]
    cfg = models[0].peft_config["default"].to_dict()
    key = next(k for k in sds[1] if "lora_A" in k)
    # NaN in client 1.
    bad = dict(sds[1])
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="client 1"):
        adapter_from_state_dict(bad, cfg, client=1)
    # A missing lora_B.
    half = {k: v for k, v in sds[1].items() if k != key.replace("lora_A", "lora_B")}
    with pytest.raises(
        AdapterError, match=r"module '.+query', client 1: has lora_A but not its partner"
    ):
        adapter_from_state_dict(half, cfg, client=1)
    # Different module sets / shapes across clients.
    a0 = adapter_from_state_dict(sds[0], cfg)
    a1 = adapter_from_state_dict({k: v for k, v in sds[1].items() if "layer.1" not in k}, cfg)
    with pytest.raises(AdapterError, match="client 1: module set differs"):
        aggregate_adapters([a0, a1], rank=2)
    # A pickle payload is never read: only safetensors + JSON.
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(sds[0], folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps(cfg, default=str))
    with pytest.raises(
        AdapterError, match=r"client 3: .* adapter_model\.bin, a pickle, which is never"
    ):
        load_adapter(folder, client=3)
    from glora_math import LoRAFactors
    from integration.peft_io import AdapterModule

    a2 = adapter_from_state_dict(sds[1], cfg)
    name = next(iter(a2.modules))
    m = a2.modules[name]
    a2.modules[name] = AdapterModule(
        name, LoRAFactors(m.factors.B[:-1], m.factors.A), m.alpha, False
    )
    with pytest.raises(ShapeMismatchError, match=rf"module '{name}', client 1: update shape"):
        aggregate_adapters([a0, a2], rank=2)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"lora_alpha": "16"}, r"client 4: adapter config: lora_alpha must be a finite number"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"lora_alpha": True}, "lora_alpha must be a finite number"),
        ({"alpha_pattern": {"query": None}}, r"alpha_pattern\['query'\] must be a finite"),
        ({"alpha_pattern": [1, 2]}, "alpha_pattern must be a mapping"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
    ],
)
def test_untrusted_configs_are_rejected_with_the_key_named(
    patch: dict[str, object], message: str
) -> None:
    model = _peft_roberta(0, r=2, lora_alpha=4)
    cfg = {**model.peft_config["default"].to_dict(), **patch}
    with pytest.raises(AdapterError, match=message):
        adapter_from_state_dict(get_peft_model_state_dict(model), cfg, client=4)


def test_glora_auto_certifies_every_module_and_warns_naming_it() -> None:
    from glora_math.errors import ResidualWarning
    from glora_math.metrics import relative_error

    g = torch.Generator().manual_seed(3)
    cfg = {"r": 4, "lora_alpha": 8.0}
    sds = []
    for _ in range(3):
        sd = {}
        for m in ("layer.0.query", "layer.0.value"):
            sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, 16, generator=g).double()
            sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(12, 4, generator=g).double()
        sds.append(sd)
    adapters = [adapter_from_state_dict(sd, cfg, client=i) for i, sd in enumerate(sds)]
    with pytest.warns(ResidualWarning, match=r"module 'layer\.0\.(query|value)'"):
        rnd = aggregate_adapters(
            adapters, [1.0, 2.0, 3.0], rank=4, operator="glora_auto", options={"max_residual": 0.01}
        )
    for name, res in rnd.results.items():
        assert res.certificate is not None
        fs = [a.modules[name].factors for a in adapters]
        rho = relative_error(res.update, fs, [1.0, 2.0, 3.0])
        assert abs(res.certificate.relative_residual - rho) <= 1e-10
    # One check, one error type, in the core's round (it was an AdapterError here and a
    # GloraError in the operator).
    with pytest.raises(OptionError, match="no option"):
        aggregate_adapters(adapters, rank=4, options={"bogus": 1.0})


@pytest.mark.parametrize("operator", ["glora", "glora_auto"])
def test_bf16_adapters_keep_their_weights_apart(operator: str) -> None:
    # 1000 and 1001 samples round to the same bfloat16 weight; the aggregate must not.
    g = torch.Generator().manual_seed(5)
    cfg = {"r": 2, "lora_alpha": 2.0}
    sds = [
        {
            "base_model.model.q.lora_A.weight": torch.randn(2, 6, generator=g).bfloat16(),
            "base_model.model.q.lora_B.weight": torch.randn(5, 2, generator=g).bfloat16(),
        }
        for _ in range(2)
    ]
    adapters = [adapter_from_state_dict(sd, cfg, client=i) for i, sd in enumerate(sds)]
    a = aggregate_adapters(adapters, [1000.0, 1001.0], rank=4, operator=operator)
    b = aggregate_adapters(adapters, [1000.0, 1000.0], rank=4, operator=operator)
    diff = float((a.results["q"].update.delta() - b.results["q"].update.delta()).norm())
    assert diff > 0.0


def test_aggregate_peft_takes_models_pairs_and_folders_and_saves_a_loadable_round(
    tmp_path: Path,
) -> None:
    from integration.peft_io import aggregate_peft, as_adapter

    models = [_peft_roberta(s, r=4, lora_alpha=8) for s in range(3)]
    models[1].save_pretrained(tmp_path / "c1")
    sd2 = get_peft_model_state_dict(models[2])
    clients = [models[0], str(tmp_path / "c1"), (sd2, models[2].peft_config["default"])]
    # The three forms read the same adapters (a LoraConfig object is accepted as the config).
    ref = [as_adapter(m, i) for i, m in enumerate(models)]
    for i, c in enumerate(clients):
        got = as_adapter(c, i)
        for name, mod in ref[i].modules.items():
            assert torch.allclose(got.modules[name].factors.delta(), mod.factors.delta())
    with pytest.raises(AdapterError, match="client 0: expected an adapter folder"):
        as_adapter(42, 0)
    rnd = aggregate_peft(clients, [1.0, 2.0, 3.0], operator="fedex_lora", out=tmp_path / "srv")
    assert set(rnd.base_deltas) == set(rnd.results)  # FedEx-LoRA folds a dense residual
    assert (tmp_path / "srv" / "base_delta.safetensors").is_file()
    summary = json.loads((tmp_path / "srv" / "round.json").read_text())
    assert summary["operator"] == "fedex_lora"
    assert summary["server_rank"] == 4
    # The global adapter loads with peft and carries the server update of every module:
    # base + global update + base delta = base + exact mean update (FedEx-LoRA).
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(
        RobertaForSequenceClassification(TINY), tmp_path / "srv" / "global"
    )
    deltas = _deltas(loaded)
    for name in rnd.results:
        mean = sum(
            w * a.modules[name].factors.delta().double()
            for w, a in zip((1 / 6, 2 / 6, 3 / 6), ref, strict=True)
        )
        got = deltas[name].double() + rnd.base_deltas[name].double()
        assert float((got - mean).norm()) <= 1e-5 * (1.0 + float(mean.norm()))
    for i in range(3):
        assert (tmp_path / "srv" / f"client_{i}" / "adapter_config.json").is_file()


# Independent inits keep little of the mean at R = r: a certified default operator warns
# (ResidualWarning) with its default threshold, whatever the default operator is.
@pytest.mark.filterwarnings("ignore::glora_math.errors.ResidualWarning")
def test_glora_aggregate_command_on_three_real_adapter_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    from glora_math.cli import main

    folders = _adapter_folders(tmp_path)
    out = tmp_path / "round"
    # Clients from independent inits keep little of the mean at R = r: a certified operator's
    # default threshold (DEFAULT_MAX_RESIDUAL) warns, naming the module.
    args = ["aggregate", *folders, "--weights", "1,2,3", "--operator", "glora_auto"]
    with pytest.warns(ResidualWarning) as caught:
        assert main([*args, "--out", str(out)]) == 0
    assert all(re.match(r"module '.*(query|value)': certified relative residual", str(w.message))
               for w in caught)  # fmt: skip
    said = capsys.readouterr().out
    summary = json.loads((out / "round.json").read_text())
    assert (summary["operator"], summary["weights"]) == ("glora_auto", [1.0, 2.0, 3.0])
    # The worst module's exact relative error is printed (every module has one, and every
    # module of a certified operator its certificate too).
    errors, certs = summary["relative_error"], summary["certified_relative_residual"]
    worst = max(errors, key=errors.get)
    assert f"worst relative error {errors[worst]:.3e} (module {worst})" in said
    assert set(errors) == set(certs)
    assert len(errors) == 2 * TINY.num_hidden_layers  # query and value of every layer
    assert (out / "global" / "adapter_model.safetensors").is_file()
    # A non-empty --out is refused unless told to overwrite; bad inputs are one-line errors.
    assert main(["aggregate", *folders, "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["aggregate", *folders, "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert (
        main(["aggregate", folders[0], str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "client 1" in capsys.readouterr().err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    (tmp_path / "bin" / "adapter_config.json").write_text("{}")
    assert main(["aggregate", folders[0], str(tmp_path / "bin"), "--out", str(tmp_path / "o")]) == 2
    assert "a pickle, which is never loaded" in capsys.readouterr().err
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    save_file({"x": torch.zeros(1)}, str(ia3 / "adapter_model.safetensors"))
    assert main(["aggregate", folders[0], str(ia3), "--out", str(tmp_path / "o")]) == 2
    assert "peft_type 'IA3' is not LoRA" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::glora_math.errors.ResidualWarning")  # independent inits
@pytest.mark.parametrize("operator", [None, "fedit"])
def test_every_operator_reports_its_exact_error_per_module(
    tmp_path: Path, operator: str | None
) -> None:
    """The default (FlexLoRA) and an operator without a certificate (FedIT): a round reports
    each module's ||update - W_bar|| / ||W_bar|| against the weighted mean, in round.json too."""
    from glora_math import DEFAULT_OPERATOR
    from integration.peft_io import aggregate_peft, as_adapter

    models = [_peft_roberta(s, r=4, lora_alpha=8) for s in range(3)]
    rnd = aggregate_peft(models, [1.0, 2.0, 3.0], operator=operator or DEFAULT_OPERATOR,
                         out=tmp_path / "round")  # fmt: skip
    ads = [as_adapter(m, i) for i, m in enumerate(models)]
    written = json.loads((tmp_path / "round" / "round.json").read_text())["relative_error"]
    errors = rnd.errors()
    assert set(written) == set(errors) == set(rnd.results)
    for name, res in rnd.results.items():
        mean = sum(w * a.modules[name].factors.delta().double()
                   for w, a in zip((1 / 6, 2 / 6, 3 / 6), ads, strict=True))  # fmt: skip
        assert isinstance(mean, torch.Tensor)
        want = float((res.dense().double() - mean).norm() / mean.norm())
        tol = 2 * _tol(mean.float()) / float(mean.norm())
        assert abs(written[name] - want) <= tol, name
        assert abs(errors[name] - want) <= tol, name


@pytest.mark.filterwarnings("ignore::glora_math.errors.ResidualWarning")  # as above
def test_aggregate_peft_output_folders_rank_and_module_sets(tmp_path: Path) -> None:
    """out= is new, empty or replaced whole; bad paths and rank=0 are typed errors; clients
    with different target modules aggregate their common modules or each over its holders."""
    from glora_math import RankError
    from integration.peft_io import OutputError, aggregate_peft, as_adapter

    models = [_peft_roberta(s, r=4, lora_alpha=8) for s in range(3)]
    out = tmp_path / "round"
    aggregate_peft(models, out=out)
    (out / "stale.txt").write_text("an earlier round")
    with pytest.raises(OutputError, match="not an empty folder"):
        aggregate_peft(models, out=out)
    aggregate_peft(models, operator="fedit", out=out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "round.json").read_text())["operator"] == "fedit"
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(OutputError, match=str(bad)):
            aggregate_peft(models, out=bad)
    # A round that fails leaves the folder as it was.
    with pytest.raises(RankError):
        aggregate_peft(models, rank=0, out=out, overwrite=True)
    with pytest.raises(RankError, match="the largest client rank"):
        aggregate_peft(models, rank=-2)
    assert json.loads((out / "round.json").read_text())["operator"] == "fedit"
    # Different target modules: refused by default, naming the client and the way out.
    torch.manual_seed(7)
    base = RobertaForSequenceClassification(TINY)
    only_q = get_peft_model(base, LoraConfig(r=4, target_modules=["query"],
                                             modules_to_save=["classifier"]))  # fmt: skip
    with torch.no_grad():
        for name, prm in only_q.named_parameters():
            if "lora_B" in name:
                prm.normal_(0.0, 0.5)
    clients = [*models[:2], only_q]
    with pytest.raises(AdapterError, match=r"client 2: module set differs.*modules='intersection'"):
        aggregate_peft(clients)
    ads = [as_adapter(c, i) for i, c in enumerate(clients)]
    inter = aggregate_peft(clients, [1.0, 2.0, 3.0], operator="fedit", modules="intersection")
    assert set(inter.results) == set(ads[2].modules)
    union = aggregate_peft(clients, [1.0, 2.0, 3.0], operator="svd_mean", modules="union")
    assert set(union.results) == set(ads[0].modules)
    for name in ads[0].modules:
        who = [i for i, a in enumerate(ads) if name in a.modules]
        w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[who]
        mean = sum(wi / w.sum() * ads[i].modules[name].factors.delta().double()
                   for wi, i in zip(w, who, strict=True))  # fmt: skip
        got = union.results[name].update.delta().double()
        # svd_mean is the best rank-4 approximation of the holders' renormalised mean
        # (Eckart-Young): its error is the norm of the mean's trailing singular values (to
        # the rounding of the float32 arithmetic it ran in).
        err = float((got - mean).norm())
        assert abs(err - float(torch.linalg.svdvals(mean)[4:].norm())) <= _tol(mean.float())
        # errors() measures each module against its holders' mean, not all clients'.
        rel = union.errors()[name] * float(mean.norm())
        assert abs(rel - err) <= 2 * _tol(mean.float()), name
    assert union.client_modules[2] is not None
    assert set(union.client_modules[2]) == set(ads[2].modules)
    with pytest.raises(AdapterError, match="modules must be"):
        aggregate_peft(clients, modules="all")  # type: ignore[arg-type]


def test_fresh_adapters_with_zero_updates_aggregate_and_write_a_loadable_zero_adapter(
    tmp_path: Path,
) -> None:
    # peft initialises B = 0: a round over such clients has a zero mean update (a GLoRA-family
    # operator clamps the server rank to 0 and warns); it is written at rank 1, zero factors.
    import warnings

    from glora_math import RankClampedWarning
    from integration.peft_io import aggregate_peft

    models = []
    for s in range(3):
        torch.manual_seed(s)
        base = RobertaForSequenceClassification(TINY)
        models.append(get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankClampedWarning)
        aggregate_peft(models, out=tmp_path / "round")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(
        RobertaForSequenceClassification(TINY), tmp_path / "round" / "global"
    )
    deltas = _deltas(loaded)
    assert deltas
    for delta in deltas.values():
        assert float(delta.abs().max()) == 0.0  # zero factors: the product is exactly zero


def test_embedding_lora_goes_through_the_operator_and_dora_is_refused(tmp_path: Path) -> None:
    from integration.peft_io import aggregate_peft, as_adapter

    def model(seed: int, **kw: object) -> torch.nn.Module:
        torch.manual_seed(seed)
        m = get_peft_model(RobertaForSequenceClassification(TINY),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["query",
                                      "word_embeddings"], **kw))  # type: ignore[arg-type]  # fmt: skip
        with torch.no_grad():
            for name, prm in m.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    prm.normal_(0.0, 0.5)
        return m

    clients = [model(s) for s in range(3)]
    emb = "roberta.embeddings.word_embeddings"
    ads = [as_adapter(c, i) for i, c in enumerate(clients)]
    assert ads[0].modules[emb].embedding
    # GLoRA at R = the clients' total rank is the exact mean update, embedding included: the
    # written adapter loads into peft with the mean of the clients' embedding changes.
    rnd = aggregate_peft(clients, [1.0, 2.0, 3.0], operator="glora", rank=6, out=tmp_path / "r")
    # the certificate is relative: the rounding of float32 factorisations over d + k + sum r
    assert rnd.certificates()[emb] <= product_tol(
        torch.float32, n=TINY.vocab_size + TINY.hidden_size + 6, scale=1.0
    )
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(
        RobertaForSequenceClassification(TINY), tmp_path / "r" / "global"
    )
    layer = dict(loaded.named_modules())[f"base_model.model.{emb}"]
    got = layer.get_delta_weight("default").detach().double()
    want = sum(w * dict(c.named_modules())[f"base_model.model.{emb}"].get_delta_weight("default")
               .detach().double() for w, c in zip((1 / 6, 2 / 6, 3 / 6), clients, strict=True))  # fmt: skip
    assert got.shape == (TINY.vocab_size, TINY.hidden_size)
    assert float((got - want).norm()) <= _tol(want.float())
    # DoRA: refused with its reason, naming the client.
    with pytest.raises(AdapterError, match="client 1: DoRA adapter"):
        aggregate_peft([clients[0], model(5, use_dora=True)])


def test_glora_compare_over_real_adapter_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from glora_math.cli import main

    folders = _adapter_folders(tmp_path)
    module = "roberta.encoder.layer.1.attention.self.value"
    argv = ["compare", "--adapters", *folders, "--module", module, "--server-rank", "12",
            "--trials", "1", "--operators", "fedit,glora", "--weights", "1,2,3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"module '{module}' of 3 adapter folders" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[:5] in ("fedit", "glora")
    }
    # R = 12 spans the three rank-4 clients: GLoRA is exact, FedIT (factor averaging) is not.
    # (relative errors: float32 rounding over d + k + sum r_i)
    tol = product_tol(torch.float32, n=TINY.hidden_size * 2 + 12, scale=1.0)
    assert float(rows["glora"][1]) <= tol < float(rows["fedit"][1])
    assert main([*argv[:2], folders[0], folders[1], "--module", "nope"]) == 1
    assert "client 0:" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::glora_math.errors.ResidualWarning")  # independent inits
def test_the_server_metrics_of_a_certified_svd_operator_have_no_sides() -> None:
    """FlexLoRA certifies its update (the spectrum's tail) but has no consensus side: the
    round's metrics carry its certificate, equal to its exact error, and no side counts."""
    from glora_math.metrics import mean_update
    from integration.federated.server import measure
    from integration.peft_io import as_adapter

    ads = [as_adapter(_peft_roberta(s, r=4, lora_alpha=8), s) for s in range(3)]
    for name in ("flexlora", "glora_auto"):
        rnd = aggregate_adapters(ads, [1.0, 2.0, 3.0], operator=name, rank=4)
        got = measure(rnd.results, ads, rnd.weights, clients=rnd.clients)
        assert got["certified_residual"] is not None
        # float32 adapters: both are the same number to float32 rounding (certificate_tol, the
        # cancellation scale of the worst module)
        p = rnd.weights.tolist()
        scale = max(
            (sum(pi * float(f.B.norm() * f.A.norm()) for pi, f in zip(p, fs, strict=True))
             + float(rnd.results[m].update.B.norm() * rnd.results[m].update.A.norm()))
            / float(mean_update(fs, p).B.double().mm(mean_update(fs, p).A.double()).norm())
            for m, fs in rnd.clients.items()
        )  # fmt: skip
        tol = certificate_tol(torch.float32, n=TINY.hidden_size * 2 + 12, scale=scale)
        assert abs(got["certified_residual"] - got["aggregation_error"]) <= tol
        if name == "flexlora":
            assert got["sides"] is None
        else:
            assert sum(got["sides"].values()) == len(rnd.results)


def test_the_default_operator_warns_above_the_default_threshold_naming_the_module() -> None:
    """FlexLoRA certifies its update, so the peft path's default threshold (0.2) applies to the
    default operator too; options={"max_residual": 0} turns it off."""
    import warnings

    from integration.peft.aggregate import DEFAULT_MAX_RESIDUAL
    from integration.peft_io import aggregate_peft

    models = [_peft_roberta(s, r=4, lora_alpha=8) for s in range(3)]
    with pytest.warns(ResidualWarning) as caught:
        rnd = aggregate_peft(models)
    over = {m for m, c in rnd.certificates().items() if c > DEFAULT_MAX_RESIDUAL}
    assert over  # independent inits at R = r keep little of the mean
    assert {re.match(r"module '(.*)':", str(w.message)).group(1) for w in caught} == over  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResidualWarning)
        aggregate_peft(models, options={"max_residual": 0.0})
