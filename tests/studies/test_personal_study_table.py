"""scripts/personal_study_table.py: every run is compared with the FedAvg run of its seed and
cell (local-only and the centralized reference live there only), paired by seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.personal_study_table import markdown, per_run_rows, run_results


def _run(sweep: Path, name: str, seed: int, alpha: float, accuracies: dict[str, list[float]],
         centralized: float | None = None) -> None:
    run = sweep / "runs" / f"seed={seed}_alpha={alpha}_algorithm={name}"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f'[run]\nseed = {seed}\n[data]\npartitioner = "dirichlet"\nalpha = {alpha}\n')
    summary = {"final": {"eval_accuracy": 0.5}, "centralized_accuracy": centralized}
    (run / "summary.json").write_text(json.dumps(summary))
    lines = ["round,client_id,model,accuracy,loss,examples"]
    for model, values in accuracies.items():
        lines += [f"20,{client},{model},{value},0.1,10" for client, value in enumerate(values)]
    lines.append("20,9,global,,,0")  # a client with an empty local test split is left out
    (run / "personal.csv").write_text("\n".join(lines) + "\n")


def test_rows_compare_each_run_with_the_fedavg_run_of_its_seed(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.2)):
        _run(tmp_path, "fedavg", seed, 0.1,
             {"global": [0.5 + shift, 0.7 + shift], "local_only": [0.6 + shift, 0.6 + shift]},
             centralized=0.9)
        _run(tmp_path, "ditto", seed, 0.1, {"global": [0.0, 0.0],
                                            "personalised": [0.7 + shift, 0.7 + shift]})
    rows = {(r["algorithm"], r["seed"]): r for r in per_run_rows(run_results(tmp_path))}
    assert rows[("ditto", 0)]["mean"] == pytest.approx(0.7)  # its own model, not the global
    assert rows[("ditto", 0)]["worse"] == 0.0 and rows[("fedavg", 0)]["worse"] == 0.5
    assert rows[("local only", 1)]["mean"] == pytest.approx(0.8)
    assert rows[("centralized", 0)]["mean"] == 0.9 and rows[("fedavg", 0)]["clients"] == 2
    table = markdown(per_run_rows(run_results(tmp_path)))
    ditto = next(line for line in table.splitlines() if line.startswith("| Ditto"))
    # means 0.7 and 0.9 (std 0.141); paired gain over FedAvg +0.1 in both seeds (std 0)
    assert ditto.split(" | ")[1:4] == ["0.800 ± 0.141", "+0.100 ± 0.000", "0.800 ± 0.141"]
