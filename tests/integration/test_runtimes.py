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


def _stop_local_superlink(flwr_home) -> None:
    """`flwr run` leaves a detached local SuperLink (and its SuperExecs) running: stop this
    test's own (found by its FLWR_HOME), wait for them, kill what does not stop (they hold
    fixed ports the next `flwr run` needs)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
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


def _flower_env(flwr_home: Path) -> dict[str, str]:
    """An FLWR_HOME and local SuperLink ports of this test's own: a local SuperLink another
    session left on Flower's fixed ports would otherwise run this app with that session's
    code. Runtime dependency installation is not switched off here: `fedtune flwr-setup`
    must do that."""
    env = dict(os.environ, FLWR_HOME=str(flwr_home),
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()))
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    return env


def flwr_setup(flwr_home: Path, env: dict[str, str], supernodes: int
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", "flwr-setup", "--supernodes",
                           str(supernodes), "--default"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)


def flwr_run(app: Path, run_config: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`fedtune flwr-setup`, then a plain `flwr run` of the app folder ``app`` on the local
    simulation it set up, with an FLWR_HOME of its own."""
    flwr_home = tmp_path / "flwr-home"
    env = _flower_env(flwr_home)
    flwr = os.path.join(os.path.dirname(sys.executable), "flwr")
    try:
        setup = flwr_setup(flwr_home, env, 4)
        assert setup.returncode == 0, setup.stderr[-3000:]
        return subprocess.run([flwr, "run", ".", "--run-config", run_config, "--stream"],
                              cwd=app, env=env, capture_output=True, text=True, timeout=600,
                              check=False)
    finally:
        _stop_local_superlink(flwr_home)


def test_flwr_setup_writes_the_connection_and_starts_a_superlink_that_installs_nothing(
        tmp_path):
    """What `flwr run .` needs, from one command; read back with Flower's own reader."""
    flwr_home = tmp_path / "flwr-home"
    env = _flower_env(flwr_home)
    try:
        setup = flwr_setup(flwr_home, env, 3)
        assert setup.returncode == 0, setup.stderr[-3000:]
        assert "started the local SuperLink without runtime dependency installation" in (
            setup.stdout)
        reader = ("from flwr.cli.flower_config import read_superlink_connection as r; "
                  "c = r(); print(c.name, c.address, c.options.num_supernodes, "
                  "c.options.backend.client_resources.num_cpus)")
        read = subprocess.run([sys.executable, "-c", reader], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert read.stdout.split() == ["fedtune-sim", ":local:", "3", "1"], read.stderr
        out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True,
                             text=True, check=False).stdout  # -ww: whole lines (COLUMNS=80)
        links = [line.split()[0] for line in out.splitlines()
                 if "flower-superlink" in line and str(flwr_home) in line]
        assert len(links) == 1, out
        link = links[0]
        environment = Path(f"/proc/{link}/environ").read_bytes().split(b"\0")
        assert b"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in environment
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
