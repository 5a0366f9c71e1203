"""A Flower app that does not use fedtune runs SCAFFOLD from strategies/ under `flwr run`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.integration.test_runtimes import flwr_run

APP = REPO / "simulations" / "scaffold_app"


def test_the_example_app_does_not_import_fedtune():
    for file in APP.rglob("*.py"):
        imports = [line for line in file.read_text().splitlines()
                   if line.startswith(("import ", "from "))]
        assert not [line for line in imports if "fedtune" in line], file
        assert any("strategies" in line for line in imports) or file.name != "server_app.py"


@pytest.mark.slow
def test_flwr_run_trains_with_scaffold_from_strategies(tmp_path):
    output = tmp_path / "result.json"
    result = flwr_run(APP, f"num-rounds=8 output='{output}'", tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    accuracy = {int(r): a for r, a in json.loads(output.read_text())["accuracy"].items()}
    print("SCAFFOLD example, held-out accuracy per round:", accuracy)
    assert sorted(accuracy) == list(range(9))  # round 0 (initial model) and 8 rounds
    assert accuracy[0] == pytest.approx(0.25)  # the zero model predicts one class of four
    assert accuracy[8] > 0.9
    assert json.loads(output.read_text())["control_norm"] > 0
