"""What the command line prints: a line from the first second, progress, one line per round or
per sweep run, --quiet, --json, --dry-run, --version; library output in <run dir>/log.txt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from fedtune import __version__
from fedtune.config import (
    SECTION_HELP,
    SECTIONS,
    Config,
    allowed_values,
    describe,
    load_config,
    to_dict,
)
from fedtune.results.run_dir import METRICS_COLUMNS
from tests.conftest import MLP_DIGITS, REPO, rows_of

SETS = [arg for override in MLP_DIGITS for arg in ("--set", override)]


def fedtune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_version():
    out = fedtune("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fedtune {__version__}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject


@pytest.mark.slow
def test_run_speaks_at_once_and_keeps_library_output_in_its_log(tmp_path):
    """The first line comes before torch or Flower load; library warnings and Flower's log
    lines (once each) go to log.txt, not to the terminal."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fedtune", "run", "--output",
                                str(tmp_path / "run"), *SETS, "--set",
                                "privacy.mode=local", "--set", "privacy.target_epsilon=8",
                                "--set", "privacy.delta=1e-3", "--set", "client.optimizer=sgd"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO)
    first_line = process.stdout.readline()
    first_output_s = time.perf_counter() - started
    rest, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors[-2000:]
    print(f"first output after {first_output_s:.2f}s")
    assert first_line.startswith(f"fedtune {__version__} · fedtune: digits, 4 clients (iid)")
    assert first_output_s < 5  # about 0.3 s on an idle machine: no torch, Flower or Ray yet
    lines = (first_line + rest).splitlines()
    assert "loading the data and the model ..." in lines  # the stages, as lines when piped
    assert lines[-1] == f"run directory: {tmp_path / 'run'}"
    assert errors == ""
    assert not any("warn" in line.lower() and "log.txt" not in line for line in lines)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "UserWarning" in log  # Opacus' and torch's warnings under DP-SGD are kept there
    assert log.count("configure_train: Sampled 4 nodes") == 2  # once per round, not twice
    assert any(line.startswith("library warnings: ")
               and line.endswith(f", in {tmp_path / 'run'}/log.txt") for line in lines)


