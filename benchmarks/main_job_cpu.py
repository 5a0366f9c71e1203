"""The main job's process-tree CPU against a plain loop doing the same steps and evaluations.

Side A is ``fedtune run`` (README's main job: ``simulations/quickstart.toml``, MiniLM fully
fine-tuned, 2 clients a round, 3 rounds) as a fresh process; its CPU is the whole process tree
(Ray's processes and workers included, whoever their parent is): every process of the run's
session is sampled every ``--sample-s`` and its last user + system seconds are summed, which
counts processes that died between samples up to their last sample; the larger of that and
``RUSAGE_CHILDREN`` (the descendants that were waited for) is reported. Peak memory is the
largest sampled sum of the tree's PSS.

Side B is a plain loop in a fresh process of this script (``--plain``): the same data,
encoding and model (``fedtune.task.task_resources``), the same clients in the same rounds (read
from side A's clients.csv), each seeded as fedtune seeds a client and trained with
``fedtune.train.train_local`` (the same local steps, optimizer and thread count), a weighted
mean of the updates in float64, the server's evaluation on the global test set and as many
clients' local evaluations as fedtune's evaluate phase holds - no Flower, no Ray, no
screening, no run directory - in a process set up as ``fedtune run`` sets up its own
(``fedtune.own_process``). The same final accuracy says the same work was done.

Sides alternate (A B A B ...); medians. Run it on a quiet machine (it takes ~2 × 2 min a
pair on 2 cores):

    python benchmarks/main_job_cpu.py --pairs 3
    python benchmarks/main_job_cpu.py --pairs 3 --set engine.num_actors=2   # on two actors

The goal (issue 30): fedtune's CPU ≤ 1.3× the plain loop's. ``--small`` checks that the
script works in seconds (the MLP on digits, same shape: 8 clients, 2 a round, 3 rounds).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "simulations" / "quickstart.toml"
SMALL = ["data.dataset=digits", "model.kind=mlp", "model.hidden_sizes=[32]",
         "data.partitioner=iid", "data.max_examples=0", "client.local_steps=8"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(command: list[str], sample_s: float) -> dict[str, float]:
    """Wall seconds, process-tree CPU seconds and peak tree PSS (MiB) of ``command``, which runs
    in its own session (Ray's daemons keep it, whoever adopts them)."""
    before = _children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    session = os.getsid(process.pid)
    cpu_by_pid: dict[tuple[int, float], float] = {}
    kind_of: dict[tuple[int, float], str] = {}  # the driver, Ray's workers, Ray's daemons
    peak_pss = 0
    while process.poll() is None:
        pss = 0
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) != session:
                    continue
                with proc.oneshot():
                    times = proc.cpu_times()
                    key = proc.pid, proc.create_time()
                    cpu_by_pid[key] = times.user + times.system
                    kind_of[key] = _kind(proc, process.pid)  # a worker's title comes later
                    pss += proc.memory_full_info().pss
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        peak_pss = max(peak_pss, pss)
        time.sleep(sample_s)
    wall = time.perf_counter() - started
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    cpu = max(sum(cpu_by_pid.values()), _children_cpu() - before)
    by_kind = {kind: sum(v for k, v in cpu_by_pid.items() if kind_of[k] == kind)
               for kind in ("driver", "workers", "ray")}
    return {"wall_s": wall, "cpu_s": cpu, "peak_mib": peak_pss / 2**20, **by_kind}


def _kind(proc: psutil.Process, driver: int) -> str:
    """``driver`` (the command), ``workers`` (Ray's worker processes: the actors, idle ones)
    or ``ray`` (Ray's daemons: GCS, raylet, agents, log monitor)."""
    if proc.pid == driver:
        return "driver"
    command = proc.cmdline()
    title = command[0] if command else ""
    if title.startswith("ray::"):  # Ray's title: ray::<actor class>, ray::IDLE, or an agent
        return "ray" if title.endswith("Agent") else "workers"
    return "workers" if any(part.endswith("default_worker.py") for part in command) else "ray"


def fedtune_side(out: Path, sets: list[str], sample_s: float) -> dict[str, float]:
    command = [sys.executable, "-m", "fedtune", "run", str(QUICKSTART), "--quiet",
               "--output", str(out)]
    for override in sets:
        command += ["--set", override]
    result = measured(command, sample_s)
    summary = json.loads((out / "summary.json").read_text())
    result["accuracy"] = summary["final"]["eval_accuracy"]
    return result


def plain_side(fedtune_run: Path, out: Path, sample_s: float) -> dict[str, float]:
    result = measured([sys.executable, __file__, "--plain", str(fedtune_run), "--result",
                       str(out)], sample_s)
    result["accuracy"] = json.loads(out.read_text())["accuracy"]
    return result


