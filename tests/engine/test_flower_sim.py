"""engine.backend = flower samples the same clients as the other runtimes, run after run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedtune.engine.inprocess import run_inprocess
from tests.conftest import rows_of, tiny_config

SAMPLED = ["strategy.fraction_train=0.5", "strategy.fraction_evaluate=0.5", "run.rounds=3"]


def _who_trained(run_dir):
    return [(r["round"], r["client_id"], r["status"], r["examples_trained"])
            for r in rows_of(run_dir / "clients.csv")]


@pytest.mark.slow
def test_flower_runtime_samples_the_clients_the_inprocess_runtime_samples(tmp_path):
    """Flower's SuperNodes get random node ids each run; seen in partition order, the seeded
    sampling picks the same partitions as in process (so the same in every flower run)."""
    from fedtune.engine.flower_sim import run_flower

    flower = run_flower(tiny_config(tmp_path, *SAMPLED, "engine.backend=flower",
                                    "run.dir=" + str(tmp_path / "flower"))).path
    local = run_inprocess(tiny_config(tmp_path, *SAMPLED,
                                      "run.dir=" + str(tmp_path / "local"))).path
    assert _who_trained(flower) == _who_trained(local)
    assert len({client for _, client, _, _ in _who_trained(local)}) > 2  # sampling varied
    ours, theirs = (load_file(str(p / "model/model.safetensors")) for p in (local, flower))
    for name, value in ours.items():
        np.testing.assert_allclose(theirs[name], value, rtol=1e-5, atol=1e-6)
    runtime = json.loads((flower / "summary.json").read_text())["runtime"]
    assert runtime == {"backend": "flower", "reproducible": True}


@pytest.mark.slow
def test_fedper_on_flowers_simulation_gives_the_in_process_personal_csv(tmp_path,
                                                                       one_torch_thread):
    """On Flower's simulation each client's head lives in its node's Context and the client
    evaluates its own models when asked (global, personalised with its head, and trained alone
    at the end): personal.csv equals the in-process runtime's, whose driver evaluates every
    client over its state store (its clients one at a time, as Flower's: trained together
    they agree to float rounding, not bit for bit, ``tests/engine/test_vectorised.py``)."""
    from fedtune.engine.flower_sim import run_flower

    over = ["strategy.name=fedper", "strategy.fraction_train=0.5", "run.personal_eval_every=1",
            "run.local_reference=true", "data.local_val_fraction=0.2"]
    flower = run_flower(tiny_config(tmp_path, *over, "engine.backend=flower",
                                    "run.dir=" + str(tmp_path / "flower"))).path
    local = run_inprocess(tiny_config(tmp_path, *over, "engine.vectorise_clients=false",
                                      "run.dir=" + str(tmp_path / "local"))).path
    ours, theirs = (rows_of(run / "personal.csv") for run in (flower, local))
    assert len(ours) == 2 * 4 * 2 + 4 and ours == theirs
    last = {(r["client_id"], r["model"]): r["accuracy"] for r in ours if r["round"] == "2"}
    assert any(last[c, "personalised"] != last[c, "global"] for c in "0123")  # own heads
    summary = json.loads((flower / "summary.json").read_text())["personal"]
    assert summary["models"]["personalised"]["clients"] == 4 and summary["local_only"]
