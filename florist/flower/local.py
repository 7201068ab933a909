"""A real Flower deployment on one machine: SuperLink, SuperNodes and ``flwr run`` as processes.

Used by the tests and handy for trying the app before spreading it over machines. Everything
binds to 127.0.0.1 on free ports, each process gets its own process group (so its SuperExec and
ClientApp/ServerApp children go with it), every wait has a deadline, and ``close()`` (also on
errors, via the context manager) stops what was started: SIGTERM, a bounded wait, then SIGKILL.

Flower 1.42 serves the SuperLink's Control, Fleet and runtime APIs over HTTP on one port
(``--port``, 8000 by default); a SuperNode connects with ``--superlink HOST:PORT`` and serves its
own runtime API on ``--port`` (9094 by default), so several SuperNodes on one machine need
distinct ports. ``flwr`` finds the SuperLink through ``$FLWR_HOME/config.toml``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from florist.errors import FloristError
from florist.flower.app_config import flwr_config_toml, toml_value

CONNECTION = "florist-local"
HOST = "127.0.0.1"


class FederationError(FloristError):
    """A Flower process failed to start or a run did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _bin(name: str) -> str:
    """The console script next to this Python (the venv's), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"{name} not found: is flwr installed in this environment?")
    return found


def _node_config_arg(node_config: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in node_config.items())


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    descendants: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def remember_descendants(self) -> None:
        # SuperExec starts its apps in new sessions; remember them so teardown finds them.
        with contextlib.suppress(psutil.Error):
            self.descendants |= {p.pid for p in psutil.Process(self.popen.pid).children(recursive=True)}


@dataclass
class RunOutcome:
    run_id: str
    status: str  # e.g. finished:completed, finished:failed
    details: str
    seconds: float
    info: dict[str, Any]

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 for one test or one trial run."""

    def __init__(self, work_dir: str | Path, *, env: Mapping[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.work_dir / "flwr-home"
        self.processes: list[Process] = []
        self.superlink: Process | None = None
        self.supernodes: list[Process] = []
        self.env = dict(os.environ)
        # The apps import florist from the installed package; when florist runs from a source
        # checkout (not pip-installed) make that checkout importable for every Flower process.
        import florist

        source_root = str(Path(florist.__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (source_root, self.env.get("PYTHONPATH", "")) if p
        )
        # flwr's processes start helpers (flower-superexec, ...) by name: find the venv's first.
        bin_dir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join(p for p in (bin_dir, self.env.get("PATH", "")) if p)
        self.env["FLWR_HOME"] = str(self.flwr_home)
        self.env.setdefault("FLORIST_PROGRESS", "0")
        self.env.update(env or {})

    # --- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], port: int) -> Process:
        log = self.work_dir / f"{name}.log"
        handle = open(log, "wb")  # noqa: SIM115 - owned by the child from here on
        try:
            popen = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.work_dir,
                start_new_session=True,
            )
        finally:
            handle.close()
        process = Process(name, popen, log, port)
        self.processes.append(process)
        return process

    def _wait_listening(self, process: Process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise FederationError(
                    f"{process.name} exited with code {process.popen.returncode}:\n{_tail(process.log)}"
                )
            if _port_open(process.port):
                return
            time.sleep(0.2)
        raise FederationError(
            f"{process.name} did not listen on port {process.port} within {timeout:.0f}s:\n{_tail(process.log)}"
        )

    def start_superlink(self, *, timeout: float = 600.0) -> Process:
        port = free_port()
        argv = [_bin("flower-superlink"), "--insecure", "--host", HOST, "--port", str(port)]
        argv += ["--disable-runtime-dependency-installation"]  # offline machines: never `uv sync`
        self.superlink = self._spawn("superlink", argv, port)
        self._wait_listening(self.superlink, timeout)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            flwr_config_toml(CONNECTION, f"{HOST}:{port}", insecure=True)
        )
        return self.superlink

    def start_supernode(self, node_config: Mapping[str, Any], *, timeout: float = 600.0) -> Process:
        return self.start_supernodes([node_config], timeout=timeout)[0]

    def start_supernodes(
        self, node_configs: list[Mapping[str, Any]], *, timeout: float = 600.0
    ) -> list[Process]:
        """Start all the SuperNodes, then wait for each to listen (their imports overlap)."""
        nodes = [self._spawn_supernode(config) for config in node_configs]
        for node in nodes:
            self._wait_listening(node, timeout)
        return nodes

    def _spawn_supernode(self, node_config: Mapping[str, Any]) -> Process:
        if self.superlink is None:
            raise FederationError("start the SuperLink first")
        port = free_port()
        argv = [
            _bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"{HOST}:{self.superlink.port}",
            "--host",
            HOST,
            "--port",
            str(port),
            "--node-config",
            _node_config_arg(node_config),
        ]
        node = self._spawn(f"supernode-{len(self.supernodes)}", argv, port)
        self.supernodes.append(node)
        return node

    def kill(self, process: Process, sig: int = signal.SIGKILL) -> None:
        """Kill a process with everything it started (a crashed machine, in the fault tests)."""
        process.remember_descendants()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.popen.pid, sig)
        for pid in process.descendants:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=10)

    def close(self, grace: float = 5.0) -> None:
        for process in self.processes:
            process.remember_descendants()
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            self.kill(process)
        self.processes.clear()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- flwr CLI ----------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [_bin("flwr"), *args],
                env=self.env,
                cwd=self.work_dir,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise FederationError(
                f"`flwr {' '.join(args[:2])}` did not return within {timeout:.0f}s"
            ) from None

    @staticmethod
    def _json(result: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
        text = result.stdout
        try:
            return json.loads(text[text.index("{") :])
        except ValueError:
            raise FederationError(
                f"{what} failed (exit {result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}"
            ) from None

    def start_run(self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None) -> str:
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        for key, value in (run_config or {}).items():
            args += ["--run-config", _node_config_arg({key: value})]
        reply = self._json(self.flwr(*args), "flwr run")
        if not reply.get("success") or not reply.get("run-id"):
            raise FederationError(f"flwr run did not start a run: {reply}")
        return str(reply["run-id"])

    def run_info(self, run_id: str) -> dict[str, Any]:
        reply = self._json(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json"), "flwr ls")
        runs = reply.get("runs") or []
        if not runs:
            raise FederationError(f"the SuperLink does not know run {run_id}: {reply}")
        return runs[0]

    def run_logs(self, run_id: str) -> str:
        """The run's logs (ServerApp output) as the SuperLink stored them."""
        result = self.flwr("log", run_id, CONNECTION, "--show")
        return result.stdout + result.stderr

    def _serverapp_exits(self, offset: int) -> tuple[int, int]:
        """ServerApps that reported their end to the SuperLink (its access log) since ``offset``,
        and the log's new end."""
        if self.superlink is None:
            return 0, offset
        try:
            with open(self.superlink.log, "rb") as log:
                log.seek(max(0, offset - 64))  # a marker split across two reads is still seen once
                text = log.read()
        except OSError:
            return 0, offset
        marker = b"/v1/runtime/push-task-output"
        overlap = text[: min(64, offset)]
        return text.count(marker) - overlap.count(marker), max(0, offset - 64) + len(text)

    def wait(self, run_id: str, *, timeout: float, poll: float = 1.0, idle_poll: float = 30.0) -> RunOutcome:
        """Wait for a run to finish; on timeout stop it and raise (never hang).

        Each ``flwr ls`` is a Python process (over a second of CPU), so the status is asked when
        the SuperLink's log shows a ServerApp ending, every ``poll`` seconds for a while after
        that, and otherwise every ``idle_poll`` seconds (which also catches a run that fails
        before its ServerApp starts)."""
        started = time.monotonic()
        asked = hot_until = -float("inf")
        offset = 0
        while True:
            for process in self.processes:
                if process.alive():
                    process.remember_descendants()
            if self.superlink is not None and not self.superlink.alive():
                raise FederationError(f"the SuperLink died during run {run_id}:\n{_tail(self.superlink.log)}")
            now = time.monotonic()
            ended, offset = self._serverapp_exits(offset)
            if ended:
                hot_until = now + 30.0
            if now - asked < (poll if now < hot_until else idle_poll) and now - started <= timeout:
                time.sleep(0.5)
                continue
            asked = now
            info = self.run_info(run_id)
            status = str(info.get("status", ""))
            if status.startswith("finished"):
                return RunOutcome(
                    run_id, status, str(info.get("status-details", "")), time.monotonic() - started, info
                )
            if time.monotonic() - started > timeout:
                self.flwr("stop", run_id, CONNECTION)
                raise FederationError(
                    f"run {run_id} did not finish within {timeout:.0f}s (status {status}); stopped it.\n"
                    f"SuperLink log:\n{_tail(self.superlink.log) if self.superlink else ''}"
                )

    def run(
        self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None, *, timeout: float = 600.0
    ) -> RunOutcome:
        return self.wait(self.start_run(app_dir, run_config), timeout=timeout)

    def logs(self, name: str = "superlink", lines: int = 200) -> str:
        return _tail(self.work_dir / f"{name}.log", lines)  # "" for a process never started
