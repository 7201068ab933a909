"""The Flower app project and its run config, generated from ``RunConfig`` so they never drift.

A Flower app is a directory with a ``pyproject.toml`` that names the ServerApp and ClientApp
and declares every run-config key ``flwr run --run-config`` may override. florist's app lives
in the installed package (``florist.flower.server_app:app``, ``florist.flower.client_app:app``),
so the project directory holds only that file: the bundle ``flwr run`` uploads stays tiny and no
data ever travels in it. Every machine needs florist installed (``pip install florist``).

Run-config keys are the ``RunConfig`` field names with dashes (``num-communication-rounds``,
``lora-r``, ...). Flower's config values are scalars, so lists are comma-separated strings and
``None`` is written as ``""`` (strings) or ``0`` (counts), and read back the same way.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florist.config import RunConfig, run_settings
from florist.io import atomic_write_text
from florist.settings import RUN_CONFIG, Setting

APP_NAME = "florist-flower"
SERVERAPP = "florist.flower.server_app:app"
CLIENTAPP = "florist.flower.client_app:app"

# Settings of the Flower deployment itself (not of the federated recipe).
FLOWER_DEFAULTS: dict[str, float] = {
    # Seconds the server waits for one round's replies; LLM rounds are long, so be generous.
    "round-timeout": 3600.0,
    # Seconds the server waits for num-clients SuperNodes to connect before round 1.
    "node-wait-timeout": 600.0,
}
# Their types and ranges, checked as RunConfig's settings are (one line naming the key).
FLOWER_SETTINGS = {key: Setting(float, low=0.0, low_open=True) for key in FLOWER_DEFAULTS}


@dataclass
class FlowerOptions:
    round_timeout: float = FLOWER_DEFAULTS["round-timeout"]
    node_wait_timeout: float = FLOWER_DEFAULTS["node-wait-timeout"]


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def run_config_values(cfg: RunConfig | None = None, options: FlowerOptions | None = None) -> dict[str, Any]:
    """``cfg`` (default: RunConfig()) as Flower run-config values, plus the Flower settings."""
    cfg = cfg or RunConfig()
    options = options or FlowerOptions()
    values: dict[str, Any] = {}
    for name, setting in run_settings().items():
        value = getattr(cfg, name)
        if setting.kind is list:
            value = ",".join(str(v) for v in value)
        elif value is None:
            value = 0 if setting.kind is int else ""  # None as Flower writes it: a count 0, a path ""
        values[_key(name)] = value
    values["round-timeout"] = float(options.round_timeout)
    values["node-wait-timeout"] = float(options.node_wait_timeout)
    return values


def run_config_from_flower(values: typing.Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Parse Flower run-config values (as the ServerApp/ClientApp receive them) into a RunConfig;
    each value is checked by its Setting and a bad one named by its key."""
    kwargs: dict[str, Any] = {}
    for name, setting in run_settings().items():
        key = _key(name)
        if key not in values:
            continue  # keep the RunConfig default
        value = values[key]
        if setting.optional and value == (0 if setting.kind is int else "") and not isinstance(value, bool):
            value = None
        kwargs[name] = setting.parse(value, name=key, source=RUN_CONFIG)
    options = FlowerOptions(
        **{
            key.replace("-", "_"): setting.parse(
                values.get(key, FLOWER_DEFAULTS[key]), name=key, source=RUN_CONFIG
            )
            for key, setting in FLOWER_SETTINGS.items()
        }
    )
    return RunConfig(**kwargs), options


def toml_value(value: Any) -> str:
    """A TOML scalar: a boolean, a number or a basic string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # JSON's escapes are TOML's too


def app_pyproject(cfg: RunConfig | None = None, options: FlowerOptions | None = None) -> str:
    """The text of the Flower app's pyproject.toml."""
    from florist import __version__

    lines = [
        "# A Flower app that runs florist's federated LoRA fine-tuning (written by `florist flower app`).",
        "# The code lives in the installed florist package: install florist on the SuperLink machine",
        "# and on every SuperNode; this file only names the apps and the run-config defaults.",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        f'version = "{__version__}"',
        'description = "Federated LoRA fine-tuning of LLMs (FLoRIST and baselines) with florist"',
        'license = "Apache-2.0"',
        'dependencies = ["flwr>=1.42,<1.43"]',
        "",
        "[tool.flwr.app]",
        'publisher = "florist"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVERAPP}"',
        f'clientapp = "{CLIENTAPP}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in run_config_values(cfg, options).items()]
    return "\n".join(lines) + "\n"


def write_app_project(
    directory: str | Path, cfg: RunConfig | None = None, options: FlowerOptions | None = None
) -> Path:
    """Write the app project (just pyproject.toml) into ``directory``; returns the directory."""
    directory = Path(directory)
    atomic_write_text(directory / "pyproject.toml", app_pyproject(cfg, options))
    return directory


def flwr_config_toml(
    name: str, address: str, *, insecure: bool = False, root_certificates: str | None = None
) -> str:
    """A ``$FLWR_HOME/config.toml`` with one SuperLink connection, made the default."""
    if insecure and root_certificates:
        raise ValueError("a connection is either insecure or has root certificates, not both")
    lines = [
        "[superlink]",
        f"default = {toml_value(name)}",
        "",
        f"[superlink.{name}]",
        f"address = {toml_value(address)}",
    ]
    if insecure:
        lines.append("insecure = true")
    if root_certificates:
        lines.append(f"root-certificates = {toml_value(str(root_certificates))}")
    return "\n".join(lines) + "\n"
