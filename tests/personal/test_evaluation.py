"""Personal evaluation on a real run: every registered client, every model, the distribution in
metrics.csv and summary.json equal to what personal.csv holds, the plot, and the checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtune.config import ConfigError, load_config
from fedtune.engine.inprocess import run_inprocess
from fedtune.personal.stats import distribution, share_worse, summarise
from fedtune.results.report import redraw
from tests.conftest import rows_of, tiny_config


def test_distribution_and_shares_against_a_hand_computation():
    values = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    got = distribution([*values, float("nan")])  # a client without test examples is left out
    assert got["clients"] == 10
    assert got["mean"] == pytest.approx(0.45) and got["median"] == pytest.approx(0.45)
    assert got["p10"] == pytest.approx(0.09)  # 0 + 0.9 * (0.1 - 0): numpy's linear rule
    assert got["worst"] == 0.0 and got["std"] == pytest.approx(np.std(values))
    assert share_worse({0: 0.5, 1: 0.2, 2: 0.9}, {0: 0.6, 1: 0.2, 3: 1.0}) == 0.5
    assert summarise({"global": {0: 0.3, 1: 0.5}, "personalised": {0: 0.4, 1: 0.4},
                      "local_only": {0: 0.5, 1: 0.1}})["worse_than_global"] == 0.5


@pytest.fixture(scope="module")
def ditto_run(tmp_path_factory):
    """Ditto with half the clients sampled per round, evaluated every round, local-only too."""
    tmp_path = tmp_path_factory.mktemp("ditto")
    config = tiny_config(tmp_path, "strategy.name=ditto", "strategy.fraction_train=0.5",
                         "run.personal_eval_every=1", "run.local_reference=true",
                         "data.local_val_fraction=0.2", "data.partitioner=dirichlet",
                         "data.alpha=0.3", "data.min_client_examples=20")
    return run_inprocess(config).path


def test_every_client_is_evaluated_each_round_not_only_the_sampled(ditto_run):
    rows = rows_of(ditto_run / "personal.csv")
    sampled = {(int(r["round"]), int(r["client_id"])) for r in rows_of(ditto_run / "clients.csv")}
    assert len({c for _, c in sampled if _ == 1}) == 2  # half the clients trained in round 1
    for server_round in (1, 2):
        for model in ("global", "personalised"):
            clients = {int(r["client_id"]) for r in rows
                       if int(r["round"]) == server_round and r["model"] == model}
            assert clients == {0, 1, 2, 3}
    local = [r for r in rows if r["model"] == "local_only"]
    assert {int(r["round"]) for r in local} == {2} and len(local) == 4  # at the end only
    # a client never sampled has no personal model yet: its personalised model is the global
    never = {0, 1, 2, 3} - {c for _, c in sampled}
    for client in never:
        pair = [r for r in rows if int(r["client_id"]) == client and r["round"] == "2"
                and r["model"] in ("global", "personalised")]
        assert pair[0]["accuracy"] == pair[1]["accuracy"]


def test_summary_and_metrics_hold_the_distribution_of_personal_csv(ditto_run):
    rows = [r for r in rows_of(ditto_run / "personal.csv") if r["round"] == "2"]
    by_model = {m: {int(r["client_id"]): float(r["accuracy"]) for r in rows if r["model"] == m}
                for m in ("global", "personalised", "local_only")}
    summary = json.loads((ditto_run / "summary.json").read_text())["personal"]
    assert summary["own_model"] == "personalised" and summary["round"] == 2
    for model, accuracies in by_model.items():
        values = np.array(list(accuracies.values()))
        got = summary["models"][model]
        assert got["mean"] == pytest.approx(values.mean())
        assert got["p10"] == pytest.approx(np.percentile(values, 10))
        assert got["worst"] == pytest.approx(values.min())
    mine, alone = by_model["personalised"], by_model["local_only"]
    assert summary["worse_than_local_only"] == pytest.approx(
        sum(mine[c] < alone[c] for c in mine) / 4)
    metrics = rows_of(ditto_run / "metrics.csv")
    assert [bool(r["personal_mean"]) for r in metrics] == [True, True]
    assert float(metrics[-1]["personal_mean"]) == pytest.approx(
        summary["models"]["personalised"]["mean"], abs=1e-5)
    assert float(metrics[-1]["personal_worse_than_local"]) == pytest.approx(
        summary["worse_than_local_only"])


def test_the_distribution_plot_is_written_and_redrawn(ditto_run):
    plot = ditto_run / "plots" / "personal_accuracy.png"
    assert plot.stat().st_size > 10_000
    plot.unlink()
    assert plot in redraw(ditto_run) and plot.is_file()


def test_local_only_does_not_depend_on_the_strategy(tmp_path, ditto_run):
    """Training alone never sees the federation: FedAvg's run gets the same local-only rows."""
    config = tiny_config(tmp_path, "strategy.fraction_train=0.5", "run.local_reference=true",
                         "data.local_val_fraction=0.2", "data.partitioner=dirichlet",
                         "data.alpha=0.3", "data.min_client_examples=20")
    fedavg = run_inprocess(config).path

    def alone(run):
        return [r for r in rows_of(run / "personal.csv") if r["model"] == "local_only"]

    assert alone(fedavg) == alone(ditto_run)
    summary = json.loads((fedavg / "summary.json").read_text())["personal"]
    assert summary["own_model"] == "global" and "personalised" not in summary["models"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.name=ditto", "privacy.mode=local", "privacy.noise_multiplier=1.0"],
     "strategy.name = 'ditto' is not allowed with privacy.mode = 'local'"),
    (["strategy.name=fedper", "engine.backend=central"],
     "engine.backend = 'central' is not allowed with strategy.name = 'fedper'"),
    (["run.personal_eval=true", "data.dataset=files", "data.test_path=x.csv",
      "data.label_names=[a,b]"],
     "run.personal_eval = true is not allowed with data.dataset = 'files'"),
    (["strategy.name=finetune", "strategy.finetune_part=body"],
     "strategy.finetune_part"),
    # no local test split: the personal evaluation failed after the first round (KeyError)
    (["strategy.name=fedper", "data.local_test_fraction=0"],
     "data.local_test_fraction = 0 is not allowed with strategy.name = 'fedper': must be > 0"),
    (["run.local_reference=true", "data.local_test_fraction=0"],
     "data.local_test_fraction = 0 is not allowed with run.local_reference = true"),
])
def test_bad_personalisation_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_fedper_on_the_ray_engine_gives_the_in_process_personal_csv(tmp_path, one_torch_thread):
    """Personal heads travel with the cohort to any actor and back to the driver's store: the
    Ray engine's personal.csv equals the in-process runtime's (one torch thread, as each actor
    trains)."""
    from fedtune.engine.launch import launch

    overrides = ["strategy.name=fedper", "strategy.fraction_train=0.5", "run.rounds=3",
                 "run.personal_eval_every=1", "data.num_clients=6"]
    runs = [launch(tiny_config(tmp_path / backend, f"engine.backend={backend}", *overrides,
                               *(["engine.num_actors=1"] if backend == "ray" else []))).path
            for backend in ("inprocess", "ray")]
    inprocess, ray = (rows_of(run / "personal.csv") for run in runs)
    assert len(inprocess) == 3 * 6 * 2 and inprocess == ray
    personal = [r for r in inprocess if r["model"] == "personalised" and r["round"] == "3"]
    glob = [r for r in inprocess if r["model"] == "global" and r["round"] == "3"]
    assert personal != glob  # the heads are the clients' own