def plain_loop(fedtune_run: Path, result_file: Path) -> None:
    """The same training and evaluations as ``fedtune_run`` in one plain loop (side B), with
    the settings ``fedtune run`` gives its own process (``fedtune.own_process``: the collector
    paused while importing, glibc's allocator thresholds), as a careful user's loop would."""
    from fedtune.own_process import imports_outside_collection, keep_freed_memory

    keep_freed_memory()
    with imports_outside_collection(owns_process=True):
        import numpy as np

        from fedtune.config import load_config
        from fedtune.engine.shape import largest_cohort
        from fedtune.models.weights import load_shared_state, shared_state
        from fedtune.task import client_round_seed, limit_threads, seed_torch, task_resources
        from fedtune.train import evaluate, train_local

    config = load_config(str(fedtune_run / "config.toml"))
    limit_threads(config.engine.client_cpus)
    with (fedtune_run / "clients.csv").open(newline="") as handle:
        trained = [(int(r["round"]), int(r["client_id"])) for r in csv.DictReader(handle)]
    resources = task_resources(config)
    model = resources.model
    global_state = shared_state(model)
    evaluated = min(largest_cohort(config), config.data.num_clients)
    if not (config.strategy.fraction_evaluate > 0 and config.data.local_test_fraction > 0):
        evaluated = 0
    choose = random.Random(config.run.seed)
    accuracy = float("nan")
    for server_round in range(1, config.run.rounds + 1):
        total: dict[str, np.ndarray] = {}
        weight = 0.0
        for client in [c for r, c in trained if r == server_round]:
            load_shared_state(model, global_state)
            seed = client_round_seed(config.run.seed, server_round, client)
            seed_torch(seed)
            train_local(model, resources.client_train_loader(client, seed),
                        resources.train_settings, resources.device,
                        optimizer=resources.local_optimizer())
            examples = float(len(resources.federation.client_train_rows[client]))
            for name, value in shared_state(model, copy=False).items():
                total[name] = total.get(name, 0.0) + examples * value.astype(np.float64)
            weight += examples
        global_state = {name: (value / weight).astype(global_state[name].dtype)
                        for name, value in total.items()}
        load_shared_state(model, global_state)
        accuracy = evaluate(model, resources.global_test_loader(), resources.device).accuracy
        for client in choose.sample(range(config.data.num_clients), evaluated):
            evaluate(model, resources.client_test_loader(client), resources.device)
    result_file.write_text(json.dumps({"accuracy": accuracy}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="an override for fedtune's side (repeatable)")
    parser.add_argument("--small", action="store_true",
                        help="the MLP on digits in the main job's shape: checks the script")
    parser.add_argument("--sample-s", type=float, default=0.2)
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_loop(args.plain, args.result)
        return
    sets = (SMALL if args.small else []) + args.sets
    sides: dict[str, list[dict[str, float]]] = {"fedtune run": [], "plain loop": []}
    with tempfile.TemporaryDirectory() as folder:
        for pair in range(args.pairs):
            run = Path(folder) / f"run{pair}"
            sides["fedtune run"].append(fedtune_side(run, sets, args.sample_s))
            sides["plain loop"].append(plain_side(run, Path(folder) / f"plain{pair}.json",
                                                  args.sample_s))
            print(f"pair {pair + 1}: " + "; ".join(
                f"{name} {rows[-1]['wall_s']:.1f} s, {rows[-1]['cpu_s']:.1f} CPU-s, "
                f"{rows[-1]['peak_mib']:.0f} MiB, accuracy {rows[-1]['accuracy']:.4f}"
                for name, rows in sides.items())
                + " (fedtune's CPU-s: driver {driver:.1f}, Ray workers {workers:.1f}, Ray "
                  "daemons {ray:.1f})".format(**sides["fedtune run"][-1]), flush=True)
    print(f"\n## main job{' (--small)' if args.small else ''}: medians of {args.pairs} "
          f"alternated pairs; overrides {sets or 'none'}")
    print("| side | wall s (min-max) | process-tree CPU-s (min-max) | peak PSS MiB | "
          "accuracy | CPU ratio |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r["cpu_s"] for r in sides["plain loop"])
    for name, rows in sides.items():
        def spread(key: str, rows=rows) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        cpu = statistics.median(r["cpu_s"] for r in rows)
        print(f"| {name} | {spread('wall_s')} | {spread('cpu_s')} | "
              f"{statistics.median(r['peak_mib'] for r in rows):.0f} | "
              f"{rows[-1]['accuracy']:.4f} | {cpu / base:.2f}x |")


if __name__ == "__main__":
    main()
