"""summary.json: final and best metrics, per-class report, time, privacy spent."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedtune.config import Config
from fedtune.faults import FaultPlan
from fedtune.results.run_dir import RunDirectory
from fedtune.strategy_factory import strategy_hyperparameters
from fedtune.task import TaskResources
from fedtune.train import EvalResult


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, ±inf the string "inf"/"-inf"; nested
    structures are cleaned too."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"  # float("inf") reads it back
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def privacy_summary(config: Config, rows: list[dict[str, str]]) -> dict[str, Any]:
    """mode, ε spent (central: the run's; local: the largest client's), δ, accountant."""
    p = config.privacy
    if p.mode == "none":
        return {"mode": "none", "epsilon": None, "delta": None, "accountant": None}
    column = "epsilon" if p.mode == "central" else "max_client_epsilon"
    spent = [_number(r[column]) for r in rows if _number(r[column]) is not None]
    return {"mode": p.mode, "epsilon": spent[-1] if spent else 0.0, "delta": p.delta,
            "accountant": p.accountant, "target_epsilon": p.target_epsilon or None,
            "noise_multiplier": p.noise_multiplier or None}


def build_summary(config: Config, resources: TaskResources, run_dir: RunDirectory,
                  final_eval: EvalResult | None, total_s: float,
                  stop_reason: str = "") -> dict[str, Any]:
    rows = run_dir.metrics()
    federation = resources.federation
    test_labels = federation.data.labels[federation.test_rows]
    majority = float(np.bincount(test_labels).max() / len(test_labels))
    accuracies = [(_number(r["eval_accuracy"]), int(r["round"])) for r in rows]
    accuracies = [(a, r) for a, r in accuracies if a is not None]
    best_accuracy, best_round = max(accuracies) if accuracies else (None, None)
    final = rows[-1] if rows else {}
    client_sizes = [len(r) for r in federation.client_train_rows]
    summary = {
        "run_dir": str(run_dir.path),
        "status": "finished",
        "rounds_completed": len(rows),
        "dataset": {
            "name": federation.data.name,
            "labels": list(federation.data.label_names),
            "global_test_examples": len(federation.test_rows),
            "client_train_examples": int(sum(client_sizes)),
            "client_test_examples": int(sum(len(r) for r in federation.client_test_rows)),
            "num_clients": federation.num_clients,
            "majority_class_accuracy": majority,
        },
        "final": {
            "round": int(final["round"]) if final else None,
            "eval_accuracy": _number(final.get("eval_accuracy", "")),
            "eval_macro_f1": _number(final.get("eval_macro_f1", "")),
            "eval_loss": _number(final.get("eval_loss", "")),
            "train_loss": _number(final.get("train_loss", "")),
            "federated_eval_accuracy": _number(final.get("federated_eval_accuracy", "")),
        },
        "best": {"eval_accuracy": best_accuracy, "round": best_round},
        "classification_report": final_eval.report if final_eval else None,
        "total_bytes_up": int(sum(int(r["bytes_up"]) for r in rows)),
        "total_bytes_down": int(sum(int(r["bytes_down"]) for r in rows)),
        "total_time_s": total_s,
        "strategy": {"name": config.strategy.name, **strategy_hyperparameters(config)},
        "faults": FaultPlan.from_config(config).describe(),
        "privacy": privacy_summary(config, rows),
        "stop_reason": stop_reason,
    }
    return _finite(summary)