def test_personal_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    from fedtune.results.run_dir import RunDirectory

    run_dir = RunDirectory(tmp_path)
    run_dir.append_personal([{"round": r, "client_id": 0, "model": "global", "accuracy": 0.5,
                              "loss": 1.0, "examples": 3} for r in (1, 2, 3)])
    run_dir.truncate_after(2)
    assert [row["round"] for row in run_dir.personal()] == ["1", "2"]


def test_the_final_screen_reads_mean_and_p10_of_every_model(ditto_run):
    from fedtune.terminal import personal_line

    summary = json.loads((ditto_run / "summary.json").read_text())
    line = personal_line(summary)
    models = summary["personal"]["models"]
    assert line.startswith("per-client accuracy (4 clients, local test splits): ")
    for label, name in (("global model", "global"), ("personalised", "personalised"),
                        ("local only", "local_only")):
        assert (f"{label} mean {models[name]['mean']:.3f} p10 {models[name]['p10']:.3f}"
                in line)
    share = summary["personal"]["worse_than_local_only"]
    assert f"{share:.0%} of clients worse than alone" in line


@pytest.mark.slow
def test_a_private_personalised_run_says_the_personal_part_is_outside_the_guarantee(tmp_path):
    """Fine-tuning trains as FedAvg does, so it runs under local DP; the fine-tuned models the
    evaluation makes are not private, and summary.json says so."""
    config = tiny_config(tmp_path, "strategy.name=finetune", "privacy.mode=local",
                         "privacy.noise_multiplier=1.0", "privacy.delta=1e-3", "run.rounds=1",
                         "strategy.finetune_steps=2")
    summary = json.loads((run_inprocess(config).path / "summary.json").read_text())
    assert "not covered by the DP guarantee" in summary["personal"]["privacy"]
    assert summary["personal"]["models"]["personalised"]["clients"] == 4


