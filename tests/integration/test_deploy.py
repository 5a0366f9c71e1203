"""A real federation on 127.0.0.1: TLS, node authentication, signed apps only, and a stranger."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.common.constant import ErrorCode
from safetensors.numpy import load_file

from fedtune.config import load_config
from fedtune.deploy.certs import write_credentials
from fedtune.deploy.registry import RegistryServer
from fedtune.deploy.signing import publish
from fedtune.server.app import run_federated
from tests.client.test_node_state import deployment_grid
from tests.conftest import REPO, rows_of
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


STRANGER_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stranger"
version = "1.0.0"

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "stranger_app:server"
clientapp = "stranger_app:client"

[tool.flwr.app.config]
marker-dir = "{markers}"
"""

STRANGER_CODE = """\
import json
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    out = Path(context.run_config["marker-dir"])
    (out / "server-ran").write_text("the stranger's code ran on the server")
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node,
                        message_type="train") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=180)
    (out / "replies.json").write_text(json.dumps([
        {"node": r.metadata.src_node_id, "error": r.error.code if r.has_error() else None}
        for r in replies]))


@client.train()
def train(msg, context):
    Path(context.run_config["marker-dir"], f"client-ran-{context.node_id}").write_text("ran")
    return Message(RecordDict(), reply_to=msg)
"""


def _stranger_app(folder: Path, markers: Path) -> Path:
    """A Flower app of someone who holds only ca.crt: its code leaves marker files where it
    runs, and its ServerApp records what each SuperNode answered."""
    folder.mkdir()
    (folder / "pyproject.toml").write_text(STRANGER_PYPROJECT.format(markers=markers))
    (folder / "stranger_app.py").write_text(STRANGER_CODE)
    return folder


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"{what} within {seconds}s")


def _summary_rounds(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "summary.json").read_text())["rounds_completed"]
    except (OSError, ValueError, KeyError):
        return 0


