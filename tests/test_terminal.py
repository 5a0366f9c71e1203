"""What a person sees in a terminal during real runs (a pseudo-terminal rendered by a VT100
emulator, ``tests/terminal.py``): each round's line once, rounded as metrics.csv rounds it,
under a live bar that always names the round and phase running; ε in the rows and the final
lines; wall and round times named apart; the final screen points at plots and next commands;
workers' output (Ray's too) in log.txt, never on the terminal."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from fedtune.results.run_dir import read_csv
from fedtune.terminal import header_line, legend_lines, row_line
from tests.conftest import MLP_DIGITS, REPO
from tests.terminal import run_in_terminal

SETS = [arg for override in MLP_DIGITS for arg in ("--set", override)]
BOX = set("┏┓┗┛┃│─┡┩╇╈")  # a rich Table's frame


def _bar_lines(frame: list[str]) -> list[str]:
    """The live bar's line, drawn whole (it ends with the elapsed time)."""
    return [line for line in frame
            if re.fullmatch(r"(round \d+/\d+ |waiting for the clients).* \d+:\d\d:\d\d", line)]


@pytest.mark.slow
def test_a_run_prints_each_round_once_under_a_bar_that_names_the_running_phase(tmp_path):
    """Central DP with its audit, 4 clients Poisson-sampled at rate 0.5, 3 rounds, in
    process."""
    run_dir = tmp_path / "run"
    shown = run_in_terminal(
        "run", "--output", str(run_dir), *SETS, "--set", "strategy.fraction_train=0.5",
        "--set", "run.rounds=3", "--set", "client.local_steps=300",
        "--set", "privacy.mode=central", "--set", "privacy.target_epsilon=8",
        "--set", "privacy.adaptive_clipping=false", "--set", "privacy.clip_norm=1",
        "--set", "privacy.audit=true", "--set", "privacy.audit_canaries=50", timeout=300,
        columns=len(str(run_dir)) + 100)  # the final lines name the run directory unwrapped
    # (its length depends on pytest's base directory: longer under pytest-xdist)
    lines = shown.lines()
    assert shown.returncode == 0, "\n".join(lines)
    rows = read_csv(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    audit = json.loads((run_dir / "audit.json").read_text())

    # each round once, as metrics.csv rounds it, under one header and its legend; no table box
    assert lines.count(header_line(True)) == 1 and "ε" in header_line(True)
    start = lines.index(header_line(True))
    assert lines[start + 1:start + 4] == legend_lines(True)
    assert lines[start + 4:start + 7] == [row_line(row, True) for row in rows]
    for row in rows:
        assert sum(line == row_line(row, True) for line in lines) == 1
        assert row_line(row, True).split()[-1] == f"{float(row['epsilon']):.4g}"
    assert not BOX & set("".join(lines))

    # the final lines: the result, ε spent, the audit, the two times, what comes next
    after = lines[start + 7:]
    assert after[0].startswith("final global test accuracy "
                               f"{summary['final']['eval_accuracy']:.4f}")
    assert after[1] == (
        f"central DP: ε spent {float(summary['privacy']['epsilon']):.4g} at δ 1e-05 (rdp "
        "accountant)")
    reference = audit["estimate_reference"]
    assert after[2] == (
        f"audit: estimate ε {audit['empirical_epsilon']:.3g} (interval "
        f"{audit['interval'][0]:.3g} to {audit['interval'][1]:.3g}; at ε "
        f"{reference['epsilon']:.3g} it reads {reference['low']:.3g} to "
        f"{reference['high']:.3g} with 25 inserted canaries)"
        f"{' HIGH (not a proof)' * audit['estimate_high']}, lower bound ε "
        f"{audit['epsilon_lower_bound']:.3g} (no violation)")
    if after[3].startswith("library warnings: "):  # in process, Opacus warns in this process
        assert after.pop(3).endswith(f", in {run_dir}/log.txt")
    wall, rounds = re.fullmatch(r"took ([\d.]+)s wall \(start-up, workers and saving "
                                r"included\); rounds ([\d.]+)s \(summary.json total_time_s\)",
                                after[3]).groups()
    assert rounds == f"{summary['total_time_s']:.1f}" and float(wall) > float(rounds)
    assert after[4] == (f"plots: {run_dir}/plots/{{accuracy_loss.png,audit.png,epsilon.png,"
                        "partitions.png}")
    assert after[5].startswith(f"next: fedtune report {run_dir} ")
    assert after[6].startswith(f"      fedtune audit {run_dir} ")
    assert lines[-1] == f"run directory: {run_dir}"

    # the bar, frame by frame: the round running, never one whose line is printed already;
    # train counts the clients sampled in that round, not the federation's 4
    printed, phases = 0, []
    for frame in shown.frames:
        printed = max([printed] + [int(line.split()[0]) for line in frame
                                   if line in {row_line(row, True) for row in rows}])
        for bar in _bar_lines(frame):
            if bar.startswith("waiting"):
                assert printed == 0
                continue
            number, phase = int(bar.split()[1].split("/")[0]), bar.split()[2]
            # (the bar moves to the next round just before the finished round's line shows)
            assert number == printed + 1 or (phase, number) == ("sampling", printed + 2), (
                bar, printed)
            if phase == "train":  # Poisson-sampled at rate 0.5: the round's own cohort
                sampled = int(rows[number - 1]["clients_sampled"])
                assert re.search(rf" \d/{sampled} clients ", bar), (bar, sampled)
            if phase == "evaluate":
                assert re.search(r" [0-4]/4 clients ", bar), bar
            phases.append((number, phase))
    # (frames are ~0.1 s apart: 300 local steps keep a round's training on screen for several)
    assert "train" in {phase for _, phase in phases}
    assert all(phase in ("sampling", "train", "aggregate", "evaluate", "test")
               for _, phase in phases)


@pytest.mark.slow
def test_a_local_dp_run_on_ray_keeps_the_workers_output_in_its_log(tmp_path):
    """Opacus warns in every Ray worker; the terminal shows rows and results only."""
    run_dir = tmp_path / "ray"
    sets = [arg for override in MLP_DIGITS if not override.startswith("engine.backend")
            for arg in ("--set", override)]
    shown = run_in_terminal(
        "run", "--output", str(run_dir), *sets, "--set", "engine.backend=ray",
        "--set", "engine.num_actors=2", "--set", "privacy.mode=local",
        "--set", "privacy.target_epsilon=8", "--set", "privacy.delta=1e-3",
        "--set", "client.optimizer=sgd", timeout=400)
    lines = shown.lines()
    assert shown.returncode == 0, "\n".join(lines)
    rows = read_csv(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    text = "\n".join(line for frame in shown.frames for line in frame)
    assert "Warning" not in text and "ClientWorker" not in text and "pid=" not in text
    log = (run_dir / "log.txt").read_text()
    assert "(ClientWorker pid=" in log and "UserWarning" in log  # what the workers said
    assert "\x1b[" not in log  # plain text: no colour codes
    assert [line for line in lines if line in {row_line(r, True) for r in rows}] == [
        row_line(r, True) for r in rows]
    assert rows[-1]["epsilon"] == "" and float(rows[-1]["max_client_epsilon"]) > 0
    assert (f"local DP: ε spent {float(summary['privacy']['epsilon']):.4g} (the highest "
            "client's) at δ 0.001 (rdp accountant)") in lines


def test_help_opens_with_what_fedtune_is_and_lists_commands_by_use():
    out = subprocess.run([sys.executable, "-m", "fedtune", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=60, check=False)
    assert out.returncode == 0
    assert out.stdout.split("\n\n")[1].startswith("Federated fine-tuning simulations on Flower")
    assert "``" not in out.stdout and "only module" not in out.stdout
    listed = re.findall(r"^    ([\w-]+)", out.stdout, flags=re.MULTILINE)
    assert listed == ["run", "sweep", "report", "audit", "config", "flwr-setup", "certs",
                      "publish", "registry", "superexec"]


def test_ctrl_c_before_any_round_never_points_at_a_run_directory(tmp_path):
    """Two Ctrl-C while the data loads: no claim that finished rounds or a checkpoint exist."""
    process = subprocess.Popen([sys.executable, "-m", "fedtune", "run", "--output",
                                str(tmp_path / "run"), *SETS], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout.readline().startswith("fedtune ")
    assert process.stdout.readline().startswith("run directory: ")
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors[-2000:]
    said = rest + errors
    assert "finished rounds are in" not in said and "checkpoint of round" not in said
    assert "nothing to" in said  # "nothing to keep" / "nothing to resume"
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.slow
def test_a_twenty_round_sweep_shows_one_line_per_run_and_its_table_once(tmp_path):
    """Two points of 20 rounds each, in process: a status line while each runs, then one line
    per run and the table, each once; nothing from the libraries."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
[sweep]
name = "twenty"
output_dir = "{tmp_path / 'sweeps'}"
[sweep.grid]
"client.lr" = [0.01, 0.05]
[run]
rounds = 20
[data]
dataset = "digits"
num_clients = 4
partitioner = "iid"
max_examples = 0
[model]
kind = "mlp"
hidden_sizes = [16]
[client]
local_steps = 2
[strategy]
fraction_train = 1.0
fraction_evaluate = 1.0
[engine]
backend = "inprocess"
""")
    shown = run_in_terminal("sweep", str(sweep), timeout=400)
    lines = shown.lines()
    assert shown.returncode == 0, "\n".join(lines)
    directory = tmp_path / "sweeps" / "twenty"
    table = (directory / "table.md").read_text().splitlines()
    runs = [line for line in lines if line.startswith("[")]
    assert [line.split(":")[0] for line in runs] == ["[1/2] client.lr=0.01", "[2/2] client.lr=0.05"]
    assert all(re.search(r": eval_accuracy \d\.\d{4} \(done, [\d.]+s\)$", line) for line in runs)
    for row in table:
        assert lines.count(row) == 1, row
    assert "± 0.0000" not in "\n".join(table)  # one run per point: no spread to show
    assert lines[-1] == f"sweep directory: {directory}"
    seen = "\n".join(line for frame in shown.frames for line in frame)
    assert "Warning" not in seen
    assert re.search(r"\[1/2\] client.lr=0.01: round \d+/20 (train|evaluate|test|aggregate)",
                     seen)  # the status line names the point, the round and the phase
