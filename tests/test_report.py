"""florist.report: plots and report.md from synthetic run and sweep results."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from florist.report import (
    ReportError,
    cumulative_energy,
    pareto_front,
    parse_module_name,
    rank_grid,
    write_report,
)
from florist.sweep import finish_setting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 6
KINDS = ("q_proj", "v_proj")
MODULES = [f"model.layers.{i}.self_attn.{k}" for i in range(LAYERS) for k in KINDS]


def _singular_values(rng: np.random.Generator, length: int) -> list[float]:
    return sorted((rng.random(length) * np.exp(-np.arange(length) / 4)).tolist(), reverse=True)


def _energy_rank(sv: list[float], tau: float) -> int:
    energy = cumulative_energy(sv)
    return int(np.argmax(energy >= tau - 1e-12)) + 1


def _communication(clients: list[str], down: int, up: int) -> dict:
    per = {
        c: {"params_up": up // 4, "bytes_up": up, "params_down": down // 4, "bytes_down": down}
        for c in clients
    }
    return {"clients": per, "total": {"bytes_up": up * len(clients), "bytes_down": down * len(clients)}}


def _metrics(rounds: int = 2, clients: int = 4) -> dict:
    rng = np.random.default_rng(0)
    ids = [f"client_{k}" for k in range(clients)]
    out = []
    for r in range(1, rounds + 1):
        sv = {m: _singular_values(rng, 4 * clients) for m in MODULES}
        ranks = {m: _energy_rank(s, 0.9) for m, s in sv.items()}
        stats = {
            c: {
                "rank": 4,
                "num_examples": 10 + k,
                "losses": (3.0 - 0.1 * np.arange(5) - 0.5 * r + 0.05 * k).tolist(),
                "steps": 5,
                "tokens": 500,
                "seconds": 0.1,
            }
            for k, c in enumerate(ids)
        }
        out.append(
            {
                "round": r,
                "clients": ids,
                "client_stats": stats,
                "ranks": ranks,
                "singular_values": sv,
                "communication": _communication(ids, 4000 * r, 3000),
                "eff": 1.0 / sum(ranks.values()),
                "aggregation_seconds": 0.01,
            }
        )
    ev = {"heldout": {"loss": 2.0, "perplexity": 7.4, "token_accuracy": 0.31, "n_tokens": 100}}
    after = {
        "heldout": {"loss": 1.8, "token_accuracy": 0.35},
        "mmlu": {"accuracy_macro": 0.27, "accuracy_micro": 0.28},
    }
    return {
        "config": {"method": "florist", "threshold": 0.9},
        "method": "florist",
        "threshold": 0.9,
        "model": "tiny",
        "rounds": out,
        "eval_before": {**ev, "mmlu": {"accuracy_macro": 0.25}},
        "eval_after": after,
        "communication_total": {},
        "eff_per_round": [r["eff"] for r in out],
        "eff_total": 1.0 / sum(1.0 / r["eff"] for r in out),
    }


def _sweep() -> dict:
    rng = np.random.default_rng(1)
    sv = {m: _singular_values(rng, 32) for m in MODULES}
    settings = []
    for name, methods in (
        ("homogeneous (r=8)", ["fedit", "flora", "flexlora", "ffa"]),
        ("heterogeneous", ["zeropad", "flora"]),
    ):
        rows = []
        for i, m in enumerate(methods):
            rank = {"flora": 32, "ffa": 4}.get(m, 8) * len(MODULES)
            rows.append(
                {
                    "method": m,
                    "label": m,
                    "threshold": None,
                    "accuracy": 25.0 + i,
                    "eff": 1.0 / rank,
                    "rank_total": rank,
                    "ranks": {},
                    "bytes_down_per_client": 1000.0 * rank,
                    "bytes_up_per_client": 8000.0,
                }
            )
        for tau in np.round(np.arange(0.8, 1.0001, 0.02), 2):
            ranks = {m: _energy_rank(s, tau) for m, s in sv.items()}
            total = sum(ranks.values())
            rows.append(
                {
                    "method": "florist",
                    "label": f"FLoRIST τ={tau:.2f}",
                    "threshold": float(tau),
                    "accuracy": 24.0 + 3.0 * math.exp(-(((tau - 0.9) / 0.06) ** 2)),
                    "eff": 1.0 / total,
                    "rank_total": total,
                    "ranks": ranks,
                    "bytes_down_per_client": 1000.0 * total,
                    "bytes_up_per_client": 8000.0,
                }
            )
        setting = {
            "name": name,
            "base_eval": {"mmlu": {"accuracy_macro": 0.23}},
            "rows": rows,
            "singular_values": sv,
            "training_rounds": _metrics(rounds=1)["rounds"],
        }
        settings.append(finish_setting(setting, e_tolerance=1.0, score_source="mmlu"))
    return {
        "kind": "florist-sweep",
        "model": "tiny",
        "note": "synthetic",
        "score": {"name": "MMLU (%)"},
        "settings": settings,
    }


def _check_report(md_path: Path, expected: set[str]) -> None:
    assert md_path.is_file()
    text = md_path.read_text()
    embedded = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text))
    assert embedded == expected
    for name in expected:
        png = md_path.parent / name
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 8_000, f"{name} is suspiciously small ({len(data)} bytes)"
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert float(image[..., :3].std()) > 0.01, f"{name} looks blank"


ALL_FIGURES = {"accuracy_vs_communication.png", "energy_curves.png", "rank_heatmap.png", "loss_curves.png"}


def test_report_for_a_run(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    md = write_report(tmp_path)
    assert md == tmp_path / "report" / "report.md"
    _check_report(md, ALL_FIGURES)
    text = md.read_text()
    assert "| 2 | 4 |" in text  # the per-round table
    assert "27.00" in text and "25.00" in text  # federated and base MMLU


def test_report_for_a_sweep_via_cli(tmp_path: Path) -> None:
    from florist.cli import main

    (tmp_path / "sweep.json").write_text(json.dumps(_sweep()))
    assert main(["report", str(tmp_path)]) == 0
    md = tmp_path / "report" / "report.md"
    _check_report(md, ALL_FIGURES)
    text = md.read_text()
    assert "FLoRIST-O" in text and "FLoRIST-E" in text and "FedIT" in text and "Zero-padding" in text


def test_report_without_evaluation_skips_the_accuracy_plot(tmp_path: Path) -> None:
    metrics = _metrics(rounds=1)
    metrics["eval_before"] = metrics["eval_after"] = {}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    _check_report(write_report(tmp_path), ALL_FIGURES - {"accuracy_vs_communication.png"})


def test_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from florist.cli import main

    with pytest.raises(ReportError, match="neither metrics.json"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "neither metrics.json" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match="metrics.json: cannot read JSON"):
        write_report(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": [{"round": 1, "ranks": "oops"}]}))
    with pytest.raises(ReportError, match="malformed"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()  # nothing half-written


def test_pareto_front_on_hand_made_points() -> None:
    # (efficiency, accuracy), both to maximise.
    xs = [1.0, 2.0, 3.0, 2.0, 1.0, 0.5, 3.0, float("nan")]
    ys = [5.0, 4.0, 3.0, 2.0, 5.0, 6.0, 1.0, 9.0]
    # (2,2) is dominated by (2,4); (3,1) by (3,3); the two (1,5) tie and both stay; NaN never counts.
    assert pareto_front(xs, ys) == [5, 0, 4, 1, 2]
    # Bytes (lower is better) against accuracy.
    assert pareto_front([10, 20, 30, 15], [1, 3, 2, 0.5], maximize_x=False) == [0, 1]
    assert pareto_front([1.0], [1.0]) == [0]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError):
        pareto_front([1, 2], [1])


def test_energy_names_and_grid() -> None:
    np.testing.assert_allclose(cumulative_energy([3.0, 4.0]), [9 / 25, 1.0])
    assert cumulative_energy([0.0, 0.0]).tolist() == [0.0, 0.0]
    assert parse_module_name("model.layers.13.self_attn.v_proj") == (13, "v_proj")
    assert parse_module_name("transformer.h.2.attn.c_attn") == (2, "c_attn")
    grid, layers, kinds = rank_grid(
        {"model.layers.1.self_attn.q_proj": 3, "model.layers.0.self_attn.v_proj": 5}
    )
    assert layers == [0, 1] and kinds == ["q_proj", "v_proj"]
    assert grid[0, 1] == 5 and grid[1, 0] == 3 and np.isnan(grid[0, 0]) and np.isnan(grid[1, 1])