def _same_weights(run_dir: Path, reference: Path) -> bool:
    ours, theirs = (load_file(str(d / "model" / "model.safetensors")) for d in (run_dir, reference))
    return ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_a_trusted_federation_runs_only_the_signed_app(tmp_path):
    """TLS, registered SuperNode keys, SuperNodes that run only apps signed by the federation's
    publisher key (``--trusted-entities``), a SuperLink whose ServerApps only ``fedtune
    superexec`` starts (signed apps only), pinned node ids. A stranger who holds ca.crt runs
    its own app: every SuperNode refuses it, and so does the server side; it registers its own
    SuperNode, which is never sampled. The honest app, published and signed, runs SCAFFOLD for
    two rounds, its client 1 playing the sign-flip attack (on its own SuperNode, from the run
    config) and the run measuring it; the SuperLink restarts and the run resumes for a third:
    each SuperNode's state-dir gives its client back its variates, and the run ends with the
    weights of an uninterrupted run (replayed rounds: tests/client/test_node_state.py). A
    FedPer run beside it does the same with each client's personal head: its personal.csv (each
    SuperNode evaluating its own models) after the restart is the uninterrupted run's."""
    creds = write_credentials(tmp_path / "creds", ["localhost", "127.0.0.1"], 5)
    registry_dir = tmp_path / "registry"
    published = publish(REPO, registry_dir, creds.publisher_key)
    registry = RegistryServer(registry_dir, log=lambda line: None)
    registry.start()
    port = _free_port()
    base_env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                    FLWR_TELEMETRY_ENABLED="0")
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds.ca_cert}"\n')
    cli_env = dict(base_env, FLWR_HOME=str(cli_home))
    secret = ["--superexec-auth-secret-file", str(creds.superexec_secret)]
    superexec_args = ["--runtime-api-address", f"127.0.0.1:{port}", "--root-certificates",
                      str(creds.ca_cert), *secret]
    processes = Processes(tmp_path)
    superlink_args = [
        str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert),
        "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile", str(creds.server_key),
        "--enable-supernode-auth", "--isolation", "process",
        "--disable-runtime-dependency-installation", *secret, "--host", "127.0.0.1",
        "--port", str(port), "--database", str(tmp_path / "state.db"),
    ]
    superlink_env = dict(base_env, FLWR_HOME=str(tmp_path / "link-home"),
                         FLWR_SUPERGRID_API_URL=registry.url)
    superexec = [str(BIN / "fedtune"), "superexec", *superexec_args, "--registry",
                 str(registry_dir), "--trusted-entities", str(creds.trusted_entities)]
    superexec_env = dict(base_env, FLWR_HOME=str(tmp_path / "exec-home"))
    try:
        superlink = processes.start("superlink", superlink_args, superlink_env)
        _wait_for_port(port, 60)
        node_ids = []
        for _, public in creds.supernode_keys[:3]:
            registered = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public),
                                         "test"], env=cli_env, capture_output=True, text=True,
                                        timeout=60)
            assert "registered successfully" in registered.stdout, registered.stdout
            node_ids.append(re.search(r"SuperNode (\d+) registered", registered.stdout)[1])
        for index, (private, _) in enumerate(creds.supernode_keys[:3]):
            processes.start(f"supernode-{index}", [
                str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert),
                "--superlink", f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private),
                "--trusted-entities", str(creds.trusted_entities),
                "--node-config", (f"partition-id={index} num-partitions=3 "
                                  f"state-dir='{tmp_path / f'node-state-{index}'}'"),
                "--port", str(_free_port()),
            ], dict(base_env, FLWR_HOME=str(tmp_path / f"node-home-{index}")))

        # a SuperNode whose key was never registered is refused
        code, output = processes.run_to_exit("unregistered", [
            str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert),
            "--superlink", f"127.0.0.1:{port}",
            "--auth-supernode-private-key", str(creds.supernode_keys[3][0]),
            "--node-config", "partition-id=0 num-partitions=3", "--port", str(_free_port()),
            "--max-retries", "2", "--max-wait-time", "15",
        ], dict(base_env, FLWR_HOME=str(tmp_path / "unregistered-home")), timeout=300)
        assert code != 0
        assert "Failed to activate SuperNode" in output
        # a SuperNode without TLS cannot talk to a TLS SuperLink
        code, output = processes.run_to_exit("plain", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
            "--node-config", "partition-id=0 num-partitions=3", "--port", str(_free_port()),
            "--max-retries", "2", "--max-wait-time", "15",
        ], dict(base_env, FLWR_HOME=str(tmp_path / "plain-home")), timeout=300)
        assert code != 0
        assert "Failed to initialize the connection" in output

        # the stranger holds ca.crt: it registers a SuperNode of its own, and runs its app
        stranger_home = tmp_path / "stranger-home"
        stranger_home.mkdir()
        (stranger_home / "config.toml").write_text((cli_home / "config.toml").read_text())
        stranger_env = dict(base_env, FLWR_HOME=str(stranger_home))
        registered = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                                     str(creds.supernode_keys[4][1]), "test"], env=stranger_env,
                                    capture_output=True, text=True, timeout=60)
        assert "registered successfully" in registered.stdout, registered.stdout
        processes.start("stranger-supernode", [
            str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert),
            "--superlink", f"127.0.0.1:{port}",
            "--auth-supernode-private-key", str(creds.supernode_keys[4][0]),
            "--node-config", "partition-id=0 num-partitions=3", "--port", str(_free_port()),
        ], dict(base_env, FLWR_HOME=str(tmp_path / "stranger-node-home")))
        markers = tmp_path / "markers"
        markers.mkdir()
        stranger_app = _stranger_app(tmp_path / "stranger-app", markers)

        # 1. were the server side to start its ServerApp (a plain SuperExec), the SuperNodes
        #    would still refuse it: the app is not signed by the publisher key
        plain = processes.start("plain-superexec", [str(BIN / "flower-superexec"),
                                                    *superexec_args],
                                dict(base_env, FLWR_HOME=str(tmp_path / "plain-exec-home")))
        started = subprocess.run([str(BIN / "flwr"), "run", str(stranger_app), "test"],
                                 env=stranger_env, capture_output=True, text=True, timeout=120)
        assert "Successfully started run" in started.stdout, started.stdout + started.stderr
        _wait_for(lambda: (markers / "replies.json").exists(), 300,
                  "the stranger's ServerApp did not hear back from the SuperNodes")
        replies = json.loads((markers / "replies.json").read_text())
        honest_nodes = {int(node) for node in node_ids}
        refused = {r["node"] for r in replies if r["error"] == ErrorCode.INVALID_FAB}
        assert refused >= honest_nodes, replies  # every SuperNode of the federation refused
        assert not list(markers.glob("client-ran-*")) or all(  # only its own node ran it
            name.name.removeprefix("client-ran-") not in node_ids
            for name in markers.glob("client-ran-*"))
        processes.stop(plain)
        (markers / "server-ran").unlink()

        # 2. the server side: fedtune superexec starts no ServerApp the publisher did not sign
        server_side = processes.start("superexec", superexec, superexec_env)
        started = subprocess.run([str(BIN / "flwr"), "run", str(stranger_app), "test"],
                                 env=stranger_env, capture_output=True, text=True, timeout=120)
        assert "Successfully started run" in started.stdout, started.stdout + started.stderr
        _wait_for(lambda: "is not signed by a trusted publisher key" in
                  (tmp_path / "superexec.log").read_text(), 120, "no refusal was logged")
        assert not (markers / "server-ran").exists()

        # 3. the honest app, published and signed, runs SCAFFOLD on the pinned SuperNodes only
        run_dir = tmp_path / "run"
        overrides = [
            "data.dataset='digits'", "model.kind='mlp'", "data.partitioner='iid'",
            "data.num_clients=3", "strategy.fraction_train=1.0", "strategy.fraction_evaluate=0.0",
            "strategy.name='scaffold'", "client.optimizer='sgd'", "client.lr=0.05",
            "engine.node_wait_s=120", "attack.name='sign_flip'", "attack.clients='1'",
            f"engine.node_ids='{','.join(node_ids)}'", f"run.dir='{run_dir}'",
        ]

        def honest_run(*more: str, base: list[str] = overrides) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "flwr"), "run", published.spec, "test",
                                   "--run-config", " ".join(base + list(more)), "--stream"],
                                  env=cli_env, capture_output=True, text=True, timeout=900)

        result = honest_run("run.rounds=2")
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        _wait_for(lambda: _summary_rounds(run_dir) == 2, 120,
                  "the honest run wrote no summary")  # the stream can end just before it
        check_contract(run_dir, rounds=2, clients=3)
        assert json.loads((run_dir / "summary.json").read_text())["attack"]["attackers"] == [1]
        assert [row["malicious_filtered"] for row in rows_of(run_dir / "metrics.csv")] == \
            ["0", "0"]  # measured: SCAFFOLD filters nothing
        assert not (markers / "server-ran").exists()
        honest_run_id = re.search(r"Successfully started run (\d+)", result.stdout)[1]
        assert f"[RUN {honest_run_id}" in (tmp_path / "supernode-0.log").read_text()
        assert f"[RUN {honest_run_id}" not in (tmp_path / "stranger-supernode.log").read_text()
        # ... and FedPer for one round: each SuperNode keeps its client's head, and evaluates
        # its own models when the server asks (fedtune.server.personal_messages)
        personal_dir = tmp_path / "run-fedper"
        personal = [o for o in overrides if not o.startswith(("strategy.name", "attack.",
                                                              "run.dir"))]
        personal += ["strategy.name='fedper'", "run.personal_eval_every=1",
                     f"run.dir='{personal_dir}'"]
        result = honest_run("run.rounds=1", base=personal)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        _wait_for(lambda: _summary_rounds(personal_dir) == 1, 120, "fedper wrote no summary")

        # 4. the SuperLink restarts (every Context it kept is gone) and the run resumes for a
        #    third round: the SuperNodes find their variates in their state-dir
        processes.stop(server_side)
        processes.stop(superlink)
        processes.start("superlink-again", superlink_args, superlink_env)
        _wait_for_port(port, 60)
        processes.start("superexec-again", superexec, superexec_env)
        result = honest_run("run.rounds=3", "run.resume=true")
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        _wait_for(lambda: _summary_rounds(run_dir) == 3, 120, "the resumed run wrote no summary")
        check_contract(run_dir, rounds=3, clients=3)
        # FedPer resumes for a second round: its heads come back from the state-dir
        result = honest_run("run.rounds=2", "run.resume=true", base=personal)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        _wait_for(lambda: _summary_rounds(personal_dir) == 2, 120, "fedper wrote no summary")
        versions = {tuple(sorted(p.name[:8] for p in run_key.glob("*/*.state")))
                    for run_key in (tmp_path / "node-state-0").iterdir()}
        # what a resume may still need: SCAFFOLD's after rounds 2 and 3, FedPer's after 1, 2
        assert versions == {("00000002", "00000003"), ("00000001", "00000002")}
        # the same run uninterrupted, its clients in this process (their Context kept)
        reference = load_config(run_dir / "config.toml", resolved=True)
        reference.run.dir, reference.run.resume = str(tmp_path / "reference"), False
        reference.engine.node_ids = []
        run_federated(deployment_grid(reference, None), reference)
        assert _same_weights(run_dir, tmp_path / "reference")
        reference = load_config(personal_dir / "config.toml", resolved=True)
        reference.run.dir, reference.run.resume = str(tmp_path / "fedper-ref"), False
        reference.engine.node_ids = []
        run_federated(deployment_grid(reference, None), reference)
        assert _same_weights(personal_dir, tmp_path / "fedper-ref")
        # every client's personalised model after the restart is the uninterrupted run's: the
        # head each SuperNode kept (the global head would differ, as round 2 shows)
        deployed = rows_of(personal_dir / "personal.csv")
        assert deployed == rows_of(tmp_path / "fedper-ref" / "personal.csv")
        assert len(deployed) == 2 * 3 * 2
        last = {(r["client_id"], r["model"]): r["accuracy"] for r in deployed if r["round"] == "2"}
        assert any(last[c, "personalised"] != last[c, "global"] for c in ("0", "1", "2"))
        summary = json.loads((personal_dir / "summary.json").read_text())["personal"]
        assert summary["round"] == 2 and summary["own_model"] == "personalised"
        assert summary["models"]["personalised"]["clients"] == 3
    finally:
        processes.stop_all()
        registry.shutdown()
