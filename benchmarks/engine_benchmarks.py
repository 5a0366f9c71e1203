"""fedtune's Ray engine against Flower's stock simulation and centralized training.

Three side-by-side measurements, each printed as a table with ratios (issue #7):

- ``rounds``: start-up and per-round time, fedtune's engine vs Flower's simulation runtime, MLP,
  100 and 1,000 clients, one local step each, all clients every round;
- ``central``: federated (FedAvg, IID, all clients every round) vs centralized training over
  the same number of samples with the same model, batch size and optimizer;
- ``rss``: peak resident memory (driver + Ray processes, summed) at 100, 1,000 and 10,000 total
  clients over the same data, 100 sampled per round.

Run: ``python benchmarks/engine_benchmarks.py [rounds|central|rss ...]`` (all by default).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

MLP = [
    "data.dataset=rotten_tomatoes", "model.kind=mlp", "model.num_features=1024",
    "model.hidden_sizes=[64]", "data.partitioner=iid", "data.max_examples=0",
    "data.local_test_fraction=0", "client.local_steps=1", "client.batch_size=8",
    "client.lr=0.01", "strategy.fraction_evaluate=0", "strategy.fraction_train=1.0",
]


def _config(out: Path, *overrides: str):
    from fedtune.config import load_config

    config = load_config(None, [*MLP, *overrides])
    config.run.dir = str(out)
    return config


def _round_times(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [float(row["wall_s"]) for row in csv.DictReader(handle)]


def _timed_run(config) -> tuple[float, list[float]]:
    """(start-up seconds, per-round seconds) of one run on its configured backend."""
    from fedtune.engine.launch import launch

    started = time.perf_counter()
    launch(config)
    total = time.perf_counter() - started
    rounds = _round_times(Path(config.run.dir))
    return total - sum(rounds), rounds


def bench_rounds(out: Path, sizes: list[int], engine_rounds: int, flower_rounds: int) -> None:
    print("\n## fedtune Ray engine vs Flower stock simulation (MLP, 1 local step)")
    print("| clients | runtime | rounds | start-up s | mean round s | ratio (Flower / fedtune) |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        results = {}
        for backend, rounds in (("ray", engine_rounds), ("flower", flower_rounds)):
            config = _config(out / f"rounds-{backend}-{n}", f"engine.backend={backend}",
                             f"data.num_clients={n}", f"run.rounds={rounds}",
                             "engine.node_wait_s=600")
            startup, times = _timed_run(config)
            # the first round also pays for lazy imports in the workers: report the rest
            steady = times[1:] or times
            results[backend] = (startup, sum(steady) / len(steady), len(times))
        for backend in ("ray", "flower"):
            startup, mean, count = results[backend]
            ratio = results["flower"][1] / results["ray"][1] if backend == "ray" else ""
            print(f"| {n} | {backend} | {count} | {startup:.1f} | {mean:.2f} | "
                  f"{f'{ratio:.1f}x' if ratio else ''} |", flush=True)


def bench_central(out: Path, clients: int, rounds: int, steps: int) -> None:
    """Same samples: rounds * clients * steps batches, federated or in one loop."""
    import numpy as np

    from fedtune.data.loaders import train_loader
    from fedtune.engine.launch import launch
    from fedtune.models.build import build_model
    from fedtune.task import limit_threads, task_resources, train_settings
    from fedtune.train import train_local

    config = _config(out / "central-fed", "engine.backend=ray", f"data.num_clients={clients}",
                     f"run.rounds={rounds}", f"client.local_steps={steps}")
    started = time.perf_counter()
    launch(config)
    federated = time.perf_counter() - started
    federated_rounds = sum(_round_times(Path(config.run.dir)))

    limit_threads(os.cpu_count() or 1)
    resources = task_resources(config)
    started = time.perf_counter()
    model = build_model(resources.spec, config.run.seed)
    rows = np.concatenate(resources.federation.client_train_rows)
    loader = train_loader(resources.encoded, resources.federation.data.labels, rows,
                          config.client.batch_size, config.run.seed)
    settings = replace(train_settings(config), local_steps=rounds * clients * steps)
    train_local(model, loader, settings, resources.device)
    centralized = time.perf_counter() - started
    batches = rounds * clients * steps
    print(f"\n## federated vs centralized ({batches} batches of {config.client.batch_size})")
    print("| setting | wall s | ratio to centralized |")
    print("|---|---|---|")
    print(f"| centralized (one loop, {os.cpu_count()} threads) | {centralized:.1f} | 1.0x |")
    print(f"| federated, rounds only ({clients} clients x {rounds} rounds x {steps} steps) | "
          f"{federated_rounds:.1f} | {federated_rounds / centralized:.1f}x |")
    print(f"| federated, with Ray start-up | {federated:.1f} | {federated / centralized:.1f}x |",
          flush=True)


def _tree_rss_kb(root: int) -> int:
    """Summed VmRSS of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def _one_rss_run(out: str, clients: int) -> None:
    from fedtune.engine.launch import launch

    launch(_config(Path(out), "engine.backend=ray", f"data.num_clients={clients}",
                   "run.rounds=2", f"strategy.fraction_train={100 / clients}"))


def bench_rss(out: Path, sizes: list[int]) -> None:
    print("\n## peak RSS, driver + Ray processes (same data, 100 clients per round, 2 rounds)")
    print("| total clients | peak RSS MiB | ratio to 100 | wall s |")
    print("|---|---|---|---|")
    base = None
    for n in sizes:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, __file__, "_rss-one", str(out / f"rss-{n}"),
                                  str(n)], stdout=subprocess.DEVNULL)
        peak = 0
        stop = threading.Event()

        def sample(pid: int = child.pid) -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss_kb(pid))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample)
        sampler.start()
        code = child.wait()
        stop.set()
        sampler.join()
        if code != 0:
            raise RuntimeError(f"the {n}-client run failed ({code})")
        base = base or peak
        print(f"| {n} | {peak / 1024:.0f} | {peak / base:.2f}x | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["rounds", "central", "rss"])
    parser.add_argument("--sizes", default="100,1000", help="client counts for 'rounds'")
    parser.add_argument("--engine-rounds", type=int, default=4)
    parser.add_argument("--flower-rounds", type=int, default=2)
    args = parser.parse_args()
    if args.which[:1] == ["_rss-one"]:
        _one_rss_run(args.which[1], int(args.which[2]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {os.cpu_count()} CPU cores, {os.uname().machine}, Python "
          f"{sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        if "rounds" in args.which:
            bench_rounds(out, [int(n) for n in args.sizes.split(",")], args.engine_rounds,
                         args.flower_rounds)
        if "central" in args.which:
            bench_central(out, clients=10, rounds=5, steps=20)
        if "rss" in args.which:
            bench_rss(out, [100, 1000, 10000])


if __name__ == "__main__":
    main()
