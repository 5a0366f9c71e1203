"""SecAgg+ in a real deployment: SuperLink and 4 SuperNodes on 127.0.0.1 with TLS and node
authentication, two rounds (the processes and credentials as in ``test_deploy``). One SuperNode
is hostile (issue 25, item 1): in round 1 it sends a public key that is no P-384 point, in round
2 a share for a neighbour that does not open."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from fedtune.deploy.certs import write_credentials
from tests.conftest import REPO, rows_of
from tests.integration.test_deploy import BIN, Processes, _free_port, _wait_for_port
from tests.integration.test_end_to_end import CONTRACT

HOSTILE = 3  # the partition id of the hostile SuperNode
PLAN = "bad-mask-key@1,bad-share@2"  # tests.hostile_secagg


@pytest.mark.slow
def test_two_secure_rounds_across_tls_supernodes_one_of_them_hostile(tmp_path):
    """Before: the garbage key made every honest client fail (the round failed, the honest
    ones blamed) and the bad share made its receiver drop while its sender stayed ok. Now the
    hostile client alone is rejected each round, named in clients.csv, and both rounds apply
    the honest three clients' sum."""
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
        for index, (private, public) in enumerate(creds.supernode_keys):
            registered = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public),
                                         "test"], env=cli_env, capture_output=True, text=True,
                                        timeout=60, check=False)
            assert "registered successfully" in registered.stdout, registered.stdout
            node_env = dict(base_env, FLWR_HOME=str(tmp_path / f"node-home-{index}"))
            if index == HOSTILE:  # tests/integration/hostile_node/sitecustomize.py loads
                node_env.update(FEDTUNE_TEST_SECAGG_ATTACK=PLAN, PYTHONPATH=os.pathsep.join(
                    [str(REPO / "tests" / "integration" / "hostile_node"), str(REPO),
                     os.environ.get("PYTHONPATH", "")]))
            processes.start(f"supernode-{index}", [
                str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert),
                "--superlink", f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private),
                "--node-config", f"partition-id={index} num-partitions=4",
                "--port", str(_free_port()),
            ], node_env)

        run_dir = tmp_path / "run"
        overrides = " ".join([
            "data.dataset='digits'", "model.kind='mlp'", "data.partitioner='iid'",
            "data.num_clients=4", "run.rounds=2", "strategy.fraction_train=1.0",
            "strategy.fraction_evaluate=0.0", "client.lr=0.01", "engine.node_wait_s=120",
            "strategy.secure_aggregation=true", f"run.dir='{run_dir}'",
        ])
        result = subprocess.run([str(BIN / "flwr"), "run", ".", "test", "--run-config",
                                 overrides, "--stream"], cwd=REPO, env=cli_env,
                                capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        deadline = time.monotonic() + 60  # the log stream can end just before the last write
        while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
        # the results contract (test_end_to_end's check_contract but for its bytes rule: a
        # masked reply is uint64, so more goes up than comes down)
        assert all((run_dir / name).is_file() for name in CONTRACT)
        metrics = rows_of(run_dir / "metrics.csv")
        assert [(r["clients_sampled"], r["clients_ok"], r["model_update"]) for r in metrics] == [
            ("4", "3", "applied")] * 2
        assert all(int(r["bytes_up"]) > int(r["bytes_down"]) > 0 for r in metrics)
        clients = {(int(r["round"]), int(r["client_id"])): r
                   for r in rows_of(run_dir / "clients.csv")}
        assert sorted(clients) == [(r, c) for r in (1, 2) for c in range(4)]
        assert {clients[r, c]["status"] for r in (1, 2) for c in range(3)} == {"ok"}
        assert clients[1, HOSTILE]["status"] == clients[2, HOSTILE]["status"] == "rejected"
        assert clients[1, HOSTILE]["reason"].startswith("secagg setup: a public key that is not "
                                                        "a P-384 point")
        assert clients[2, HOSTILE]["reason"].startswith("secagg masked-input: its share for "
                                                        "client ")
        assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 2
        lines = (run_dir / "strategy_metrics.jsonl").read_text().splitlines()
        secure = [json.loads(line)["train"] for line in lines]
        assert [(m["secagg-survivors"], m["secagg-failed"]) for m in secure] == [(3, 0), (3, 0)]
        assert float(rows_of(run_dir / "metrics.csv")[-1]["eval_accuracy"]) > 0.2
    finally:
        processes.stop_all()
