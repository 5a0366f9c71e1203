"""Populations of up to a million registered clients: what the driver pays per registered client.

Each point is a fresh process (``--point``) that runs ``fedtune.run`` on the generated
federation (``data.dataset = "generated"``: 20,000 synthetic examples replicated over any
number of clients, ``data.client_examples`` = 8 each), a small MLP (32-16-2), one local step of
batch 8, no federated evaluation, ``--rounds`` rounds of ``cohort`` clients out of
``registered``. This script samples the point's process tree (the driver and, on the Ray
engine, its actors and Ray's processes) for PSS every ``--sample-s``. Printed per point:

- start-up s: from the process's start to the end of round 1 minus round 1's own time
  (imports, data, the federation's partitions.csv, Ray and its actors);
- s/round: median ``wall_s`` of rounds 2..;
- driver CPU-s/round: the driver process's ``time.process_time`` over rounds 2.., per round
  (sampling, messages, the cohort's bookkeeping, summing, evaluation);
- driver PSS peak; at the end, its growth per additional registered client between the
  smallest and the largest population of a cohort: the bookkeeping the issue bounds by 100
  bytes (a peak minus the PSS at the start would count the imports and Ray's client, which
  fedtune loads lazily);
- tree PSS peak (every process of the point's session);
- with a stateful strategy (``--set strategy.name=scaffold``), the client state store's files
  on disk at the end.

    python benchmarks/population_scale.py --registered 10000,100000,1000000 \
        --cohorts 1000,10000 --rounds 4                       # the full table (quiet machine)
    python benchmarks/population_scale.py --registered 10000,100000 --cohorts 1000 \
        --rounds 3 --backend inprocess                        # a small check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

OVERRIDES = ["data.dataset=generated", "data.partitioner=iid", "data.max_examples=0",
             "data.client_examples=8", "data.local_test_fraction=0", "model.kind=mlp",
             "model.hidden_sizes=[16]", "client.local_steps=1", "client.batch_size=8",
             "client.lr=0.05", "strategy.fraction_evaluate=0", "run.save_best=false"]


def point(registered: int, cohort: int, rounds: int, backend: str, out: Path,
          extra: list[str]) -> dict:
    """One run in this process; what it measured."""
    import fedtune
    from fedtune.server.callbacks import Callback, RoundEnd

    cpu_at: dict[int, float] = {}

    class DriverCpu(Callback):
        def on_round_end(self, info: RoundEnd) -> str | None:
            cpu_at[info.round] = time.process_time()
            return None

    overrides = [*OVERRIDES, f"data.num_clients={registered}",
                 f"strategy.fraction_train={cohort / registered!r}",
                 f"engine.backend={backend}", f"run.rounds={rounds}", *extra]
    fedtune.run(None, overrides, out, progress=False, callbacks=[DriverCpu()])
    walls = [float(row["wall_s"]) for row in _rows(out / "metrics.csv")]
    clients = _rows(out / "clients.csv")
    return {
        "start_s": time.perf_counter() - STARTED - sum(walls),
        "round_s": statistics.median(walls[1:]) if len(walls) > 1 else walls[0],
        "driver_cpu_s": (cpu_at[rounds] - cpu_at[1]) / max(rounds - 1, 1),
        "peak_pss": psutil.Process().memory_full_info().pss,  # updated by the sampler below
        "clients_ok": sum(r["status"] == "ok" for r in clients) / rounds,
        # the client state store's files (a stateful strategy's per-client state on disk)
        "state_disk": sum(f.stat().st_size for f in out.rglob("client_states/**/*")
                          if f.is_file()),
    }


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def measure(registered: int, cohort: int, rounds: int, backend: str, sample_s: float,
            extra: list[str]) -> dict:
    """Run a point in a fresh process and sample its tree's (and its driver's) PSS."""
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--point", f"{registered},{cohort}",
                   "--rounds", str(rounds), "--backend", backend, "--run-dir",
                   str(Path(folder) / "run"), "--result", str(result_file),
                   *(f"--set={override}" for override in extra)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        session = os.getsid(process.pid)
        driver_peak = tree_peak = 0
        while process.poll() is None:
            tree = 0
            for proc in psutil.process_iter(["pid"]):
                try:
                    if os.getsid(proc.pid) != session:
                        continue
                    pss = proc.memory_full_info().pss
                except (psutil.Error, ProcessLookupError, PermissionError):
                    continue
                tree += pss
                if proc.pid == process.pid:
                    driver_peak = max(driver_peak, pss)
            tree_peak = max(tree_peak, tree)
            time.sleep(sample_s)
        stderr = process.stderr.read()
        if process.returncode != 0:
            raise SystemExit(f"point {registered},{cohort} failed:\n{stderr[-3000:]}")
        result = json.loads(result_file.read_text())
    result["driver_peak"] = max(driver_peak, result["peak_pss"])
    result["tree_peak"] = tree_peak
    return result


STARTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registered", default="10000,100000,1000000")
    parser.add_argument("--cohorts", default="1000,10000")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--backend", default="ray", choices=("ray", "inprocess"))
    parser.add_argument("--sample-s", type=float, default=0.2)
    parser.add_argument("--set", action="append", default=[], dest="extra",
                        help="another config override (e.g. strategy.name=scaffold)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        registered, cohort = map(int, args.point.split(","))
        result = point(registered, cohort, args.rounds, args.backend, args.run_dir,
                       args.extra)
        args.result.write_text(json.dumps(result))
        return
    print(f"## generated federation, MLP 32-16-2, 1 local step of batch 8, engine.backend = "
          f"{args.backend}{''.join(', ' + o for o in args.extra)}: medians over rounds "
          f"2..{args.rounds}")
    print("| registered | cohort | start-up s | s/round | driver CPU-s/round | driver PSS peak "
          "MiB | tree PSS peak MiB |")
    print("|---|---|---|---|---|---|---|")
    peaks: dict[int, dict[int, float]] = {}
    for registered in map(int, args.registered.split(",")):
        for cohort in map(int, args.cohorts.split(",")):
            if cohort > registered:
                continue
            r = measure(registered, cohort, args.rounds, args.backend, args.sample_s,
                        args.extra)
            peaks.setdefault(cohort, {})[registered] = r["driver_peak"]
            print(f"| {registered:,} | {cohort:,} | {r['start_s']:.1f} | {r['round_s']:.2f} | "
                  f"{r['driver_cpu_s']:.2f} | {r['driver_peak'] / 2**20:.0f} | "
                  f"{r['tree_peak'] / 2**20:.0f} |", flush=True)
            if r["state_disk"]:
                print(f"  (client states on disk at the end: {r['state_disk'] / 2**20:.1f} "
                      "MiB)", flush=True)
    print("\ndriver PSS per additional registered client (the bookkeeping; goal <= 100 bytes):")
    for cohort, by_size in peaks.items():
        if len(by_size) > 1:
            low, high = min(by_size), max(by_size)
            extra = (by_size[high] - by_size[low]) / (high - low)
            print(f"  cohort {cohort:,}: {low:,} -> {high:,} registered: {extra:.0f} bytes")


if __name__ == "__main__":
    main()
