"""Sweeps: grid expansion, skipping finished runs, mean ± std tables, the CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fedtune.config import ConfigError
from fedtune.engine.launch import run_inprocess
from fedtune.sweep import (
    expand,
    expand_reference,
    group_rows,
    load_sweep,
    markdown_table,
    run_sweep,
)

SWEEP = """
[sweep]
name = "tiny"
output_dir = "{out}"
x = "client.lr"

[sweep.grid]
"client.lr" = [0.001, 0.01]
"run.seed" = [0, 1]

[data]
dataset = "digits"
num_clients = 3
partitioner = "iid"
max_examples = 0

[model]
kind = "mlp"
hidden_sizes = [16]

[run]
rounds = 1

[client]
local_steps = 3

[strategy]
fraction_train = 1.0
fraction_evaluate = 1.0

[engine]
backend = "inprocess"
"""


def _write(tmp_path, text=SWEEP):
    file = tmp_path / "sweep.toml"
    file.write_text(text.format(out=tmp_path / "sweeps"))
    return file


def test_grid_expands_to_every_combination_with_own_run_dirs(tmp_path):
    spec = load_sweep(_write(tmp_path))
    runs = expand(spec)
    assert [r.values for r in runs] == [
        {"client.lr": 0.001, "run.seed": 0}, {"client.lr": 0.001, "run.seed": 1},
        {"client.lr": 0.01, "run.seed": 0}, {"client.lr": 0.01, "run.seed": 1}]
    assert runs[3].config.client.lr == 0.01 and runs[3].config.run.seed == 1
    assert runs[3].config.model.hidden_sizes == [16]
    assert len({r.config.run.dir for r in runs}) == 4


def test_bad_grid_values_fail_before_anything_runs(tmp_path):
    text = SWEEP.replace('"client.lr" = [0.001, 0.01]', '"client.lr" = [0.001, -1]')
    with pytest.raises(ConfigError, match="client.lr = -1 is not allowed"):
        load_sweep(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="needs a \\[sweep.grid\\] table"):
        load_sweep(_write(tmp_path, "[data]\nalpha = 1\n"))
    assert not (tmp_path / "sweeps").exists()


def test_finished_runs_are_skipped_and_unfinished_ones_rerun(tmp_path):
    spec = load_sweep(_write(tmp_path))
    started = []

    def run_one(config):
        started.append(config.run.dir)
        return run_inprocess(config)

    rows = run_sweep(spec, run_one)
    assert len(started) == 4 and len(rows) == 4
    # simulate a run killed before it finished: its summary is gone
    (spec.directory / "runs" / expand(spec)[1].slug / "summary.json").unlink()
    started.clear()
    again = run_sweep(spec, run_one)
    assert started == [expand(spec)[1].config.run.dir]
    assert [r["eval_accuracy"] for r in again] == [r["eval_accuracy"] for r in rows]
    with (spec.directory / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4


def test_group_rows_gives_mean_and_sample_std_over_seeds():
    rows = [{"a": 1, "run.seed": s, "m": v} for s, v in enumerate([0.5, 0.7, 0.9])]
    rows.append({"a": 2, "run.seed": 0, "m": 0.1})
    table = group_rows(rows, ["a"], "m")
    assert table[0]["mean"] == pytest.approx(0.7)
    assert table[0]["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert table[0]["n"] == 3 and table[1] == {"a": 2, "mean": 0.1, "std": 0.0, "n": 1}


def test_sweep_cli_writes_results_table_and_plot(tmp_path):
    file = _write(tmp_path)
    result = subprocess.run([sys.executable, "-m", "fedtune", "sweep", str(file)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    directory = tmp_path / "sweeps" / "tiny"
    assert (directory / "plot.png").read_bytes()[:4] == b"\x89PNG"
    table = (directory / "table.md").read_text()
    assert "| client.lr | eval_accuracy (mean ± std) | runs |" in table
    assert table.count("| 2 |") == 2
    assert "[4/4]" in result.stdout
    second = subprocess.run([sys.executable, "-m", "fedtune", "sweep", str(file)],
                            capture_output=True, text=True, timeout=300)
    assert second.stdout.count("skipped (finished before)") == 4
    summary = json.loads((directory / "runs").joinpath(
        sorted(p.name for p in (directory / "runs").iterdir())[0], "summary.json").read_text())
    assert summary["status"] == "finished"


VARIANTS = SWEEP.replace('"run.seed" = [0, 1]', '''"run.seed" = [0, 1]
model = [{{ name = "small", "model.hidden_sizes" = [8] }},
         {{ name = "big", "model.hidden_sizes" = [32] }}]

[sweep.reference]
"client.local_steps" = 1''')


def test_variants_set_their_keys_together_and_references_leave_x_empty(tmp_path):
    spec = load_sweep(_write(tmp_path, VARIANTS))
    runs = expand(spec)
    assert len(runs) == 8
    assert {(r.values["model"], tuple(r.config.model.hidden_sizes)) for r in runs} == {
        ("small", (8,)), ("big", (32,))}
    references = expand_reference(spec)  # one per (model, seed); x = client.lr stays empty
    assert len(references) == 4
    assert all(r.values["client.lr"] is None and r.slug.startswith("reference_")
               and r.config.client.local_steps == 1 for r in references)
    assert {(r.values["model"], r.values["run.seed"]) for r in references} == {
        ("small", 0), ("small", 1), ("big", 0), ("big", 1)}


def test_grid_selection_runs_only_the_chosen_values(tmp_path):
    spec = load_sweep(_write(tmp_path, VARIANTS), selection=["model=big", "run.seed=[1]"])
    chosen = [r for r in expand(spec) + expand_reference(spec) if spec.selects(r)]
    assert len(chosen) == 3
    assert all(r.values["model"] == "big" and r.values["run.seed"] == 1 for r in chosen)
    with pytest.raises(ConfigError, match="--grid 'optimizer=adam' is not allowed"):
        load_sweep(_write(tmp_path, VARIANTS), selection=["optimizer=adam"])


def test_a_variant_without_a_name_is_refused(tmp_path):
    text = VARIANTS.replace('name = "small", ', "")
    with pytest.raises(ConfigError, match="sweep.grid.model is not allowed"):
        load_sweep(_write(tmp_path, text))


def test_markdown_table_shows_epsilon_spent_and_infinity():
    table = [{"privacy.target_epsilon": math.inf, "mean": 0.75, "std": 0.01, "n": 3,
              "epsilon_spent": math.inf},
             {"privacy.target_epsilon": 1.0, "mean": 0.6, "std": 0.02, "n": 3,
              "epsilon_spent": 0.998}]
    text = markdown_table(table, ["privacy.target_epsilon"], "eval_accuracy", True)
    assert "| privacy.target_epsilon | eval_accuracy (mean ± std) | runs | ε spent |" in text
    assert "| inf | 0.7500 ± 0.0100 | 3 | inf |" in text
    assert "| 1 | 0.6000 ± 0.0200 | 3 | 0.998 |" in text
