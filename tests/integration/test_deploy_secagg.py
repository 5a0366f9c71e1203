"""SecAgg+ in a real deployment: SuperLink and 3 SuperNodes on 127.0.0.1 with TLS and node
authentication, two rounds (the processes and credentials as in ``test_deploy``)."""

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


@pytest.mark.slow
def test_two_secure_rounds_across_three_tls_supernodes(tmp_path):
    creds = write_credentials(tmp_path / "creds", ["localhost", "127.0.0.1"], 3)
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
            processes.start(f"supernode-{index}", [
                str(BIN / "flower-supernode"), "--root-certificates", str(creds.ca_cert),
                "--superlink", f"127.0.0.1:{port}", "--auth-supernode-private-key", str(private),
                "--node-config", f"partition-id={index} num-partitions=3",
                "--port", str(_free_port()),
            ], dict(base_env, FLWR_HOME=str(tmp_path / f"node-home-{index}")))

        run_dir = tmp_path / "run"
        overrides = " ".join([
            "data.dataset='digits'", "model.kind='mlp'", "data.partitioner='iid'",
            "data.num_clients=3", "run.rounds=2", "strategy.fraction_train=1.0",
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
        assert [(r["clients_sampled"], r["clients_ok"]) for r in metrics] == [("3", "3")] * 2
        assert all(int(r["bytes_up"]) > int(r["bytes_down"]) > 0 for r in metrics)
        clients = rows_of(run_dir / "clients.csv")
        assert sorted((r["round"], r["client_id"], r["status"]) for r in clients) == [
            (str(r), str(c), "ok") for r in (1, 2) for c in range(3)]
        assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 2
        lines = (run_dir / "strategy_metrics.jsonl").read_text().splitlines()
        secure = [json.loads(line)["train"] for line in lines]
        assert [(m["secagg-survivors"], m["secagg-failed"]) for m in secure] == [(3, 0), (3, 0)]
        assert float(rows_of(run_dir / "metrics.csv")[-1]["eval_accuracy"]) > 0.2
    finally:
        processes.stop_all()
