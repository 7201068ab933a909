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

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florist.config import ConfigError, RunConfig
from florist.io import atomic_write_text

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
# RunConfig fields whose None is written as 0 (counts) or "" (paths).
_OPTIONAL_INT = {"local_max_steps", "max_samples_per_client", "eval_samples"}
_LIST_FIELDS = {"lora_target_modules": str, "local_ranks": int}


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
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.name in _LIST_FIELDS:
            value = ",".join(str(v) for v in value)
        elif value is None:
            value = 0 if f.name in _OPTIONAL_INT else ""
        values[_key(f.name)] = value
    values["round-timeout"] = float(options.round_timeout)
    values["node-wait-timeout"] = float(options.node_wait_timeout)
    return values


def run_config_from_flower(values: typing.Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Parse Flower run-config values (as the ServerApp/ClientApp receive them) into a RunConfig."""
    hints = typing.get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        key = _key(f.name)
        if key not in values:
            continue  # keep the RunConfig default
        value = values[key]
        try:
            if f.name in _LIST_FIELDS:
                item = _LIST_FIELDS[f.name]
                value = [item(v.strip()) for v in str(value).split(",") if v.strip()]
            elif f.name in _OPTIONAL_INT:
                value = int(value) or None
            elif hints[f.name] == str | None:
                value = str(value) or None
            elif hints[f.name] is bool:
                if not isinstance(value, bool):
                    raise TypeError(f"expected true or false, got {value!r}")
            elif hints[f.name] is int:
                if isinstance(value, bool) or int(value) != value:
                    raise TypeError(f"expected an integer, got {value!r}")
                value = int(value)
            elif hints[f.name] is float:
                value = float(value)
            elif hints[f.name] is str:
                value = str(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"run config {key!r}: {e}") from None
        kwargs[f.name] = value
    options = FlowerOptions(
        round_timeout=float(values.get("round-timeout", FLOWER_DEFAULTS["round-timeout"])),
        node_wait_timeout=float(values.get("node-wait-timeout", FLOWER_DEFAULTS["node-wait-timeout"])),
    )
    if options.round_timeout <= 0 or options.node_wait_timeout <= 0:
        raise ConfigError("round-timeout and node-wait-timeout must be positive")
    return RunConfig(**kwargs), options


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


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
    lines += [f"{key} = {_toml_value(value)}" for key, value in run_config_values(cfg, options).items()]
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
        f"default = {_toml_value(name)}",
        "",
        f"[superlink.{name}]",
        f"address = {_toml_value(address)}",
    ]
    if insecure:
        lines.append("insecure = true")
    if root_certificates:
        lines.append(f"root-certificates = {_toml_value(str(root_certificates))}")
    return "\n".join(lines) + "\n"
