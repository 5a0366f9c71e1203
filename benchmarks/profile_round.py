"""Where a steady round goes: py-spy (a sampling profiler) on fedtune's driver and Ray actors.

Starts ``fedtune run`` on the engine benchmark's workload (``engine_benchmarks.MLP``), waits
until its first rounds are done (start-up and warm-up are not profiled), attaches py-spy to the
driver and every Python process under it for ``--seconds``, and prints where the sampled CPU
went, by process and by what the code was doing. Each process's CPU (user + system, from /proc,
over the profiled rounds) is shared out over its categories by their share of its samples;
py-spy samples a thread that waits for a core as if it ran, so on a loaded machine a share is
of time more than of CPU. Ray's C++ raylet and GCS have no Python samples: their CPU is a row
of its own. The raw stacks are kept with ``--raw FILE`` (flamegraph.pl and speedscope read
them). On a machine of 2 CPUs the Ray engine's default pool would be one actor, which
runs in process (``fedtune.engine.shape``): name the actors to profile them.

    python benchmarks/profile_round.py --clients 1000 --backend ray --set engine.num_actors=1
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
from engine_benchmarks import MLP, tree_cpu  # noqa: E402

from fedtune.results.run_dir import read_csv  # noqa: E402

# what a stack was doing: the first of these functions found from the leaf up names it
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("client: forward", ("logits_of ",)),
    ("client: backward", ("Tensor.backward ",)),
    ("optimizer step (a client's, or a chunk's stacked one)", ("Optimizer.profile_hook_step.",)),
    ("optimizer reset (moments zeroed)", ("reset_optimizer ",)),
    ("client: batch (shuffle, gather rows)", ("local_batches ",)),
    ("client: weights in (load global model)", ("load_shared_state ",)),
    ("client: weights out (views of the update)", ("shared_state ",)),
    ("seeding (round seeds, generators)", ("client_round_seed", "seed_torch ")),
    ("client: local evaluation", ("evaluate_client ",)),
    ("cohort: screening the update", ("_screen_update ", "_screen_evaluation ")),
    ("cohort: adding the update to the block sum", ("accumulate ",)),
    ("clients together: vmapped forward and backward", ("_train_group.<locals>.loss ",
                                                        "_autograd_grad ")),
    ("clients together: gathering a step's batches", ("_gather_step ",)),
    ("clients together: row orders and batches per client", ("client_train_row_batches ",
                                                            "ShuffledRows", "train_rows ")),
    ("clients together: a chunk's update norms and weighted sum (one compiled pass)",
     ("update_norms_and_sum ",)),
    ("clients together: update norms of a chunk", ("update_norms ",)),
    ("clients together: the chunk added to the block sum", ("accumulate_rows ",)),
    ("clients together: screening a chunk (checks, reports)", ("_keep_chunk ",)),
    ("clients together: rest (copies from the global model, vmap's Python, per-client results)",
     ("_train_group ", "_train_chunk ")),
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


WAITING = "waiting for work in Ray's task loop (no CPU: left out of the shares)"


def categorise(frames: list[str]) -> str:
    if frames and "Worker.main_loop " in frames[-1]:  # in Ray's C++ task loop, between calls
        return WAITING
    for name, markers in CATEGORIES:  # the server's work first (its evaluation runs a forward)
        if name.startswith("server:") and any(m in f for f in frames for m in markers):
            return name
    for frame in reversed(frames):  # then leaf first: the innermost named activity wins
        for name, markers in CATEGORIES:
            if any(marker in frame for marker in markers):
                return name
    return "other (Ray's Python threads and processes, imports, idle loops)"


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
        category = categorise(frames[own + 1:])
        by_category[kind, category] += int(count)
        if category != WAITING:
            by_process[kind] += int(count)
    return by_process, by_category


def process_kind(pid: int, root: int) -> str:
    """actor (a Ray worker), driver (the run's own process) or other (Ray's raylet, GCS, log
    monitor...)."""
    if pid == root:
        return "driver"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    return "actor" if b"ray::" in command or b"default_worker" in command else "other"


def kinds_cpu_s(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (its kind, its user + system CPU seconds) for ``root`` and every descendant."""
    return {pid: (process_kind(pid, root), own) for pid, (own, _) in tree_cpu(root).items()}


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
                ) -> Counter:
    """CPU seconds each kind of process spent between two ``kinds_cpu_s`` readings."""
    spent: Counter = Counter()
    for pid, (kind, cpu) in after.items():
        spent[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    return spent


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
        first, before = rounds_done(run_dir), kinds_cpu_s(run.pid)
        subprocess.run(["py-spy", "record", "--pid", str(run.pid), "--subprocesses",
                        "--rate", str(args.rate), "--duration", str(args.seconds),
                        "--format", "raw", "--output", str(raw), "--nonblocking"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        profiled_rounds = rounds_done(run_dir) - first
        spent = cpu_by_kind(before, kinds_cpu_s(run.pid))
        run.terminate()
        run.wait()
        by_process, by_category = read_stacks(raw)
    total = sum(by_process.values())
    client_rounds = max(profiled_rounds, 1) * args.clients
    cpu = sum(spent.values())
    print(f"## {args.clients:,} clients, {args.backend}: {profiled_rounds} rounds profiled "
          f"(slowed by the profiler), process tree {cpu:.1f} CPU-s = "
          f"{1000 * cpu / client_rounds:.3f} CPU-ms per client-round, by process (/proc): "
          + ", ".join(f"{kind} {1000 * s / client_rounds:.3f}" for kind, s in spent.most_common())
          + f"; {total} samples at {args.rate}/s: "
          + ", ".join(f"{kind} {100 * n / total:.0f} %" for kind, n in by_process.most_common()))
    print("| where | process | share of its process's samples | ≈ CPU-ms per client-round "
          "(share × the process's CPU) |")
    print("|---|---|---|---|")
    for (kind, name), count in sorted(by_category.items(),
                                      key=lambda item: -item[1] / by_process[item[0][0]]
                                      * spent[item[0][0]]):
        share = count / by_process[kind]
        cpu_ms = "-" if name == WAITING else f"{1000 * share * spent[kind] / client_rounds:.3f}"
        print(f"| {name} | {kind} | {100 * share:.1f} % | {cpu_ms} |")
    for kind in spent.keys() - by_process.keys():  # C++ only (raylet, GCS): no Python samples
        print(f"| Ray's own processes (raylet, GCS: not sampled) | {kind} | - | "
              f"{1000 * spent[kind] / client_rounds:.3f} |")


if __name__ == "__main__":
    main()
