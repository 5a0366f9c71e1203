"""Sweeps: grid expansion, skipping finished runs, mean ± std tables, the CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import ConfigError
from fedtune.engine.inprocess import run_inprocess
from fedtune.results.plots import plot_curves
from fedtune.studies.sweep import (
    expand,
    expand_central,
    expand_reference,
    load_sweep,
    result_row,
    run_sweep,
)
from fedtune.studies.tables import group_rows, markdown_table, round_curves, run_curves, write_table

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
    # a setting outside the grid changed in the sweep file: the finished runs are stale
    changed = load_sweep(_write(tmp_path, SWEEP.replace("local_steps = 3", "local_steps = 4")))
    started.clear()
    run_sweep(changed, run_one)
    assert started == [run.config.run.dir for run in expand(changed)]
    for run in expand(changed):
        assert "local_steps = 4" in (Path(run.config.run.dir) / "config.toml").read_text()


def test_a_finished_run_of_other_code_is_refused_rerun_or_reused_and_rows_name_their_code(
        tmp_path):
    """The client-drift study's figures mixed code versions: a sweep reused finished runs
    whose config matched, whatever code made them."""
    from fedtune.results.env_info import code_digest

    spec = load_sweep(_write(tmp_path))
    started = []

    def run_one(config):
        started.append(config.run.dir)
        return run_inprocess(config)

    rows = run_sweep(spec, run_one)
    git = json.loads((Path(rows[0]["run_dir"]) / "env.json").read_text())["git_sha"]
    assert all(r["code_sha256"] == code_digest() and r["git_sha"] == git for r in rows)
    assert "torch=" in rows[0]["versions"] and "flwr=" in rows[0]["versions"]
    with (spec.directory / "results.csv").open() as handle:
        assert {"git_sha", "code_sha256", "versions"} <= set(next(csv.DictReader(handle)))
    # one finished run "made by other code": its env.json says another digest
    env_file = Path(rows[2]["run_dir"]) / "env.json"
    env = json.loads(env_file.read_text())
    env_file.write_text(json.dumps({**env, "code_sha256": "0" * 64}))
    started.clear()
    with pytest.raises(ConfigError, match="1 finished runs of sweep tiny were made by other "
                                          "code \\(fedtune's source differs"):
        run_sweep(spec, run_one)
    assert started == []
    kept = run_sweep(spec, run_one, other_code="reuse")
    assert started == [] and kept[2]["code_sha256"] == "0" * 64
    again = run_sweep(spec, run_one, other_code="rerun")
    assert started == [rows[2]["run_dir"]] and again[2]["code_sha256"] == code_digest()
    assert again[2]["eval_accuracy"] == rows[2]["eval_accuracy"]  # the same code: same bits


def test_a_grid_selection_that_matches_nothing_is_an_error(tmp_path):
    text = SWEEP.replace('"client.lr" = [0.001, 0.01]',
                         '"strategy.name" = ["fedavg", "fedprox"]\n"client.lr" = [0.01]')
    with pytest.raises(ConfigError, match=r"--grid 'strategy.name=\[fedavg,fedprox\]' is not "
                                          r"allowed: '\[fedavg,fedprox\]' is none of the "
                                          "values of sweep.grid.strategy.name: 'fedavg', "
                                          r"'fedprox' \(write TOML, strings quoted: "
                                          r'strategy.name=\["fedavg", "fedprox"\]\)'):
        load_sweep(_write(tmp_path, text), selection=["strategy.name=[fedavg,fedprox]"])
    with pytest.raises(ConfigError, match="'fedyogi' is none of the values"):
        load_sweep(_write(tmp_path, text), selection=['strategy.name=["fedavg","fedyogi"]'])
    spec = load_sweep(_write(tmp_path, text), selection=['strategy.name=["fedprox"]'])
    assert spec.selection == {"strategy.name": ["fedprox"]}


def test_group_rows_gives_mean_and_sample_std_over_seeds():
    rows = [{"a": 1, "run.seed": s, "m": v} for s, v in enumerate([0.5, 0.7, 0.9])]
    rows.append({"a": 2, "run.seed": 0, "m": 0.1})
    table = group_rows(rows, ["a"], "m")
    assert table[0]["mean"] == pytest.approx(0.7)
    assert table[0]["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert table[0]["n"] == 3 and table[0]["values"] == [0.5, 0.7, 0.9]
    assert table[1] == {"a": 2, "mean": 0.1, "std": 0.0, "n": 1, "values": [0.1]}


def test_sweep_cli_writes_results_table_and_plot(tmp_path):
    file = _write(tmp_path)
    result = subprocess.run([sys.executable, "-m", "fedtune", "sweep", str(file)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    directory = tmp_path / "sweeps" / "tiny"
    assert (directory / "plot.png").read_bytes()[:4] == b"\x89PNG"
    table = (directory / "table.md").read_text()
    assert "| client.lr | eval_accuracy (mean ± std) | per seed | runs |" in table
    assert table.count("| 2 |") == 2
    lines = result.stdout.splitlines()  # a line per run, then the table; libraries: log.txt
    assert lines[0].startswith("fedtune ") and lines[0].endswith(f"sweep tiny: {directory}")
    assert [line.split(":")[0] for line in lines[1:5]] == [
        "[1/4] client.lr=0.001 run.seed=0", "[2/4] client.lr=0.001 run.seed=1",
        "[3/4] client.lr=0.01 run.seed=0", "[4/4] client.lr=0.01 run.seed=1"]
    assert lines[5] == table.splitlines()[0] and result.stderr == ""
    assert all((run / "log.txt").is_file() for run in (directory / "runs").iterdir())
    second = subprocess.run([sys.executable, "-m", "fedtune", "sweep", str(file)],
                            capture_output=True, text=True, timeout=300)
    assert second.stdout.count("(skipped: finished before)") == 4
    quiet = subprocess.run([sys.executable, "-m", "fedtune", "sweep", "--quiet", str(file)],
                           capture_output=True, text=True, timeout=300)
    assert quiet.stdout.splitlines()[0] == lines[5] and "[1/4]" not in quiet.stdout
    summary = json.loads((directory / "runs").joinpath(
        sorted(p.name for p in (directory / "runs").iterdir())[0], "summary.json").read_text())
    assert summary["status"] == "finished"


LINKED = SWEEP.replace('x = "client.lr"', 'columns = ["eval_macro_f1", "total_bytes"]').replace(
    '"client.lr" = [0.001, 0.01]', '"client.lr,client.local_steps" = [[0.001, 2], [0.01, 3]]')


def test_linked_keys_move_together_and_extra_columns_and_curves_are_written(tmp_path):
    spec = load_sweep(_write(tmp_path, LINKED))
    runs = expand(spec)
    assert [r.values for r in runs] == [
        {"client.lr": 0.001, "client.local_steps": 2, "run.seed": 0},
        {"client.lr": 0.001, "client.local_steps": 2, "run.seed": 1},
        {"client.lr": 0.01, "client.local_steps": 3, "run.seed": 0},
        {"client.lr": 0.01, "client.local_steps": 3, "run.seed": 1}]
    assert runs[2].config.client.local_steps == 3 and runs[2].config.client.lr == 0.01
    rows = run_sweep(spec, run_inprocess)
    table = write_table(spec, rows)
    steps_3 = [r for r in rows if r["client.local_steps"] == 3]
    assert table[1]["total_bytes"] == pytest.approx(np.mean([r["total_bytes"] for r in steps_3]))
    assert table[1]["eval_macro_f1"] == pytest.approx(
        np.mean([r["eval_macro_f1"] for r in steps_3]))
    assert ("| client.lr | client.local_steps | eval_accuracy (mean ± std) | per seed | runs | "
            "eval_macro_f1 | total_bytes (MB) |") in (spec.directory / "table.md").read_text()
    curves = run_curves(spec)
    assert [label for label, _ in curves][:2] == ["lr=0.001 local_steps=2 seed=0",
                                                  "lr=0.001 local_steps=2 seed=1"]
    assert all(len(metrics) == 1 for _, metrics in curves)
    plot_curves(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_linked_keys_need_one_value_per_key(tmp_path):
    text = LINKED.replace("[[0.001, 2], [0.01, 3]]", "[[0.001, 2], [0.01]]")
    with pytest.raises(ConfigError, match="must be a list of lists of 2 values"):
        load_sweep(_write(tmp_path, text))
    with pytest.raises(ConfigError, match="sweep.columns = \\['wall'\\] is not allowed"):
        load_sweep(_write(tmp_path, LINKED.replace('"total_bytes"]', '"total_bytes"]\n').replace(
            'columns = ["eval_macro_f1", "total_bytes"]', 'columns = ["wall"]')))


STRATEGY_SWEEP = SWEEP.replace('x = "client.lr"', 'rows = "strategy.name"\ncurves = "strategy.name"'
                               ).replace('"client.lr" = [0.001, 0.01]',
                                         '"strategy.name" = ["fedavg", "fedavgm"]\n'
                                         '"data.alpha" = [0.5, 5.0]'
                                         ).replace('partitioner = "iid"',
                                                   'partitioner = "dirichlet"'
                                                   ).replace("rounds = 1", "rounds = 2")


def test_wide_table_and_round_curves_with_bands(tmp_path):
    from fedtune.cli import main

    file = _write(tmp_path, STRATEGY_SWEEP)
    assert main(["sweep", str(file)]) == 0
    directory = tmp_path / "sweeps" / "tiny"
    wide = (directory / "table_wide.md").read_text().splitlines()
    assert wide[0] == "| strategy.name | alpha=0.5 | alpha=5.0 |"
    assert [line.split(" |")[0] for line in wide[2:]] == ["| fedavg", "| fedavgm"]
    assert (directory / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the band is the mean ± sample std over the seeds of each round
    spec = load_sweep(file)
    rows = [result_row(run) for run in expand(spec)]
    curves = round_curves(spec, rows)
    assert len(curves) == 4 and all(c["n"] == 2 for c in curves)
    curve = next(c for c in curves if c["strategy.name"] == "fedavgm"
                 and c["data.alpha"] == 0.5)
    runs = [r for r in rows if r["strategy.name"] == "fedavgm" and r["data.alpha"] == 0.5]
    accuracies = np.array([[float(m["eval_accuracy"]) for m in csv.DictReader(
        (Path(r["run_dir"]) / "metrics.csv").open())] for r in runs])
    np.testing.assert_allclose(curve["mean"], accuracies.mean(axis=0))
    np.testing.assert_allclose(curve["std"], accuracies.std(axis=0, ddof=1))
    assert f"{np.mean([r['eval_accuracy'] for r in runs]):.3f} ± " in wide[3]


def test_plot_options_must_name_grid_keys(tmp_path):
    with pytest.raises(ConfigError, match="sweep.curves = 'strategy.name' is not allowed: must "
                                          "be one of the grid keys 'client.lr', 'run.seed'"):
        load_sweep(_write(tmp_path, SWEEP.replace('x = "client.lr"',
                                                  'curves = "strategy.name"')))


NON_IID_STRATEGIES = {"fedavg", "fedprox", "fedavgm", "fedadam", "scaffold", "fednova", "feddyn"}


@pytest.mark.parametrize("name, dataset, dirichlet, shards", [
    ("non_iid.toml", "bbc_news", "dirichlet", 2),
    ("non_iid_rotten_tomatoes.toml", "rotten_tomatoes", "inner_dirichlet", 1)])
def test_the_non_iid_grids_are_valid_sweeps_with_fixed_hyper_parameters(name, dataset, dirichlet,
                                                                          shards):
    from tests.conftest import REPO

    spec = load_sweep(REPO / "simulations" / name)
    runs, central = expand(spec), expand_central(spec)
    assert len(runs) == 7 * 4 * 3 and len(central) == 4 * 3  # partitions x seeds
    assert {r.values["strategy.name"] for r in runs} == NON_IID_STRATEGIES
    partitions = {(r.config.data.partitioner, r.config.data.labels_per_client
                   if r.config.data.partitioner == "shards" else r.config.data.alpha)
                  for r in runs}
    assert partitions == {(dirichlet, 0.1), (dirichlet, 0.5), (dirichlet, 100.0),
                          ("shards", shards)}
    for run in runs:
        config = run.config
        assert config.data.dataset == dataset and config.client.optimizer == "sgd"
        assert (config.strategy.proximal_mu, config.strategy.server_momentum,
                config.strategy.fedopt_eta, config.strategy.feddyn_alpha) == (0.01, 0.9, 0.01,
                                                                              0.01)
    assert {r.config.engine.backend for r in central} == {"central"}


def test_the_client_drift_study_varies_local_work_under_strong_skew():
    from tests.conftest import REPO

    spec = load_sweep(REPO / "simulations" / "client_drift.toml")
    runs = expand(spec)
    assert len(runs) == 3 * 4 * 3 and len(expand_central(spec)) == 4 * 3
    work = {(r.values["local"], r.config.client.local_steps, r.config.client.local_epochs)
            for r in runs}
    assert work == {("1 step", 1, 1), ("5 steps", 5, 1), ("20 steps", 20, 1),
                    ("1 epoch", 0, 1)}
    assert {(r.config.data.partitioner, r.config.data.alpha) for r in runs} == {
        ("dirichlet", 0.1)}


@pytest.mark.slow
def test_a_tiny_non_iid_grid_runs_with_its_centralized_row(tmp_path):
    """Two of the grid's own-module strategies on the pathological split, two rounds on a
    300-example subsample: every point finishes and the table has the gap to centralized."""
    from fedtune.cli import main
    from tests.conftest import REPO

    text = (REPO / "simulations" / "non_iid.toml").read_text()
    file = tmp_path / "non_iid.toml"
    file.write_text(text.replace("[sweep]\n", f'[sweep]\noutput_dir = "{tmp_path}"\n', 1))
    assert main(["sweep", str(file), "--set", "run.rounds=2", "--set", "data.max_examples=300",
                 "--grid", 'strategy.name=["fednova", "feddyn"]', "--grid",
                 'partition=["shards-2"]', "--grid", "run.seed=[0]"]) == 0
    with (tmp_path / "non-iid-bbc" / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["strategy.name"] for r in rows] == ["centralized", "fednova", "feddyn"]
    assert all(0.0 <= float(r["eval_accuracy"]) <= 1.0 for r in rows)
    table = (tmp_path / "non-iid-bbc" / "table.md").read_text().splitlines()
    assert "gap to centralized" in table[0] and len(table) == 2 + 3


def test_the_privacy_utility_study_is_a_valid_sweep_whose_dp_plans_all_hold():
    """Every point of the study is a valid config, and every central point's σ works with
    adaptive clipping (σ < 2 x clipped-count std) at ~100 clients a round."""
    from fedtune.privacy.central_dp import CentralDP
    from tests.conftest import REPO

    spec = load_sweep(REPO / "simulations" / "privacy_utility.toml")
    runs, references = expand(spec), expand_reference(spec)
    assert len(runs) == 2 * 2 * 5 * 3 and len(references) == 2 * 3
    assert all(r.config.privacy.mode == "none" and not r.config.privacy.audit
               for r in references)
    for run in runs:
        config = run.config
        assert config.model.transfer == "frozen" and config.model.feature_cache
        assert 90 <= config.strategy.fraction_train * config.data.num_clients <= 110
        if config.privacy.mode == "central" and run.values["run.seed"] == 0:
            plan = CentralDP().plan(config)
            assert plan.details["adaptive_clipping"] and plan.sample_rate == 0.2


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
    text = markdown_table(table, ["privacy.target_epsilon"], "eval_accuracy",
                          ["epsilon_spent"])
    assert ("| privacy.target_epsilon | eval_accuracy (mean ± std) | per seed | runs | "
            "ε spent |") in text
    assert "| inf | 0.7500 ± 0.0100 | - | 3 | inf |" in text
    assert "| 1 | 0.6000 ± 0.0200 | - | 3 | 0.998 |" in text
    one = markdown_table([{"privacy.target_epsilon": 2.0, "mean": 0.7, "std": 0.0, "n": 1,
                           "values": [0.7], "epsilon_spent": 2.0}],
                         ["privacy.target_epsilon"], "eval_accuracy", ["epsilon_spent"])
    assert "| 2 | 0.7000 | 0.700 | 1 | 2 |" in one  # one run: no "± 0.0000"


CENTRAL_SWEEP = STRATEGY_SWEEP.replace('curves = "strategy.name"',
                                       'curves = "strategy.name"\n'
                                       'centralized = ["examples", "converged"]').replace(
    "[engine]", "[engine]\ncentral_max_epochs = 4\ncentral_patience = 2").replace(
    '"data.alpha" = [0.5, 5.0]', '"data.alpha" = [5.0]')


def test_centralized_rows_give_the_gap_and_a_line_in_the_curves(tmp_path):
    from fedtune.cli import main

    file = _write(tmp_path, CENTRAL_SWEEP)
    spec = load_sweep(file)
    central = expand_central(spec)  # one per kind, alpha and seed; strategies share them
    assert len(central) == 2 * 2  # kinds x seeds
    assert {r.values["strategy.name"] for r in central} == {"centralized",
                                                             "centralized (converged)"}
    assert all(r.config.engine.backend == "central" for r in central)
    assert {r.config.engine.central_max_epochs for r in central} == {4}
    assert main(["sweep", str(file)]) == 0
    rows = [result_row(run) for run in expand(spec) + central]
    table = write_table(spec, rows)

    def mean(strategy, alpha):
        return np.mean([r["eval_accuracy"] for r in rows
                        if r["strategy.name"] == strategy and r["data.alpha"] == alpha])

    fedavg = next(e for e in table if e["strategy.name"] == "fedavg" and e["data.alpha"] == 5.0)
    assert fedavg["gap_to_centralized"] == pytest.approx(mean("centralized", 5.0)
                                                         - mean("fedavg", 5.0))
    assert all(e["gap_to_centralized"] is None for e in table
               if e["strategy.name"].startswith("centralized"))
    directory = spec.directory
    assert "| gap to centralized |" in (directory / "table.md").read_text().splitlines()[0]
    wide = (directory / "table_wide.md").read_text()
    assert "| centralized (converged) |" in wide and "| centralized |" in wide
    curves = round_curves(spec, rows)
    flat = [c for c in curves if c.get("flat")]
    assert len(flat) == 1 and flat[0]["strategy.name"] == "centralized (converged)"
    assert (directory / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the federated runs' summaries have no reference of their own (run.reference is off)
    assert "centralized_accuracy" not in json.loads(
        (Path(rows[0]["run_dir"]) / "summary.json").read_text())


def test_a_grid_whose_every_key_changes_the_reference_gets_a_training_column(tmp_path):
    spec = load_sweep(_write(tmp_path, SWEEP.replace('x = "client.lr"', 'x = "client.lr"\n'
                                                     'centralized = ["examples"]')))
    central = expand_central(spec)
    assert len(central) == 4  # client.lr and the seed both change a centralized run
    assert {r.values["training"] for r in central} == {"centralized"}
    assert {r.values["training"] for r in expand(spec)} == {"federated"}
    rows = run_sweep(spec, run_inprocess_or_central)
    table = write_table(spec, rows)
    assert [(e["training"], e["client.lr"]) for e in table] == [
        ("centralized", 0.001), ("centralized", 0.01), ("federated", 0.001),
        ("federated", 0.01)]
    assert table[2]["gap_to_centralized"] == pytest.approx(table[0]["mean"] - table[2]["mean"])


def run_inprocess_or_central(config):
    from fedtune.engine.launch import launch

    return launch(config)


def test_run_reference_in_a_sweep_trains_each_reference_once(tmp_path):
    text = STRATEGY_SWEEP.replace("rounds = 2", "rounds = 2\nreference = true").replace(
        '"data.alpha" = [0.5, 5.0]', '"data.alpha" = [5.0]')
    spec = load_sweep(_write(tmp_path, text))
    assert spec.centralized == ["examples"]
    started = []

    def run_one(config):
        started.append(config.engine.backend)
        return run_inprocess_or_central(config)

    rows = run_sweep(spec, run_one)
    assert started == ["central"] * 2 + ["inprocess"] * 4  # references first, once each
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        if row["strategy.name"] == "centralized":
            continue
        reference = Path(summary["centralized"]["run_dir"])
        assert reference.parent == spec.directory / "runs"
        assert summary["centralized_accuracy"] == json.loads(
            (reference / "summary.json").read_text())["final"]["eval_accuracy"]
    selected = load_sweep(_write(tmp_path, text), selection=["strategy.name=fedavg"])
    assert [r.slug for r in expand_central(selected) if selected.selects(r)] == [
        r.slug for r in expand_central(spec)]


def test_parallel_needs_a_runtime_in_its_own_process(tmp_path):
    from fedtune.cli import main

    file = _write(tmp_path, SWEEP.replace('backend = "inprocess"', 'backend = "ray"'))
    assert main(["sweep", str(file), "--parallel", "2"]) == 2
    assert not (tmp_path / "sweeps" / "tiny" / "runs").exists()


@pytest.mark.slow
def test_parallel_sweep_gives_the_sequential_results_and_resumes(tmp_path):
    """Two child processes: the same bits as one process, one line per finished point, and
    a rerun that only does what is missing."""
    sequential = load_sweep(_write(tmp_path, SWEEP))
    expected = {r["run_dir"].split("/")[-1]: r["eval_accuracy"]
                for r in run_sweep(sequential, run_inprocess)}
    parallel_file = tmp_path / "parallel.toml"
    parallel_file.write_text(SWEEP.format(out=tmp_path / "par"))
    command = [sys.executable, "-m", "fedtune", "sweep", str(parallel_file), "--parallel", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split("]")[0] for line in result.stdout.splitlines()
            if line.startswith("[")] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    with (tmp_path / "par" / "tiny" / "results.csv").open() as handle:
        got = {row["run_dir"].split("/")[-1]: float(row["eval_accuracy"])
               for row in csv.DictReader(handle)}
    assert got == pytest.approx(expected)
    (tmp_path / "par" / "tiny" / "runs" / "lr=0.01_seed=1" / "summary.json").unlink()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("(done)") == 1 and again.stdout.count("skipped") == 3


def test_the_reference_digits_study_has_centralized_rows_for_every_partition_and_seed():
    from tests.conftest import REPO

    spec = load_sweep(REPO / "simulations" / "reference_digits.toml")
    central = expand_central(spec)
    assert len(expand(spec)) == 2 * 3 and len(central) == 2 * 2 * 3
    assert {r.config.engine.backend for r in central} == {"central"}
    assert {r.config.engine.central_until for r in central} == {"examples", "converged"}
