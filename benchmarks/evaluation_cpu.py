"""CPU of evaluations on two source trees, alternated (A B A B ...): the server's global test
set and every client's local test split, on the engine benchmark's MLP (1,000 clients, 20 % of
each client's examples held out as its test split).

Each side is a child process with ``PYTHONPATH`` set to one tree that times, on one thread,
10 evaluations of the global test set and one evaluation of each of the 1,000 clients (what
a federated evaluation of every client, or a personal evaluation of one model, computes).
Prints the load average before and after and, per tree, the medians with their min-max.

    python benchmarks/evaluation_cpu.py /work/main . --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_benchmarks import load_average

CLIENTS = 1000
SERVER_EVALUATIONS = 10

PROBE = f"""
import json, sys, time
import torch
sys.path.insert(0, {str(HERE)!r})
from engine_benchmarks import MLP
from fedtune.config import load_config
from fedtune.task import task_resources
from fedtune.train import evaluate
torch.set_num_threads(1)
config = load_config(None, [*MLP, "data.num_clients={CLIENTS}", "data.local_test_fraction=0.2"])
resources = task_resources(config)
model = resources.model
cpu = time.process_time()
for _ in range({SERVER_EVALUATIONS}):
    evaluate(model, resources.global_test_loader(), resources.device)
server_ms = (time.process_time() - cpu) / {SERVER_EVALUATIONS} * 1e3
cpu = time.process_time()
for client in range({CLIENTS}):
    evaluate(model, resources.client_test_loader(client), resources.device)
print(json.dumps({{"server_ms": server_ms, "clients_s": time.process_time() - cpu}}))
"""


def _probe(tree: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tree, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="source tree A (its fedtune is imported)")
    parser.add_argument("after", type=Path, help="source tree B")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"load average at start: {load_average()}")
    results: dict[Path, list[dict[str, float]]] = {args.before: [], args.after: []}
    for _ in range(args.repeats):
        for tree, runs in results.items():
            runs.append(_probe(tree.resolve()))
    print(f"load average at end: {load_average()}")
    print("| tree | server evaluation CPU-ms (min-max) | 1,000 client evaluations CPU-s (min-max) |")
    print("|---|---|---|")
    for tree, runs in results.items():
        cells = []
        for key, digits in (("server_ms", 2), ("clients_s", 3)):
            values = [run[key] for run in runs]
            cells.append(f"{statistics.median(values):.{digits}f} "
                         f"({min(values):.{digits}f}-{max(values):.{digits}f})")
        print(f"| {tree} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
