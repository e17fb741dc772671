"""Flower's deployment engine on this machine: a SuperLink and SuperNodes on 127.0.0.1.

:class:`LocalDeployment` starts them (insecure, loopback only), runs an app folder with
``flwr run`` and tears everything down by process group; the Flower app's ``run`` and the
deployment tests drive it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

# ----------------------------------------------------------------------------------------------
# Flower's deployment engine on this machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunResult:
    """How a ``flwr run`` ended.

    Its id, Flower's status (``finished:completed`` on success) and the run's log (the
    ServerApp's output).
    """

    run_id: int
    status: str
    log: str

    @property
    def ok(self) -> bool:
        """Whether the run completed."""
        return self.status == "finished:completed"


class LocalDeployment:
    """Flower's deployment engine on this machine: one SuperLink and ``nodes`` SuperNodes.

    All on 127.0.0.1 with free ports, ``--insecure`` (no TLS: for one machine only), the
    SuperLink with ``--disable-runtime-dependency-installation`` (the app runs in this Python
    environment; Flower would otherwise ``uv sync`` the app's dependencies), SuperNode ``i``
    with ``--node-config "partition-id=i num-partitions=<nodes>"``. ``FLWR_HOME`` is
    ``<workdir>/flwr-home``, holding the Flower configuration file with the SuperLink
    connection ``local-deployment``. Logs go to ``<workdir>/*.log``. Use it as a context
    manager: the processes (and the app processes they start) are stopped on exit, also on
    errors. POSIX only (process groups).
    """

    CONNECTION = "local-deployment"

    def __init__(
        self,
        nodes: int,
        workdir: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.nodes = nodes
        self.workdir = Path(workdir).resolve()
        self.home = self.workdir / "flwr-home"
        self.startup_timeout = startup_timeout
        self.bin = Path(sys.executable).parent
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self._by_name: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            **dict(env or {}),
        }

    def superlink_command(self) -> list[str]:
        """The SuperLink's command line."""
        return [str(self.bin / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                "--port", str(self.port), "--disable-runtime-dependency-installation"]  # fmt: skip

    def supernode_command(self, partition: int, port: int) -> list[str]:
        """SuperNode ``partition``'s command line (``port``: its own Runtime API)."""
        return [str(self.bin / "flower-supernode"), "--insecure", "--superlink",
                f"127.0.0.1:{self.port}", "--port", str(port), "--node-config",
                f"partition-id={partition} num-partitions={self.nodes}"]  # fmt: skip

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, cmd: list[str], name: str) -> None:
        if not Path(cmd[0]).exists():
            raise RuntimeError(f"{cmd[0]} does not exist: install Flower next to this Python "
                               '(pip install "glora-math[flower]")')  # fmt: skip
        out = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(out)
        proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        self._by_name[name] = proc

    def start(self) -> None:
        """Start the SuperLink, wait until it answers, then start the SuperNodes."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self._spawn(self.superlink_command(), "superlink")
        deadline = time.monotonic() + self.startup_timeout
        while not self._healthy():
            if self.procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not start; see {self.workdir}/superlink.log")
            time.sleep(0.5)
        for i in range(self.nodes):
            self._spawn(self.supernode_command(i, free_port()), f"supernode-{i}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return int(r.status) == 200
        except OSError:
            return False

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` command line against this deployment."""
        return subprocess.run(
            [str(self.bin / "flwr"), *args], cwd=self.workdir, env=self.env, text=True,
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip

    def run(self, app: str | Path, run_config: Mapping[str, Any], *, timeout: float) -> RunResult:
        """``flwr run <app> local-deployment --run-config <file>``; wait for the run to end.

        Raises
        ------
        RuntimeError
            If ``flwr run`` fails, or the run does not end within ``timeout`` seconds (it is
            stopped then).
        """
        return self.wait(self.submit(app, run_config), timeout=timeout)

    def submit(self, app: str | Path, run_config: Mapping[str, Any]) -> int:
        """Start a run (``flwr run``) and return its id without waiting for it."""
        overrides = self.workdir / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)))
        started = self.flwr("run", str(app), self.CONNECTION, "--run-config", str(overrides),
                            "--format", "json")  # fmt: skip
        try:
            return int(_last_json(started.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"flwr run failed: {(started.stdout + started.stderr)[-2000:]}"
                               ) from None  # fmt: skip

    def kill(self, name: str) -> None:
        """SIGKILL one process group by its log name (``superlink``, ``supernode-<i>``)."""
        proc = self._by_name.get(name)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def restart_node(self, partition: int) -> None:
        """Start SuperNode ``partition`` again (a new node id for Flower, the same data)."""
        self.kill(f"supernode-{partition}")
        self._spawn(self.supernode_command(partition, free_port()), f"supernode-{partition}")

    def wait(self, run_id: int, *, timeout: float) -> RunResult:
        """Stream run ``run_id``'s log until it ends; its status and log."""
        try:
            streamed = self.flwr("log", str(run_id), self.CONNECTION, "--stream", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.flwr("stop", str(run_id), self.CONNECTION)
            raise RuntimeError(f"run {run_id} did not end within {timeout:g} s") from None
        text = streamed.stdout + streamed.stderr
        (self.workdir / f"run-{run_id}.log").write_text(text)
        listed = self.flwr("ls", self.CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            status = str(_last_json(listed.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, TypeError, IndexError):
            status = f"unknown ({listed.stdout[-300:]})"
        return RunResult(run_id, status, text)

    def stop(self) -> None:
        """Stop the SuperNodes, then the SuperLink (each process group: SIGTERM, then SIGKILL)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        self.procs.clear()
        self._by_name.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()


def _last_json(text: str) -> Any:
    """The JSON object ``flwr ... --format json`` printed (after any other output)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in the output")
    return json.JSONDecoder().raw_decode(text[start:])[0]


__all__ = ["LocalDeployment", "RunResult", "free_port"]
