"""summary.json: final and best metrics, per-class report, time, privacy spent."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedtune.attacks.plan import AttackPlan
from fedtune.config import Config
from fedtune.faults import FaultPlan
from fedtune.results.run_dir import RunDirectory, json_safe
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.task import TaskResources
from fedtune.train import TEST_COLUMNS, EvalResult

PERSONAL_FINAL = ("personal_mean", "personal_p10", "personal_worst")


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def majority_class_accuracy(resources: TaskResources) -> float:
    """The global test accuracy of always predicting the most frequent test label."""
    federation = resources.federation
    test_labels = federation.data.labels[federation.test_rows]
    return float(np.bincount(test_labels).max() / len(test_labels))


def run_title(config: Config) -> str:
    """A figure's title: the run's name, data, clients, strategy and privacy setting."""
    return (f"{config.run.name}: {config.data.dataset}, {config.data.num_clients} clients "
            f"({config.data.partitioner}), {config.model.kind}/{config.model.transfer}, "
            f"{config.strategy.name}, {privacy_setting(config)}")


def privacy_setting(config: Config) -> str:
    """The privacy setting in words: "no DP", "central DP, ε ≤ 2 at δ = 1e-05", "local DP,
    σ = 1.1 at δ = 1e-05"."""
    p = config.privacy
    if not PRIVACY_MODES[p.mode].mechanism:
        return "no DP"
    budget = (f"ε ≤ {p.target_epsilon:g}" if p.target_epsilon
              else f"σ = {p.noise_multiplier:g}")
    return f"{p.mode} DP, {budget} at δ = {p.delta:g}"


def _backdoor(final: dict[str, str]) -> dict[str, float]:
    """A backdoored run's final attack success rate (nothing for other runs)."""
    rate = _number(final.get("attack_success_rate", ""))
    return {} if rate is None else {"attack_success_rate": rate}


def _filtered_means(rows: list[dict[str, str]]) -> dict[str, float]:
    """An attacked run's shares of filtered updates, averaged over the rounds that had any."""
    means = {}
    for column in ("malicious_filtered", "benign_filtered"):
        values = [v for r in rows if (v := _number(r.get(column, ""))) is not None]
        if values:
            means[column] = sum(values) / len(values)
    return means


def final_tested(row: dict[str, str], final_eval: EvalResult | None) -> dict[str, float | None]:
    """The kept model's global test metrics: its metrics.csv row's, or, where that row has none
    (an asynchronous run with ``strategy.eval_every`` > 1 that stopped early between
    evaluations), ``final_eval``: the evaluation the run made of its final model."""
    tested = {name: _number(row.get(name, "")) for name in TEST_COLUMNS}
    if tested["eval_loss"] is None and final_eval is not None:
        return final_eval.test_columns()
    return tested


def build_summary(config: Config, resources: TaskResources, run_dir: RunDirectory,
                  final_eval: EvalResult, total_s: float, stop_reason: str,
                  final_round: int | None = None, **sections: Any) -> dict[str, Any]:
    """summary.json: final and best metrics, the dataset, bytes, time, faults and the given
    ``sections`` (the strategy, privacy and runtime parts the server knows). ``final`` is the
    metrics.csv row of ``final_round`` (default: the last row), the model that was kept."""
    rows = run_dir.metrics()
    federation = resources.federation
    majority = majority_class_accuracy(resources)
    accuracies = [(_number(r["eval_accuracy"]), int(r["round"])) for r in rows]
    accuracies = [(a, r) for a, r in accuracies if a is not None]
    best_accuracy, best_round = max(accuracies) if accuracies else (None, None)
    final = rows[-1] if rows else {}
    if final_round is not None:
        final = next(r for r in rows if int(r["round"]) == final_round)
    client_sizes = federation.train_sizes
    summary = {
        "run_dir": str(run_dir.path),
        "status": "finished",
        "rounds_completed": len(rows),
        "dataset": {
            "name": federation.data.name,
            "labels": list(federation.data.label_names),
            "global_test_examples": len(federation.test_rows),
            "client_train_examples": int(client_sizes.sum()),
            "client_test_examples": int(federation.test_sizes.sum()),
            "num_clients": federation.num_clients,
            "majority_class_accuracy": majority,
        },
        "final": {
            "round": int(final["round"]) if final else None,
            **final_tested(final, final_eval if final_round is None else None),
            "train_loss": _number(final.get("train_loss", "")),
            "federated_eval_accuracy": _number(final.get("federated_eval_accuracy", "")),
            **_backdoor(final),
            # personal evaluation: each client's own model on its local test split
            **{key: _number(final[key]) for key in PERSONAL_FINAL if final.get(key)},
        },
        "best": {"eval_accuracy": best_accuracy, "round": best_round},
        "classification_report": final_eval.classification_report(federation.data.label_names),
        "total_bytes_up": int(sum(int(r["bytes_up"]) for r in rows)),
        "total_bytes_down": int(sum(int(r["bytes_down"]) for r in rows)),
        "total_time_s": total_s,
        "faults": FaultPlan.from_config(config).describe(),
        "attack": {**AttackPlan.from_config(config).describe(), **_filtered_means(rows)},
        **sections,
        "stop_reason": stop_reason,
    }
    return json_safe(summary)
