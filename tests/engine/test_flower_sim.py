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
