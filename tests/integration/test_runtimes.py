"""The same app under Flower's own CLI (`flwr run .`) and the README's main job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.test_end_to_end import check_contract

FLOWER_CONNECTION = """
[superlink]
default = "fedtune-sim"

[superlink.fedtune-sim]
address = ":local:"
options.num-supernodes = 4
options.backend.client-resources.num-cpus = 1
"""


def _stop_local_superlink(flwr_home) -> None:
    """`flwr run` leaves a detached local SuperLink (and its SuperExecs) running: stop this
    test's own (found by its FLWR_HOME), wait for them, kill what does not stop (they hold
    fixed ports the next `flwr run` needs)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    rows = [line.strip().partition(" ") for line in out.splitlines()[1:]]
    links = {pid for pid, _, args in rows if str(flwr_home) in args}
    ours = [int(pid) for pid, _, args in rows
            if pid in links or any(f"--parent-pid {link}" in args for link in links)]
    for how in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, how)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in ours):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; its parent has not reaped it yet


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flwr_run(app: Path, run_config: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`flwr run` of the app folder ``app`` on a local simulation with its own FLWR_HOME."""
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(FLOWER_CONNECTION)
    # ports of its own: a local SuperLink another session left on Flower's fixed ports would
    # otherwise run this app with that session's code
    env = dict(os.environ, FLWR_HOME=str(flwr_home),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()))
    flwr = os.path.join(os.path.dirname(sys.executable), "flwr")
    try:
        return subprocess.run([flwr, "run", ".", "--run-config", run_config, "--stream"],
                              cwd=app, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _stop_local_superlink(flwr_home)


@pytest.mark.slow
def test_flwr_run_runs_the_app_and_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "flwr-run"
    overrides = " ".join([
        "data.dataset='digits'", "model.kind='mlp'", "data.partitioner='iid'",
        "data.num_clients=4", "run.rounds=2", "strategy.fraction_train=1.0",
        "strategy.fraction_evaluate=1.0", "client.lr=0.01", f"run.dir='{run_dir}'",
    ])
    result = flwr_run(REPO, overrides, tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    check_contract(run_dir, rounds=2, clients=4)


@pytest.mark.slow
def test_readme_main_job_beats_the_majority_class(tmp_path):
    """`fedtune run` with the defaults: MiniLM, Rotten Tomatoes, 8 natural clients, Ray."""
    out = tmp_path / "main-job"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fedtune", "run", "--output", str(out)],
                            capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    print(f"main job: {elapsed:.0f}s, final accuracy {summary['final']['eval_accuracy']:.3f}")
    assert summary["dataset"]["num_clients"] == 8 and summary["rounds_completed"] == 3
    assert summary["dataset"]["majority_class_accuracy"] < 0.6
    assert summary["final"]["eval_accuracy"] > 0.68
    check_contract(out, rounds=3, clients=2, num_clients=8)
