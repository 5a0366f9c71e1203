"""ServerApp: Flower's own round loop (``Strategy.start``) with SCAFFOLD from strategies/.

With ``output`` set in the run config, writes the server-side test accuracy per round and the
norm of the server control variate to that JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from scaffold_app.task import accuracy, held_out_data, initial_model, loss_and_gradient
from strategies import Scaffold

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    num_nodes = len(list(grid.get_node_ids()))
    strategy = Scaffold(server_lr=float(config["server-lr"]), fraction_train=1.0,
                        fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                        min_available_nodes=max(num_nodes, 1))
    features, labels = held_out_data()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = {name: array.numpy() for name, array in arrays.items()}
        loss, _ = loss_and_gradient(model, features, labels)
        return MetricRecord({"accuracy": accuracy(model, features, labels), "loss": loss})

    initial = ArrayRecord({name: Array(value) for name, value in initial_model().items()})
    result = strategy.start(grid, initial, num_rounds=int(config["num-rounds"]),
                            evaluate_fn=evaluate)
    if config["output"]:
        control = strategy.control or {}
        Path(str(config["output"])).write_text(json.dumps({
            "accuracy": {r: m["accuracy"] for r, m in
                         result.evaluate_metrics_serverapp.items()},
            "client_accuracy": {r: m["accuracy"] for r, m in
                                result.evaluate_metrics_clientapp.items()},
            "control_norm": float(np.sqrt(sum(np.sum(v ** 2) for v in control.values()))),
        }))