def test_ditto_under_central_dp_releases_a_noised_global_model_and_keeps_its_own(tmp_path):
    """DP-FedAvg noises the shared update; each client's personal model stays outside it."""
    config = tiny_config(tmp_path, "strategy.name=ditto", "privacy.mode=central",
                         "privacy.noise_multiplier=0.5", "privacy.delta=1e-3", "run.rounds=1",
                         "privacy.clip_norm=1.0", "privacy.adaptive_clipping=false")
    run = run_inprocess(config).path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "central" and summary["privacy"]["epsilon"] > 0
    assert "not covered by the DP guarantee" in summary["personal"]["privacy"]
    assert float(rows_of(run / "metrics.csv")[0]["noise_std"]) > 0


def test_fedper_under_secagg_sums_bodies_and_the_untouched_global_head(tmp_path):
    """SecAgg+ masks only the shared part: a FedPer client's head never enters the masked
    vector (fedtune.secagg.masking's ``kept``), so the aggregate keeps the initial head to float
    rounding (FedAvg's mean of the one unmasked reply) while the body moves, every client still
    gets its own head, and the masked replies are shorter by the heads."""
    from safetensors.numpy import load_file

    from fedtune.models.build import build_model
    from fedtune.models.weights import shared_state
    from fedtune.task import task_resources

    config = tiny_config(tmp_path, "strategy.name=fedper", "strategy.secure_aggregation=true",
                         "run.rounds=1", "client.lr=0.05")
    run = run_inprocess(config).path
    final = load_file(str(run / "model" / "model.safetensors"))
    initial = shared_state(build_model(task_resources(config).spec, config.run.seed))
    for name in ("classifier.weight", "classifier.bias"):
        np.testing.assert_allclose(final[name], initial[name], rtol=0, atol=1e-7)
    # what came up is less than four masked vectors of the whole model (64-bit ring values):
    # the heads were not in them (measured 74,640 bytes, 85,200 with the heads masked too)
    whole = sum(value.size for value in initial.values())
    assert int(rows_of(run / "metrics.csv")[0]["bytes_up"]) < 4 * whole * 8
    assert np.abs(final["body.0.weight"] - initial["body.0.weight"]).max() > 1e-3
    personal = [r for r in rows_of(run / "personal.csv") if r["model"] == "personalised"]
    assert len(personal) == 4


@pytest.mark.parametrize("name", ["fedper", "fedrep", "fedbabu"])
def test_shared_body_algorithms_refuse_a_frozen_encoder_before_any_round(name):
    """A frozen encoder's body never travels (with the feature cache it is not even built), so
    FedPer, FedRep and FedBABU would federate nothing: refused at load time, not in round 1's
    client training (a 'PooledFeatureHead has no separate encoder' failure before this)."""
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"strategy.name={name}", "model.kind=hf", "model.transfer=frozen"])
    message = str(error.value)
    assert (f"model.transfer = 'frozen' is not allowed with strategy.name = {name!r}"
            in message and "\n" not in message)
    load_config(None, [f"strategy.name={name}", "model.kind=hf", "model.transfer=lora"])
