"""What the update-norm bounds and the robust strategies buy under the scaling attack.

MLP on digits, 10 IID clients, every client trains every round; with the attack, 2 of them
(``attack.name = "scaling"``, ``attack.fraction = 0.2``, drawn from the seed) send
``x + factor (y - x)`` instead of their model ``y``. Each condition runs in process for every
seed; the table gives the final global test accuracy (mean ± std over seeds), how many updates
the server rejected per run, and the wall time of a run. First it prints the L2 norms of the honest updates of an unattacked
run (what a ``strategy.max_update_norm`` has to be compared with).

    python benchmarks/scaling_attack.py                 # factor -10, 3 seeds
    python benchmarks/scaling_attack.py --factor=-1e6 --only fedavg,fedmedian,krum,rfa
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client import app as fedtune_client
from fedtune.config import load_config, to_run_config
from fedtune.engine.inprocess import InProcessGrid, run_inprocess
from fedtune.protocol import to_numpy
from fedtune.results.run_dir import RunDirectory
from fedtune.server.app import run_federated
from fedtune.server.loop import RunFailed

BASE = ["data.dataset=digits", "model.kind=mlp", "model.hidden_sizes=[32]",
        "data.num_clients=10", "data.partitioner=iid", "data.max_examples=0", "run.rounds=10",
        "client.lr=0.01", "client.optimizer=adamw", "client.local_steps=5",
        "client.batch_size=32", "strategy.fraction_train=1.0", "strategy.fraction_evaluate=0",
        "engine.backend=inprocess", "run.max_rounds_without_update=10"]
CONDITIONS = {
    "fedavg, no attack": ["strategy.name=fedavg", "attack.name=none"],
    "fedavg": ["strategy.name=fedavg"],
    "fedavg + update_norm_z=3": ["strategy.name=fedavg", "strategy.update_norm_z=3"],
    "fedavg + max_update_norm=1": ["strategy.name=fedavg", "strategy.max_update_norm=1"],
    "fedmedian": ["strategy.name=fedmedian"],
    "krum": ["strategy.name=krum", "strategy.num_malicious=2"],
    "rfa": ["strategy.name=rfa"],
}


def run(condition: list[str], factor: float, seed: int, folder: Path) -> dict[str, float]:
    attack = ([] if "attack.name=none" in condition else
              ["attack.name=scaling", "attack.fraction=0.2", f"attack.scale_factor={factor}"])
    config = load_config(None, [*BASE, *attack, *condition, f"run.seed={seed}"])
    config.run.dir = str(folder)
    started = time.perf_counter()
    try:
        run_inprocess(config)
    except RunFailed:  # the global model stopped moving: its accuracy is the last round's
        pass
    wall = time.perf_counter() - started
    run_dir = RunDirectory(folder)
    clients = run_dir.clients()
    return {"accuracy": float(run_dir.metrics()[-1]["eval_accuracy"]), "wall_s": wall,
            "rejected": sum(row["status"] == "rejected" for row in clients)}


def honest_update_norms(folder: Path) -> list[float]:
    """‖y - x‖ of every update of an unattacked FedAvg run (the clients' own ClientApp)."""
    norms: list[float] = []
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = fedtune_client.train(msg, context)
        sent, got = to_numpy(msg.content["arrays"]), to_numpy(reply.content["arrays"])
        norms.append(float(np.sqrt(sum(np.sum((got[k].astype(np.float64) - v) ** 2)
                                       for k, v in sent.items()))))
        return reply

    config = load_config(None, [*BASE, "strategy.name=fedavg"])
    config.run.dir = str(folder)
    run_federated(InProcessGrid(app, to_run_config(config), 10), config)
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=-10.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma-separated condition prefixes")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [w for w in args.only.split(",") if w]
    print(f"scale factor {args.factor:g}, seeds {seeds}")
    with tempfile.TemporaryDirectory() as scratch:
        norms = honest_update_norms(Path(scratch) / "norms")
        print(f"honest update norms (unattacked FedAvg, seed 0, {len(norms)} updates): "
              f"median {np.median(norms):.3f}, 10th-90th percentile "
              f"{np.percentile(norms, 10):.3f}-{np.percentile(norms, 90):.3f}, "
              f"max {max(norms):.3f}")
        print("| condition | final accuracy | updates rejected per run | wall s per run |")
        print("|---|---|---|---|")
        for name, condition in CONDITIONS.items():
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            results = [run(condition, args.factor, seed, Path(scratch) / f"{name}-{seed}")
                       for seed in seeds]
            accuracy = [r["accuracy"] for r in results]
            spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
            print(f"| {name} | {statistics.mean(accuracy):.3f} ± {spread:.3f} | "
                  f"{statistics.mean(r['rejected'] for r in results):.1f} | "
                  f"{statistics.median(r['wall_s'] for r in results):.1f} |", flush=True)


if __name__ == "__main__":
    main()
