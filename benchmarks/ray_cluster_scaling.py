"""The Ray engine on a two-node cluster against one node with the same CPUs: what crossing
nodes costs a round, and where the driver's serial part caps adding nodes.

Both sides start a Ray cluster with ``ray start`` on 127.0.0.1 (as
``tests/integration/test_ray_cluster.py`` does) and run the same point of
``benchmarks/population_scale.py`` against it (``engine.ray_address``, ``engine.num_actors``
actors): the generated federation, a 32-16-2 MLP, one local step of batch 8, ``--cohort``
clients a round out of ``--registered``. ``one node``: a head with ``2 × --cpus-per-node``
CPUs; ``two nodes``: a head and a worker node with ``--cpus-per-node`` each, so the actors sit
one per node and every round's global model crosses from the head's object store to the
worker's. Sides alternate (A B A B); printed: median s/round and driver CPU-s/round of rounds
2.., per side, with min-max.

On one host the two nodes share its cores: this measures the cost of the second node
(object transfers, a second raylet), not the speed-up of more machines. The cap on more
machines is the driver's serial CPU per round (the ``driver CPU-s/round`` column): a round
can never take less than it, whatever the number of actors.

    python benchmarks/ray_cluster_scaling.py --pairs 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile

from population_scale import measure  # this script's folder is on sys.path

from fedtune.engine.local_ray_node import start_node, stop_node, wait_for_nodes

PORT = 26479


def side(nodes: int, cpus_per_node: int, args: argparse.Namespace) -> dict:
    """One point on a fresh cluster of ``nodes`` nodes holding ``2 × cpus_per_node`` CPUs."""
    address = f"127.0.0.1:{PORT}"
    temp_dir = tempfile.mkdtemp(prefix="fedtune-ray-", dir="/tmp")  # short: Unix sockets
    head_cpus = cpus_per_node * (2 if nodes == 1 else 1)
    started = [start_node("--head", f"--port={PORT}", "--include-dashboard=false",
                         f"--temp-dir={temp_dir}", f"--num-cpus={head_cpus}")]
    try:
        wait_for_nodes(address, 1, 180)
        if nodes == 2:
            started.append(start_node(f"--address={address}", f"--num-cpus={cpus_per_node}"))
            wait_for_nodes(address, 2, 180)
        return measure(args.registered, args.cohort, args.rounds, "ray", args.sample_s,
                       [f"engine.ray_address={address}",
                        f"engine.num_actors={2 * cpus_per_node}"])
    finally:
        for node in reversed(started):
            stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--registered", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=0.5)
    args = parser.parse_args()
    sides: dict[str, list[dict]] = {"one node": [], "two nodes": []}
    for pair in range(args.pairs):
        for name, nodes in (("one node", 1), ("two nodes", 2)):
            sides[name].append(side(nodes, args.cpus_per_node, args))
            r = sides[name][-1]
            print(f"pair {pair + 1}, {name}: {r['round_s']:.2f} s/round, driver "
                  f"{r['driver_cpu_s']:.3f} CPU-s/round", flush=True)
    print(f"\n## {args.cohort:,} of {args.registered:,} clients a round, "
          f"{2 * args.cpus_per_node} actors: medians (min-max) of {args.pairs} alternated pairs")
    print("| cluster | s/round | rounds/s | driver CPU-s/round |")
    print("|---|---|---|---|")
    for name, rows in sides.items():
        def spread(key: str, rows: list[dict] = rows) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        rate = 1 / statistics.median(r["round_s"] for r in rows)
        print(f"| {name} | {spread('round_s')} | {rate:.2f} | {spread('driver_cpu_s')} |")


if __name__ == "__main__":
    main()
