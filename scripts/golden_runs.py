"""Golden runs: run a fixed set of configs through the CLI and record what they produced, so a
refactoring can show that results did not change (metrics.csv and clients.csv without their
timing columns, and the saved model's bytes).

    python scripts/golden_runs.py record /tmp/golden-before            # before the change
    python scripts/golden_runs.py record /tmp/golden-after             # after it
    python scripts/golden_runs.py compare /tmp/golden-before /tmp/golden-after

``--only NAME`` (repeatable) runs a subset; ``--quick`` leaves out the runs that take minutes
(the Ray engine and the quickstart). Each run is a fresh ``fedtune run`` process.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TIMING_COLUMNS = {"wall_s", "duration_s"}
MLP = ["data.dataset=digits", "model.kind=mlp", "model.hidden_sizes=[32]", "data.num_clients=6",
       "data.partitioner=dirichlet", "data.alpha=0.5", "run.rounds=3", "client.lr=0.05",
       "client.local_steps=4", "client.batch_size=16", "engine.backend=inprocess",
       "data.max_examples=0", "strategy.fraction_train=0.5", "strategy.fraction_evaluate=0.5"]
SGD = ["client.optimizer=sgd", "client.momentum=0.5"]
# DP runs draw their noise from OS entropy unless this NOT PRIVATE switch seeds it from run.seed:
# golden runs must repeat exactly, so every DP run below sets it
REPRODUCIBLE_NOISE = "privacy.insecure_reproducible_noise=true"
TINY_HF = ["data.max_examples=300", "data.num_clients=4", "run.rounds=2",
           "strategy.fraction_train=0.5", "client.local_steps=2", "client.batch_size=8",
           "engine.backend=inprocess", "model.max_length=24"]
RAY_ACTORS = ["engine.backend=ray", "engine.num_actors=1"]

# name -> (config file or None, overrides, slow)
RUNS: dict[str, tuple[str | None, list[str], bool]] = {
    "mlp_digits_inprocess": ("simulations/mlp_digits.toml", ["engine.backend=inprocess"], False),
    "fedavg": (None, MLP, False),
    "fedprox": (None, MLP + ["strategy.name=fedprox", "strategy.proximal_mu=0.1"], False),
    "fedavgm": (None, MLP + ["strategy.name=fedavgm"], False),
    "fedadam": (None, MLP + ["strategy.name=fedadam", "strategy.fedopt_eta=0.01"], False),
    "fedyogi": (None, MLP + ["strategy.name=fedyogi"], False),
    "fedadagrad": (None, MLP + ["strategy.name=fedadagrad"], False),
    "fedtrimmedavg": (None, MLP + ["strategy.name=fedtrimmedavg", "strategy.trim_beta=0.2"],
                      False),
    "fedmedian": (None, MLP + ["strategy.name=fedmedian"], False),
    "krum": (None, MLP + ["strategy.name=krum", "strategy.num_malicious=1"], False),
    "multikrum": (None, MLP + ["strategy.name=multikrum", "strategy.num_malicious=1"], False),
    "scaffold": (None, MLP + SGD + ["strategy.name=scaffold"], False),
    "fednova": (None, MLP + SGD + ["strategy.name=fednova"], False),
    "feddyn": (None, MLP + ["strategy.name=feddyn"], False),
    "rfa": (None, MLP + ["strategy.name=rfa"], False),
    "local_dp": (None, MLP + ["privacy.mode=local", "privacy.target_epsilon=4",
                              "privacy.delta=1e-3", REPRODUCIBLE_NOISE], False),
    "local_dp_budget": (None, MLP + ["privacy.mode=local", "privacy.target_epsilon=1",
                                     "privacy.delta=1e-3", "privacy.client_rounds=1",
                                     "run.rounds=4", REPRODUCIBLE_NOISE], False),
    "central_dp": (None, MLP + ["privacy.mode=central", "privacy.target_epsilon=8",
                                "privacy.delta=1e-3", "privacy.clip_norm=2",
                                "privacy.adaptive_clipping=false", REPRODUCIBLE_NOISE], False),
    "central_dp_adaptive": (None, MLP + ["privacy.mode=central", "privacy.noise_multiplier=0.3",
                                         "privacy.delta=1e-3", "privacy.adaptive_clipping=true",
                                         "privacy.clipped_count_stddev=1",
                                         "privacy.clip_norm=1", REPRODUCIBLE_NOISE], False),
    "faults": (None, MLP + ["faults.crash_probability=0.2", "faults.nan_fraction=0.2",
                            "attack.name=scaling", "attack.fraction=0.2",
                            "faults.wrong_shape_fraction=0.2"], False),
    "devices_deadline": (None, MLP + ["devices.profile=lognormal", "devices.slow_fraction=0.3",
                                      "devices.available_fraction=0.8",
                                      "strategy.over_selection=0.4",
                                      "strategy.round_deadline_s=2"], False),
    "fedbuff": (None, MLP + ["strategy.name=fedbuff", "devices.profile=lognormal",
                             "devices.slow_fraction=0.3", "strategy.fedbuff_buffer_size=2",
                             "strategy.concurrency=3"], False),
    "fedasync": (None, MLP + ["strategy.name=fedasync", "devices.profile=lognormal",
                              "strategy.concurrency=3"], False),
    "hf_lora": (None, TINY_HF + ["model.transfer=lora", "client.lr=1e-3"], False),
    "hf_frozen_cls": (None, TINY_HF + ["model.transfer=frozen", "model.pooling=cls",
                                       "client.lr=5e-3", "model.feature_cache=false"], False),
    "hf_frozen_features": (None, TINY_HF + ["model.transfer=frozen", "client.lr=5e-3"], False),
    "mlp_digits_ray": ("simulations/mlp_digits.toml", [], True),
    # actors only when asked for (fedtune/engine/shape.py): a small cohort, or one default
    # actor on a machine of 2 CPUs, runs in process
    "ray_fedavg": (None, MLP + RAY_ACTORS, True),
    "ray_scaffold": (None, MLP + SGD + RAY_ACTORS + ["strategy.name=scaffold"], True),
    "quickstart": (None, [], True),
}


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
                for row in csv.DictReader(handle)]


def _digest(run_dir: Path) -> dict:
    model = run_dir / "model" / "model.safetensors"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {
        "metrics": _rows(run_dir / "metrics.csv"),
        "clients": _rows(run_dir / "clients.csv"),
        "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "final": summary["final"],
        "stop_reason": summary.get("stop_reason", ""),
    }


def record(out: Path, names: list[str], quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fedtune = Path(sys.executable).with_name("fedtune")
    for name in names:
        config, overrides, slow = RUNS[name]
        if slow and quick:
            continue
        run_dir = out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [str(fedtune), "run", *([config] if config else []), "--output", str(run_dir)]
        for override in overrides:
            command += ["--set", override]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if result.returncode != 0:
            sys.exit(f"{name}: rc {result.returncode}\n{result.stderr[-3000:]}")
        (out / f"{name}.json").write_text(json.dumps(_digest(run_dir), indent=1))
        print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)


def compare(before: Path, after: Path) -> int:
    differ = 0
    for file in sorted(before.glob("*.json")):
        other = after / file.name
        if not other.is_file():
            print(f"{file.stem}: missing after")
            differ += 1
            continue
        a, b = json.loads(file.read_text()), json.loads(other.read_text())
        problems = []
        for key in a:
            if key in ("metrics", "clients"):
                shared = [{k: v for k, v in row.items() if k in b[key][0]} for row in a[key]] \
                    if b[key] else a[key]
                theirs = [{k: v for k, v in row.items() if k in a[key][0]} for row in b[key]] \
                    if a[key] else b[key]
                if shared != theirs:
                    problems.append(key)
            elif a[key] != b.get(key):
                problems.append(key)
        print(f"{file.stem}: {'identical' if not problems else 'DIFFERS in ' + ', '.join(problems)}")
        differ += bool(problems)
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--only", action="append", choices=list(RUNS))
    rec.add_argument("--quick", action="store_true")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.only or list(RUNS), args.quick)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