@pytest.mark.slow
def test_quiet_prints_the_result_only_json_prints_rounds_and_a_finished_resume_returns(tmp_path):
    quiet = fedtune("run", "--quiet", "--output", str(tmp_path / "q"), *SETS)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    lines = quiet.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("final global test accuracy ")
    assert lines[1] == f"run directory: {tmp_path / 'q'}"

    out = fedtune("run", "--json", "--output", str(tmp_path / "j"), *SETS)
    assert out.returncode == 0, out.stderr[-2000:]
    rounds = [json.loads(line) for line in out.stdout.splitlines()]
    csv_rows = rows_of(tmp_path / "j" / "metrics.csv")
    assert [r["round"] for r in rounds] == [1, 2]
    for line, row in zip(rounds, csv_rows, strict=True):
        assert set(line) == {*METRICS_COLUMNS, "run_dir"}
        assert line["run_dir"] == str(tmp_path / "j")
        assert f"{line['eval_accuracy']:.6g}" == row["eval_accuracy"]
        assert line["bytes_up"] == int(row["bytes_up"])

    # --resume of a finished run: nothing to do, at once
    before = (tmp_path / "q" / "summary.json").read_bytes()
    started = time.perf_counter()
    again = fedtune("run", "--resume", str(tmp_path / "q"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (f"{tmp_path / 'q'} already finished 2 rounds: nothing to "
                                    "do (--set run.rounds=N continues it)")
    assert time.perf_counter() - started < 10  # no torch, no data, no clients
    assert (tmp_path / "q" / "summary.json").read_bytes() == before


def test_dry_run_prints_the_config_and_the_partitions_and_trains_nothing(tmp_path):
    out = fedtune("run", "--dry-run", "--output", str(tmp_path / "dry"), *SETS,
                  "--set", "data.partitioner=dirichlet", "--set", "data.alpha=0.3")
    assert out.returncode == 0, out.stderr
    assert "[data]" in out.stdout and 'partitioner = "dirichlet"' in out.stdout
    assert "partitions: examples per client" in out.stdout
    assert "4 clients, " in out.stdout and "nothing was trained" in out.stdout
    assert not (tmp_path / "dry").exists()


def test_config_prints_valid_toml_by_section_with_each_keys_meaning_and_allowed_values(
        tmp_path):
    out = fedtune("config")
    assert out.returncode == 0, out.stderr
    parsed = tomllib.loads(out.stdout)
    assert parsed == to_dict(Config())  # every key, its default, TOML values (not reprs)
    assert list(parsed) == list(SECTIONS)
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 100
    for key, _, help_text in describe():
        section, name = key.split(".")
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = ")
                  and lines[:i].count(f"[{section}]  # {SECTION_HELP[section]}") == 1)
        comment = []
        while lines[at - 1].startswith("#"):
            at -= 1
            comment.insert(0, lines[at].lstrip("# "))
        text = " ".join(comment)
        assert text.startswith(help_text.split()[0]) and "Allowed: " in text, key
        assert text.endswith(allowed_values(key)), key
    assert "Allowed: one of 'fedavg', 'fedprox'" in out.stdout.replace("\n#   ", " ")
    (tmp_path / "all.toml").write_text(out.stdout)
    assert load_config(tmp_path / "all.toml") == Config()  # it runs as a config file


def test_a_failing_run_says_why_in_one_line_with_its_traceback_in_the_log(tmp_path):
    out = fedtune("run", "--output", str(tmp_path / "fail"), *SETS,
                  "--set", "faults.crash_probability=1", "--set",
                  "run.max_rounds_without_update=1")
    assert out.returncode == 1
    assert out.stderr.startswith("fedtune: run failed: round 1: 1 rounds in a row without an "
                                 "update of the global model")
    assert out.stderr.rstrip().endswith(f"(traceback in {tmp_path / 'fail'}/log.txt)")
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback (most recent call last)" in (tmp_path / "fail" / "log.txt").read_text()


def test_a_config_warning_is_one_line_on_stderr(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[client]\nlocal_epochs = 2\n")
    out = fedtune("run", str(file), "--dry-run", *SETS)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "fedtune: warning: client.local_epochs = 2 has no effect with client.local_steps = 5: "
        "only client.local_steps = 0 uses it"]



def test_report_and_audit_of_a_non_run_directory_answer_before_importing_torch(tmp_path):
    """In a fresh interpreter: one line, exit 2, well under a second, and no torch loaded."""
    probe = ("import sys, time; from fedtune.cli import main; start = time.perf_counter(); "
             f"codes = [main([command, {str(tmp_path)!r}]) for command in ('report', 'audit')]; "
             "print(codes, 'torch' in sys.modules, time.perf_counter() - start)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    codes, torch_loaded, seconds = result.stdout.rsplit(" ", 2)
    assert (codes, torch_loaded) == ("[2, 2]", "False"), result.stderr
    assert float(seconds) < 1.0
    assert result.stderr.splitlines() == [
        f"fedtune: error: {str(tmp_path)!r} is not a run directory: it has no metrics.csv",
        f"fedtune: error: {str(tmp_path)!r} is not a finished run directory: it needs "
        "config.toml, summary.json and model/"]


@pytest.mark.slow
def test_the_first_ctrl_c_stops_a_client_that_trains_for_minutes(tmp_path):
    """Nothing checks the stop request while a client trains (nor while a noise search or the
    data loading runs): the first Ctrl-C used to wait for the client to finish; now the run
    stops within ``fedtune.cli.STOP_GRACE_S`` (2 s) wherever it is, and says so."""
    run_dir = tmp_path / "run"
    settings = [*MLP_DIGITS, "client.local_steps=10000000", "data.num_clients=2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "fedtune", "run", "--output", str(run_dir),
         *[arg for setting in settings for arg in ("--set", setting)]],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "partitions.csv").exists():  # the rounds begin after it
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # inside client 0's ten million steps
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=45)
        took = time.monotonic() - interrupted
    finally:
        process.kill()
    assert process.returncode == 130, output
    assert took < 15, took
    assert "stopped before round 1 finished: no checkpoint was written" in output
    assert not (run_dir / "metrics.csv").exists()


def test_a_handled_ctrl_c_that_passed_through_a_librarys_embedded_code_still_exits_130(tmp_path):
    """A KeyboardInterrupt that escaped code a library ran through ``PyRun_String`` (Ray's
    Cython module does while it loads) makes CPython kill its own process with SIGINT at exit
    even when caught (return code -2, as ``python -m fedtune`` exits); ``main`` exits with the
    130 it returns."""
    (tmp_path / "interrupted_while_loading.py").write_text(
        "import ctypes, sys\n"
        "from fedtune import cli\n"
        "def interrupted_while_loading(args, console):\n"
        "    try:\n"
        "        ctypes.pythonapi.PyRun_SimpleString(b'raise KeyboardInterrupt')\n"
        "        raise KeyboardInterrupt  # what the signal handler raises meanwhile\n"
        "    except KeyboardInterrupt:\n"
        "        print('nothing to keep')\n"
        "        return 130\n"
        "cli.COMMANDS['config'] = interrupted_while_loading\n"
        "sys.exit(cli.main(['config']))\n")
    done = subprocess.run([sys.executable, "-m", "interrupted_while_loading"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 130, done.stderr[-1000:]
    assert done.stdout == "nothing to keep\n"
