"""Where a steady round goes: py-spy (a sampling profiler) on fedtune's driver and Ray actors.

Starts ``fedtune run`` on the engine benchmark's workload (``engine_benchmarks.MLP``), waits
until its first rounds are done (start-up and warm-up are not profiled), attaches py-spy to the
driver and every Python process under it for ``--seconds``, and prints where the sampled CPU
went, by process and by what the code was doing. py-spy samples Python threads only (Ray's
C++ raylet and GCS are not in the table; their CPU is in the process tree's total, printed
beside it). The raw stacks are kept with ``--raw FILE`` (flamegraph.pl and speedscope read
them).

    python benchmarks/profile_round.py --clients 1000 --backend ray
    python benchmarks/profile_round.py --clients 1000 --backend inprocess

Needs ``pip install -e '.[bench]'`` (py-spy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_benchmarks import MLP, tree_cpu_s  # noqa: E402

from fedtune.results.run_dir import read_csv  # noqa: E402

# what a stack was doing: the first of these functions found from the leaf up names it
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("client: forward", ("logits_of ",)),
    ("client: backward", ("Tensor.backward ",)),
    ("client: optimizer step", ("Optimizer.profile_hook_step.",)),
    ("client: optimizer reset", ("reset_optimizer ",)),
    ("client: batch (shuffle, gather rows)", ("local_batches ",)),
    ("client: weights in (load global model)", ("load_shared_state ",)),
    ("client: weights out (views of the update)", ("shared_state ",)),
    ("client: seeding", ("client_round_seed ", "seed_torch ")),
    ("client: local evaluation", ("evaluate_client ",)),
    ("cohort: screening the update", ("_screen_update ", "_screen_evaluation ")),
    ("cohort: adding the update to the block sum", ("accumulate ",)),
    ("clients together: vmapped forward and backward", ("_train_group.<locals>.loss ",
                                                        "_autograd_grad ")),
    ("clients together: stacking batches", ("_stack_step ",)),
    ("clients together: rest (stacked optimizer step, copies)", ("_train_group ",
                                                                 "_train_chunk ")),
    ("client: rest of train_client", ("train_client ",)),
    ("cohort: rest of run_block", ("run_block ",)),
    ("actor: Ray call (receive tasks, decode records, return results)", ("run_blocks ",)),
    ("server: evaluation of the global model", ("evaluate_global ", "server_evaluate")),
    ("server: aggregation and the strategy", ("aggregate_train", "Strategy.", "aggregate_")),
    ("server: writing results", ("RoundWriter", "write_row", "ProgressListener")),
    ("driver: dispatch and collect (Ray client calls)", ("RayGrid._pump", "RayGrid._dispatch",
                                                         "RayGrid._collect", "RayGrid._call")),
    ("driver: rest of the round", ("play_round ",)),
]


def categorise(frames: list[str]) -> str:
    for name, markers in CATEGORIES:  # the server's work first (its evaluation runs a forward)
        if name.startswith("server:") and any(m in f for f in frames for m in markers):
            return name
    for frame in reversed(frames):  # then leaf first: the innermost named activity wins
        for name, markers in CATEGORIES:
            if any(marker in frame for marker in markers):
                return name
    return "other (Ray's Python threads, imports, idle loops)"


def read_stacks(path: Path) -> tuple[Counter, Counter]:
    """(samples by process, samples by (process kind, category)) from py-spy's raw output."""
    by_process, by_category = Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # with --subprocesses a stack starts with its process's ancestors: the last one is its own
        own = max(i for i, frame in enumerate(frames) if frame.startswith("process "))
        process = frames[own]
        kind = ("actor" if "ray::" in process or "default_worker" in process
                else "driver" if "fedtune" in process else "other")
        by_process[kind] += int(count)
        by_category[kind, categorise(frames[own + 1:])] += int(count)
    return by_process, by_category


def rounds_done(run_dir: Path) -> int:
    return len(read_csv(run_dir / "metrics.csv"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--backend", default="ray", choices=["ray", "inprocess"])
    parser.add_argument("--rounds", type=int, default=40, help="enough to outlast --seconds")
    parser.add_argument("--warm-rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--set", action="append", default=[], help="more config overrides")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        raw = args.raw or Path(folder) / "stacks.txt"
        overrides = [*MLP, f"data.num_clients={args.clients}", f"run.rounds={args.rounds}",
                     f"engine.backend={args.backend}", f"run.dir={run_dir}", *args.set]
        command = [sys.executable, "-m", "fedtune.cli", "run", "--quiet"]
        command += [item for o in overrides for item in ("--set", o)]
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
        while rounds_done(run_dir) < args.warm_rounds:
            if run.poll() is not None:
                sys.exit(f"the run ended (code {run.returncode}) before it was warm")
            time.sleep(0.2)
        first, cpu = rounds_done(run_dir), tree_cpu_s(run.pid)
        subprocess.run(["py-spy", "record", "--pid", str(run.pid), "--subprocesses",
                        "--rate", str(args.rate), "--duration", str(args.seconds),
                        "--format", "raw", "--output", str(raw), "--nonblocking"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        profiled_rounds = rounds_done(run_dir) - first
        cpu = tree_cpu_s(run.pid) - cpu
        run.terminate()
        run.wait()
        by_process, by_category = read_stacks(raw)
    total = sum(by_process.values())
    client_rounds = max(profiled_rounds, 1) * args.clients
    per_client_ms = 1000 * cpu / client_rounds
    print(f"## {args.clients:,} clients, {args.backend}: {profiled_rounds} rounds profiled "
          f"(slowed by the profiler), process tree {cpu:.1f} CPU-s = {per_client_ms:.2f} CPU-ms "
          f"per client-round; {total} samples at {args.rate}/s, by process: "
          + ", ".join(f"{kind} {100 * n / total:.0f} %" for kind, n in by_process.most_common()))
    print("| where | process | share of samples | ≈ CPU-ms per client-round (share × tree) |")
    print("|---|---|---|---|")
    for (kind, name), count in sorted(by_category.items(), key=lambda item: -item[1]):
        share = count / total
        print(f"| {name} | {kind} | {100 * share:.1f} % | {share * per_client_ms:.3f} |")


if __name__ == "__main__":
    main()
