"""A real federation on 127.0.0.1: SuperLink and SuperNodes with TLS and node authentication."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.deploy.certs import write_credentials
from tests.conftest import REPO
from tests.integration.test_end_to_end import check_contract

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {seconds}s")


class Processes:
    """Background processes, each in its own session, killed (with children) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.running.append(process)
        return process

    def run_to_exit(self, name: str, args: list[str], env: dict, timeout: float
                    ) -> tuple[int, str]:
        """Run until the process exits by itself; its children (a SuperExec) are killed."""
        process = self.start(name, args, env)
        code = process.wait(timeout=timeout)
        self.stop(process)
        return code, (self.logs / f"{name}.log").read_text()

    def stop(self, process: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for process in self.running:
            self.stop(process)


@pytest.mark.slow
def test_tls_and_node_authentication_federation(tmp_path):
    creds = write_credentials(tmp_path / "creds", ["localhost", "127.0.0.1"], 4)
    port = _free_port()
    base_env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                    FLWR_TELEMETRY_ENABLED="0")
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds.ca_cert}"\n')
    cli_env = dict(base_env, FLWR_HOME=str(cli_home))
    processes = Processes(tmp_path)
    try:
        processes.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert),
            "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile", str(creds.server_key),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
            "--database", str(tmp_path / "state.db"),
        ], dict(base_env, FLWR_HOME=str(tmp_path / "link-home")))
        _wait_for_port(port, 60)
        for _, public in creds.supernode_keys[:3]:
            registered = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public),
                                         "test"], env=cli_env, capture_output=True, text=True,
                                        timeout=60)
            assert "registered successfully" in registered.stdout, registered.stdout
        for index, (private, _) in enumerate(creds.supernode_keys[:3]):
            processes.start(f"supernode-{index}", [
                str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert),
                "--superlink", f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private),
                "--node-config", f"partition-id={index} num-partitions=3",
                "--port", str(_free_port()),
            ], dict(base_env, FLWR_HOME=str(tmp_path / f"node-home-{index}")))

        # a SuperNode whose key was never registered is refused
        code, output = processes.run_to_exit("stranger", [
            str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert),
            "--superlink", f"127.0.0.1:{port}",
            "--auth-supernode-private-key", str(creds.supernode_keys[3][0]),
            "--node-config", "partition-id=0 num-partitions=3", "--port", str(_free_port()),
            "--max-retries", "2", "--max-wait-time", "15",
        ], dict(base_env, FLWR_HOME=str(tmp_path / "stranger-home")), timeout=120)
        assert code != 0
        assert "Failed to activate SuperNode" in output
        # a SuperNode without TLS cannot talk to a TLS SuperLink
        code, output = processes.run_to_exit("plain", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
            "--node-config", "partition-id=0 num-partitions=3", "--port", str(_free_port()),
            "--max-retries", "2", "--max-wait-time", "15",
        ], dict(base_env, FLWR_HOME=str(tmp_path / "plain-home")), timeout=120)
        assert code != 0
        assert "Failed to initialize the connection" in output

        run_dir = tmp_path / "run"
        overrides = " ".join([
            "data.dataset='digits'", "model.kind='mlp'", "data.partitioner='iid'",
            "data.num_clients=3", "run.rounds=2", "strategy.fraction_train=1.0",
            "strategy.fraction_evaluate=0.0", "client.lr=0.01", "engine.node_wait_s=120",
            f"run.dir='{run_dir}'",
        ])
        result = subprocess.run([str(BIN / "flwr"), "run", ".", "test", "--run-config",
                                 overrides, "--stream"], cwd=REPO, env=cli_env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        deadline = time.monotonic() + 60  # the log stream can end just before the last write
        while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
        check_contract(run_dir, rounds=2, clients=3)
    finally:
        processes.stop_all()
