"""florist.sweep: one training, many aggregations, checked against separate runs on a tiny Llama."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from peft import PeftModel
from safetensors.torch import load_file

import florist.models
from florist.config import ConfigError, RunConfig
from florist.data import Prompter
from florist.evaluation.heldout import heldout_loss
from florist.federation import run_federated
from florist.models import tiny_llama
from florist.report import write_report
from florist.sweep import parse_methods, parse_thresholds, run_sweep, select_florist

RANKS = [4, 2, 1]
TAUS = [0.5, 0.9, 1.0]
WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "light", "north", "music"]


def _records(k: int, n: int) -> list[dict]:
    return [
        {
            "instruction": f"Say {WORDS[(k + i) % 10]} then {WORDS[(3 * k + 2 * i) % 10]}.",
            "input": "" if i % 2 else f"client {k}",
            "output": f"{WORDS[(k + i) % 10]} {WORDS[(3 * k + 2 * i) % 10]}",
        }
        for i in range(n)
    ]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweepdata")
    (root / "3").mkdir()
    for k, n in enumerate((6, 4, 5)):  # unequal sizes, so the FedAvg weights differ
        (root / "3" / f"local_training_{k}.json").write_text(json.dumps(_records(k, n)))
    (root / "3" / "global_test.json").write_text(json.dumps(_records(9, 4)))
    # A tiny MMLU in the CSV layout: 2 subjects x 3 questions.
    (root / "mmlu" / "test").mkdir(parents=True)
    for s, subject in enumerate(("astronomy", "virology")):
        with open(root / "mmlu" / "test" / f"{subject}_test.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for i in range(3):
                w.writerow([f"Which word is number {i + s}?", *WORDS[i : i + 4], (i + s) % 4])
    return root


def make_cfg(data: Path, out: Path, **overrides: object) -> RunConfig:
    return tiny_run_config(data, out, **(dict(local_ranks=list(RANKS), seed=11) | overrides))


def tiny() -> tuple:
    return tiny_llama(seed=3)


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_single_training_equals_separate_runs(data_dir: Path, tmp_path: Path) -> None:
    """Every global adapter of the one-training sweep, under both client inits, is bit-identical to
    its own `florist run` with that init."""
    cfg = make_cfg(data_dir, tmp_path / "sweep")
    sweep = run_sweep(
        cfg, thresholds=TAUS, client_init="both", model_factory=tiny, save_adapters=True, report=False,
        progress=False,
    )  # fmt: skip
    assert sweep["mode"] == "single-training" and sweep["client_init"] == "both"
    # Per rank setting: per-client inits, shared inits, and FFA's frozen A: three trainings.
    for setting in sweep["settings"]:
        groups = [(g["client_init"], g["frozen_A"]) for g in setting["training_groups"]]
        assert groups == [("per_client", False), ("shared", False), ("shared", True)]
    assert "Groups trained" in sweep["note"]
    adapters = tmp_path / "sweep" / "adapters"
    cases = [(False, m, None, i) for m in ("fedit", "flora", "flexlora") for i in ("shared", "per_client")]
    cases += [(True, m, None, i) for m in ("zeropad", "flora", "flexlora") for i in ("shared", "per_client")]
    cases += [(h, "ffa", None, "shared") for h in (False, True)]
    cases += [(False, "florist", 0.5, "shared"), (False, "florist", 0.5, "per_client")]
    cases += [(True, "florist", 0.9, "shared"), (True, "florist", 1.0, "per_client")]
    for heter, method, tau, init in cases:
        run_cfg = dataclasses.replace(
            cfg,
            method=method,
            heter=heter,
            threshold=tau or 0.9,
            client_init=init,
            output_dir=str(tmp_path / f"run_{method}_{heter}_{tau}_{init}"),
        )
        model, tokenizer = tiny()
        run_federated(run_cfg, model=model, tokenizer=tokenizer)
        label = method if tau is None else f"florist_tau{tau:.2f}"
        if method != "ffa":  # FFA ran under one init only, so its directory has no init suffix
            label += f"_{init}"
        mine = _tensors(adapters / ("heterogeneous" if heter else "homogeneous") / label)
        theirs = _tensors(Path(run_cfg.output_dir) / "adapter")
        assert mine.keys() == theirs.keys(), (method, heter)
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), (method, heter, tau, init, key)
        # The sweep's config/rank bookkeeping matches too.
        setting = sweep["settings"][1 if heter else 0]
        row = next(
            r for r in setting["rows"]
            if r["method"] == method and r["threshold"] == tau and r["client_init"] == init
        )  # fmt: skip
        metrics = json.loads((Path(run_cfg.output_dir) / "metrics.json").read_text())
        assert metrics["client_init"] == init
        assert row["ranks"] == metrics["rounds"][0]["ranks"]
        assert row["eff"] == pytest.approx(metrics["eff_total"])
    # The two inits really train different clients (else the comparison would be empty).
    a = _tensors(adapters / "homogeneous" / "flora_shared")
    b = _tensors(adapters / "homogeneous" / "flora_per_client")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_default_training_groups_follow_the_authors_code() -> None:
    from florist.sweep import training_groups

    groups = training_groups(["fedit", "flora", "flexlora", "ffa", "florist"])
    assert [(g.client_init, g.frozen_A, g.methods) for g in groups] == [
        ("per_client", False, ("flora", "flexlora", "florist")),
        ("shared", False, ("fedit",)),
        ("shared", True, ("ffa",)),
    ]
    shared = training_groups(["zeropad", "flora", "ffa"], "shared")
    assert [(g.client_init, g.methods) for g in shared] == [
        ("shared", ("zeropad", "flora")),
        ("shared", ("ffa",)),
    ]
    per_client = training_groups(["fedit", "ffa"], "per_client")  # FFA keeps its shared A
    assert [(g.client_init, g.frozen_A) for g in per_client] == [("per_client", False), ("shared", True)]
    with pytest.raises(ConfigError, match="client_init"):
        training_groups(["flora"], "sometimes")


def test_sweep_table_evaluation_and_report(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cfg = make_cfg(data_dir, out, evaluate=True, dev_data_path=str(data_dir / "mmlu"), cutoff_len=256)
    sweep = run_sweep(cfg, thresholds=TAUS, model_factory=tiny, save_adapters=True, progress=False)
    assert {p.name for p in out.iterdir()} >= {"sweep.json", "sweep.md", "report", "adapters"}
    assert json.loads((out / "sweep.json").read_text())["settings"][0]["name"] == sweep["settings"][0]["name"]
    assert sweep["score"]["name"].startswith("MMLU")
    expected = {
        False: ["FedIT", "FLoRA", "FlexLoRA", "FFA-LoRA", "FLoRIST-O", "FLoRIST-E"],
        True: ["Zero-padding", "FLoRA", "FlexLoRA", "FFA-LoRA", "FLoRIST-O", "FLoRIST-E"],
    }
    model, tokenizer = tiny()
    modules = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    for setting in sweep["settings"]:
        assert [r["name"] for r in setting["table"]] == expected[setting["heter"]]
        for name in expected[setting["heter"]]:
            assert f"| {name} |" in setting["table_markdown"]
        florist_rows = [r for r in setting["rows"] if r["method"] == "florist"]
        assert [r["threshold"] for r in florist_rows] == TAUS
        o, e = select_florist(florist_rows, e_tolerance=1.0)
        assert (
            setting["florist_o"]["threshold"] == o["threshold"]
            and setting["florist_e"]["threshold"] == e["threshold"]
        )
        for r in setting["rows"]:
            # Eff from the broadcast ranks; FFA's one factor counts half.
            assert r["eff"] == pytest.approx((2.0 if r["method"] == "ffa" else 1.0) / r["rank_total"])
            assert r["accuracy"] == pytest.approx(100 * r["eval"]["mmlu"]["accuracy_macro"])
        fedit = next(r for r in setting["rows"] if r["method"] in ("fedit", "zeropad"))
        # Bytes per client, counted independently: every client uploads its own rank, FedIT
        # sends back the common rank (zero-padding: each client's own first r_k components).
        ranks = RANKS if setting["heter"] else [4, 4, 4]
        per_rank = sum(m.in_features + m.out_features for m in modules.values()) * 4
        assert fedit["bytes_up_per_client"] == pytest.approx(per_rank * sum(ranks) / 3)
        assert fedit["bytes_down_per_client"] == pytest.approx(per_rank * sum(ranks) / 3)

    # A row's held-out loss equals an independent evaluation of its saved PEFT adapter.
    homogeneous = sweep["settings"][0]
    for method in ("fedit", "flora"):
        row = next(r for r in homogeneous["rows"] if r["method"] == method)
        base, tokenizer = tiny()
        peft_model = PeftModel.from_pretrained(base, str(out / "adapters" / "homogeneous" / method)).eval()
        records = json.loads((data_dir / "3" / "global_test.json").read_text())  # already Alpaca fields
        ref = heldout_loss(peft_model, tokenizer, records, cutoff_len=cfg.cutoff_len, prompter=Prompter())
        assert row["eval"]["heldout"]["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert "FLoRIST-O" in (out / "sweep.md").read_text()
    assert (out / "report" / "accuracy_vs_communication.png").stat().st_size > 8000


def test_several_rounds_train_each_configuration(data_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_dir, tmp_path / "sweep", num_communication_rounds=2, evaluate=True, cutoff_len=256)
    sweep = run_sweep(
        cfg,
        methods="fedit,florist",
        thresholds=[0.8, 1.0],
        heter=(False,),
        model_factory=tiny,
        progress=False,
    )
    assert sweep["mode"] == "separate-runs" and "trained separately" in sweep["note"]
    rows = sweep["settings"][0]["rows"]
    assert [(r["method"], r["threshold"]) for r in rows] == [
        ("fedit", None),
        ("florist", 0.8),
        ("florist", 1.0),
    ]
    for r in rows:
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert len(metrics["rounds"]) == 2 and metrics["method"] == r["method"]
        assert r["eff"] == metrics["eff_total"]
        assert r["accuracy"] == pytest.approx(100 * metrics["eval_after"]["heldout"]["token_accuracy"])
    assert sweep["score"]["name"].startswith("held-out")
    assert sweep["settings"][0]["florist_o"] is not None
    # The report also reads a real run directory written by run_federated.
    md = write_report(Path(rows[1]["run_dir"]))
    assert {p.name for p in md.parent.glob("*.png")} == {
        "accuracy_vs_communication.png",
        "energy_curves.png",
        "rank_heatmap.png",
        "loss_curves.png",
    }


def test_cli_sweep(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from florist.cli import main

    monkeypatch.setattr(florist.models, "load_model", lambda *a, **k: tiny())
    cfg = make_cfg(data_dir, tmp_path / "out")
    args = [
        "sweep",
        "--config",
        str(tmp_path / "run.yaml"),
        "--heter",
        "true",
        "--methods",
        "zeropad,florist",
    ]
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert main([*args, "--thresholds", "0.6:0.9:0.1", "--e-tolerance", "0.5", "--no-report"]) == 0
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert sweep["thresholds"] == [0.6, 0.7, 0.8, 0.9] and sweep["e_tolerance"] == 0.5
    assert [s["heter"] for s in sweep["settings"]] == [True]
    printed = capsys.readouterr().out
    assert "Zero-padding" in printed
    # One line per configuration, so a log file shows how far the sweep has got.
    progress = [line for line in printed.splitlines() if line.startswith("sweep ") and "/5:" in line]
    assert any(
        "training the clients once for zeropad, florist (per_client init)" in x for x in printed.splitlines()
    )
    assert len(progress) == 5 and progress[-1].startswith(
        "sweep heterogeneous (ranks 4,2,1) 5/5: FLoRIST τ=0.90, global rank"
    )
    assert not (tmp_path / "out" / "report").exists()
    # Bad input: one line, exit code 2.
    assert main([*args, "--thresholds", "0.9:0.5:0.1"]) == 2
    assert main([*args, "--methods", "fedit,nope"]) == 2
    assert "methods must be a subset" in capsys.readouterr().err
    assert main([*args, "--select-by", "mmlu"]) == 2  # evaluation is off in this config
    assert "select_by=mmlu needs MMLU" in capsys.readouterr().err


def test_select_florist_on_hand_made_numbers() -> None:
    rows = [
        {"threshold": 0.80, "accuracy": 29.0, "eff": 80e-4},
        {"threshold": 0.85, "accuracy": 30.1, "eff": 60e-4},
        {"threshold": 0.87, "accuracy": 30.5, "eff": 45e-4},
        {"threshold": 0.90, "accuracy": 29.6, "eff": 40e-4},
        {"threshold": 0.95, "accuracy": 30.5, "eff": 20e-4},  # ties O's accuracy, less efficient
        {"threshold": 1.00, "accuracy": 28.0, "eff": 5e-4},
    ]
    o, e = select_florist(rows, e_tolerance=1.0)
    assert o["threshold"] == 0.87  # best accuracy; the tie goes to the higher Eff
    assert e["threshold"] == 0.85  # highest Eff with accuracy >= 29.5
    assert select_florist(rows, e_tolerance=1.5)[1]["threshold"] == 0.80  # 29.0 >= 30.5 - 1.5
    assert select_florist(rows, e_tolerance=0.0)[1]["threshold"] == 0.87
    # Equal Eff within the tolerance: the more accurate one.
    same_eff = [
        {"threshold": 0.8, "accuracy": 30.0, "eff": 1.0},
        {"threshold": 0.9, "accuracy": 30.4, "eff": 1.0},
    ]
    assert select_florist(same_eff)[1]["threshold"] == 0.9
    assert select_florist([{"threshold": 0.9, "accuracy": None, "eff": 1.0}]) is None
    with pytest.raises(ValueError):
        select_florist(rows, e_tolerance=-1)


def test_parsing() -> None:
    assert parse_thresholds("0.80:1.00:0.01") == [round(0.8 + i / 100, 2) for i in range(21)]
    assert parse_thresholds("1,0.9, 0.9") == [0.9, 1.0]
    assert parse_thresholds([0.95]) == [0.95]
    for bad in ("0:1:0.5", "0.9:0.8:0.01", "0.5:1:0", "a,b", "1.2", "0.8:0.9"):
        with pytest.raises(ConfigError):
            parse_thresholds(bad)
    assert parse_methods("florist,fedit") == ["fedit", "florist"]  # the paper's order
    with pytest.raises(ConfigError):
        parse_methods("fedit,sgd")
