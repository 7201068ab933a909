"""Hostile input against the sweep and the round engine (issue 22, groups 3, 5 and 7): bounded,
finite τ grids; a round whose result is not finite never reaches the checkpoint; DP settings
that float32 uploads cannot carry are refused up front; the sweep says which init it used."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_run_config

from florist import privacy
from florist.checkpoint import load_checkpoint
from florist.cli import main
from florist.config import ConfigError
from florist.errors import FloristError
from florist.federation import run_federated
from florist.models import tiny_llama
from florist.sweep import parse_thresholds, run_sweep


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0.5:1:1e-9", "a grid of 5e+08 values; at most 1000"),
        ("0.8:inf:0.1", "must be finite numbers"),
        ("nan:1:0.1", "must be finite numbers"),
        ("0.8,nan", "must lie in (0, 1]"),
    ],
)
def test_threshold_grids_are_bounded_and_finite(spec, message):
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace("]", r"\]").replace("+", r"\+")
    ):
        parse_thresholds(spec)
    assert len(parse_thresholds("0.001:1:0.001")) == 1000  # the cap itself is allowed


def test_the_sweep_cli_refuses_a_huge_grid_in_one_line(tmp_path, capsys):
    code = main(
        [
            "sweep",
            "--data_path",
            str(tmp_path),
            "--output_dir",
            str(tmp_path / "o"),
            "--thresholds",
            "0.5:1:1e-9",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "thresholds" in err and "at most 1000" in err


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        (dict(dp_clip_norm=1e308, dp_noise_multiplier=1.0), "--dp_clip_norm"),
        (
            dict(dp_clip_norm=1e300, dp_noise_multiplier=1e10, dp_mode="central", method="fedit"),
            "--dp_clip_norm",
        ),
        (dict(dp_clip_norm=1e20, dp_noise_multiplier=1e15), "--dp_noise_multiplier"),
    ],
)
def test_dp_settings_beyond_float32_are_refused_up_front_naming_the_flag(
    settings, flag, tmp_path, federated_data
):
    cfg = tiny_run_config(federated_data(3), tmp_path / "run", **settings)
    with pytest.raises(
        ConfigError, match=f"^{flag} .* is too large: .* beyond what float32 uploads can carry"
    ):
        cfg.validate()


def test_a_round_whose_result_is_not_finite_leaves_the_last_checkpoint_as_it_was(
    tmp_path, federated_data, monkeypatch
):
    """Central DP whose noise reaches Inf in round 2 (here forced): the round fails with one line,
    the checkpoint stays at round 1 with finite tensors, and nothing else is written."""
    cfg = tiny_run_config(federated_data(3), tmp_path / "run", method="fedit", num_communication_rounds=2,
                          dp_mode="central", dp_clip_norm=1.0, dp_noise_multiplier=1.0)  # fmt: skip
    std = privacy.central_std
    monkeypatch.setattr(
        privacy, "central_std", lambda z, c, m: std(z, c, m) if calls.append(1) or len(calls) < 2 else 1e39
    )
    calls: list[int] = []
    with pytest.raises(
        FloristError, match=r"^round 2: the fedit result of module .* is not finite; the DP noise"
    ):
        run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    state = load_checkpoint(tmp_path / "run")
    assert state is not None and state.completed_round == 1
    assert all(bool(f.A.isfinite().all() and f.B.isfinite().all()) for f in state.global_adapter.values())
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "adapter").exists()


def test_the_sweep_says_which_init_a_method_used_when_the_override_does_not_apply(tmp_path, federated_data):
    cfg = tiny_run_config(federated_data(3), tmp_path / "sweep")
    sweep = run_sweep(cfg, methods="ffa,florist", thresholds=[0.9], heter=(False,), client_init="per_client",
                      model_factory=lambda: tiny_llama(seed=0), report=False, progress=False)  # fmt: skip
    on_disk = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(on_disk["client_init_overrides"]) == {"ffa"}
    assert "ffa trains with shared inits: client_init per_client does not apply" in on_disk["note"]
    inits = {r["method"]: r["client_init"] for r in sweep["settings"][0]["rows"]}
    assert inits == {"ffa": "shared", "florist": "per_client"}


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"partition-id": "x"}, "node config: partition-id must be an integer >= 0, got 'x'"),
        ({"partition-id": True}, "node config: partition-id must be an integer >= 0, got True"),
        ({"partition-id": 0, "lora-rank": 0}, "node config: lora-rank must be an integer >= 1, got 0"),
        ({"partition-id": 3, "num-partitions": 3}, "partition-id 3 is not below num-partitions 3"),
        ({}, "node config needs partition-id"),
    ],
)
def test_a_supernodes_node_config_is_checked_like_every_setting(node_config, message):
    from flwr.app import Context, RecordDict

    from florist.flower.app_config import run_config_values
    from florist.flower.client_app import node_settings

    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=run_config_values())  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{message}"):
        node_settings(context)
