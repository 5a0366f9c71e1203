"""Calibrate the central-DP canary audit on the mechanism itself, where the true ε is known.

The privacy-utility study's audits read *above* the accountant at ε = 1 (every one-shot estimate
1.07-1.93 against 1.00). This script asks whether the estimator reads high or the mechanism leaks:
it plays the shadow release of the canary clients through the real code (the study's config,
``CentralDP.plan`` and ``build_strategy``: DP-FedAvg with adaptive clipping's noise split,
server momentum, the secret noise of ``strategies.noise.SecureRandom``) with no training signal
(an empty cohort) or a fixed synthetic one (``--signal``), then audits it exactly as
``fedtune.audit.report`` does (cosines of the release with every canary direction, the one-shot
estimate of Andrew et al. 2024 with its bootstrap interval, the rigorous one-run bound of
Steinke, Nasr, Jagielski 2023 on the same cosines), ``--replicates`` times per ε.

Known truth beside it:

- **accountant**: ε of the run (opacus RDP of the composed multiplier σ, both channels, every
  round's release), and dp-accounting's PLD of the same;
- **update channel**: PLD of the update noise σ_Δ alone (what the canaries can probe, every
  round's release);
- **final model**: the exact ε of the last release with respect to one canary client. The
  shadow release is linear in the canaries (a canary sends C_t·u whatever the model), so its
  projection on a canary direction is ``Σ_t w_t C_t B_t + N(0, σ_Δ² Σ_t w_t² C_t²)`` in units
  of C/qN, with B_t ~ Bernoulli(q) the canary's participation and w_t = (1 - β^(T-t+1)) / (1 - β)
  the server momentum's total weight on round t; everything orthogonal to the direction is
  independent of the canary. Its ε is that of a mixture of Gaussians against a Gaussian (the
  "last iterate" analysis of Steinke et al. 2024, "The Last Iterate Advantage", exact here
  because the canaries' updates are fixed), computed by dp-accounting's PLD
  (``from_mixture_gaussian_mechanism``). It is what the final-model canary test can see at most.

Rigorous bound above the accountant = a real violation; estimate above it = not evidence by
itself (the estimator's bias is what this measures).

    python benchmarks/audit_calibration.py                          # BBC News, ε 1 2 4 8, 50 each
    python benchmarks/audit_calibration.py --dataset rotten_tomatoes --replicates 20
    python benchmarks/audit_calibration.py --clip-norms RUN_DIR/metrics.csv  # a run's C_t
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
import warnings
from copy import deepcopy
from pathlib import Path

import numpy as np

STUDY = Path(__file__).resolve().parent.parent / "simulations" / "privacy_utility.toml"
# the study's two federations: (dataset overrides, floating coordinates of the linear head on
# MiniLM's 384 features)
DATASETS = {
    "bbc_news": (["data.dataset=bbc_news", "data.partitioner=inner_dirichlet",
                  "data.alpha=0.5", "data.num_clients=500"], 5 * 384 + 5),
    "rotten_tomatoes": (["data.dataset=rotten_tomatoes", "data.partitioner=natural",
                         "data.num_clients=507"], 2 * 384 + 2),
}


def study_config(dataset: str, target_epsilon: float, rounds: int | None):
    """The privacy-utility study's central-DP config for one dataset and ε."""
    from fedtune.config import config_from_raw, read_toml

    raw = {k: v for k, v in read_toml(STUDY, "study").items() if k != "sweep"}
    overrides = DATASETS[dataset][0] + ["privacy.mode=central",
                                        f"privacy.target_epsilon={target_epsilon}"]
    if rounds:
        overrides.append(f"run.rounds={rounds}")
    with warnings.catch_warnings():  # the study's local-DP keys have no effect here
        warnings.simplefilter("ignore")
        return config_from_raw(raw, overrides)


def round_weights(config, clip_norms: list[float] | None) -> np.ndarray:
    """w_t C_t: the weight the final model gives a canary's round-t update (server momentum,
    and the clip bound: the run's if replayed, else the config's constant one)."""
    from fedtune.audit.final_model import momentum_weights
    from fedtune.privacy.central_dp import server_optimizer

    optimizer = server_optimizer(config)
    if optimizer["server_optimizer"] != "sgd":
        raise SystemExit("the final model's ε is exact for server SGD (with momentum) only")
    weights = momentum_weights(config.run.rounds, optimizer["server_learning_rate"],
                               optimizer["server_momentum"])
    return weights * np.asarray(clip_norms or [config.privacy.clip_norm] * config.run.rounds)


def known_epsilons(config, plan, weights: np.ndarray) -> dict[str, float]:
    import dp_accounting

    from fedtune.audit.final_model import final_model_epsilon
    from fedtune.privacy.accounting import epsilon

    p, rounds, rate = config.privacy, config.run.rounds, plan.sample_rate
    update_noise = plan.details.get("update_noise_multiplier", plan.noise_multiplier)

    def pld(noise: float) -> float:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            rate, dp_accounting.GaussianDpEvent(noise)), rounds)
        return float(dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(p.delta))

    return {"accountant": epsilon([(plan.noise_multiplier, rate, rounds)], p.delta,
                                  p.accountant),
            "accountant_pld": pld(plan.noise_multiplier),
            "update_channel_pld": pld(update_noise),
            "final_model": final_model_epsilon(update_noise, rate, weights, p.delta)}


def _replies(strategy, current: np.ndarray, signal: float, rng: np.random.Generator,
             direction: np.ndarray) -> list:
    """A Poisson cohort that all send ``signal`` times one fixed unit direction (the same
    update every round: a training signal the canaries do not know)."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    if not signal:
        return []
    # a reply takes its source from the process's task identity, as in a ServerApp
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    content = RecordDict({"arrays": ArrayRecord({"w": Array(
        (current + signal * direction).astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": 10})})
    reply = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    return [reply] * int(rng.binomial(strategy.population, strategy.sample_rate))


def shadow_cosines(config, template, dimension: int, replicate: int, signal: float,
                   clip_norms: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """One run of the shadow release through a fresh copy of the run's DP-FedAvg
    (``template``); (cosines, inserted) as the audit computes them. The canary seed is the
    replicate; the noise is secret (OS entropy)."""
    from flwr.app import Array, ArrayRecord

    from fedtune.audit.report import canary_cosines, floating_delta
    from strategies.dp_fedavg import canary_inserted

    strategy = deepcopy(template)
    strategy.canary_seed = replicate  # the canaries' seed, as run.seed in a run
    strategy.canary_inserted = canary_inserted(replicate, config.privacy.audit_canaries)
    assert strategy.seed is None, "the calibration uses the secret noise of a private run"
    rng = np.random.default_rng([replicate, 1])
    direction = rng.standard_normal(dimension)
    direction /= np.linalg.norm(direction)
    initial = np.zeros(dimension, dtype=np.float32)
    current = initial
    for server_round in range(1, config.run.rounds + 1):
        strategy.current_arrays = ArrayRecord({"w": Array(current)})
        # the bound the final model's ε is computed for (adaptive clipping would move it by
        # the noised count: with no cohort at random)
        strategy.clipping_norm = (clip_norms[server_round - 1] if clip_norms
                                  else config.privacy.clip_norm)
        new, _ = strategy.aggregate_train(server_round, _replies(strategy, current, signal,
                                                                 rng, direction))
        current = new["w"].numpy()
    delta = floating_delta({"w": initial}, strategy.canary_release())
    return (canary_cosines(delta, replicate, config.privacy.audit_canaries),
            canary_inserted(replicate, config.privacy.audit_canaries))


def audit_cosines(cosines: np.ndarray, inserted: np.ndarray, delta: float, dimension: int,
                  seed: int) -> dict[str, float]:
    """The audit of ``fedtune.audit.report.user_level`` on one set of cosines."""
    from fedtune.audit.estimators import canary_epsilon, one_run_audit

    estimate = canary_epsilon(cosines[inserted], cosines[~inserted], delta,
                              dimension=dimension, seed=seed)
    bound = one_run_audit(cosines, inserted, delta, exactly_half=True)
    return {"estimate": estimate.epsilon, "ci_low": estimate.ci_low,
            "ci_high": estimate.ci_high, "held_out_null": estimate.epsilon_held_out_null,
            "inserted_mean_sd": estimate.inserted_mean * math.sqrt(dimension),
            "inserted_std_ratio": estimate.inserted_std * math.sqrt(dimension),
            "bound": bound.epsilon_lower_bound}


def summarise(known: dict[str, float], audits: list[dict[str, float]]) -> dict[str, float]:
    def column(key: str) -> np.ndarray:
        return np.array([a[key] for a in audits])

    estimate, low, high, bound = (column(k) for k in ("estimate", "ci_low", "ci_high", "bound"))
    accountant, final = known["accountant"], known["final_model"]
    return {"replicates": len(audits),
            "estimate_median": float(np.median(estimate)),
            "estimate_2.5%": float(np.quantile(estimate, 0.025)),
            "estimate_97.5%": float(np.quantile(estimate, 0.975)),
            "estimate_above_accountant": float(np.mean(estimate > accountant)),
            "interval_low_above_accountant": float(np.mean(low > accountant)),
            "interval_covers_final_model": float(np.mean((low <= final) & (final <= high))),
            "held_out_null_median": float(np.median(column("held_out_null"))),
            "inserted_mean_sd_median": float(np.median(column("inserted_mean_sd"))),
            "inserted_std_ratio_median": float(np.median(column("inserted_std_ratio"))),
            "bound_max": float(bound.max()),
            "bound_above_accountant": float(np.mean(bound > accountant))}


def read_clip_norms(path: str) -> list[float]:
    with open(path, newline="") as file:
        return [float(row["clip_norm"]) for row in csv.DictReader(file)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="bbc_news")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--replicates", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=0, help="0 = the study's (100)")
    parser.add_argument("--signal", type=float, default=0.0,
                        help="norm of every sampled client's update, one fixed direction "
                             "(clipped to the bound; 0 = no cohort)")
    parser.add_argument("--clip-norms", help="a run's metrics.csv: replay its clip bounds")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()

    from fedtune.server.build_strategy import build_strategy
    from fedtune.tables.privacy_modes import privacy_mode

    logging.getLogger("flwr").setLevel(logging.ERROR)  # "federated evaluation skipped"

    dimension = DATASETS[args.dataset][1]
    clip_norms = read_clip_norms(args.clip_norms) if args.clip_norms else None
    results, started = [], time.process_time()
    for target in args.epsilons:
        config = study_config(args.dataset, target, args.rounds or None)
        plan = privacy_mode(config).plan(config)
        known = known_epsilons(config, plan, round_weights(config, clip_norms))
        template = build_strategy(config, plan)
        audits = [audit_cosines(*shadow_cosines(config, template, dimension, seed, args.signal,
                                                clip_norms),
                                config.privacy.delta, dimension, seed)
                  for seed in range(args.replicates)]
        row = {"target_epsilon": target, "noise_multiplier": plan.noise_multiplier,
               "update_noise_multiplier": plan.details.get("update_noise_multiplier"),
               **known, **summarise(known, audits)}
        results.append({**row, "audits": audits})
        print(json.dumps(row), flush=True)
    print(f"\n{args.dataset}: d = {dimension}, {config.privacy.audit_canaries} canaries, "
          f"q = {plan.sample_rate}, {config.run.rounds} rounds, δ = {config.privacy.delta:g}, "
          f"signal {args.signal:g}, clip bounds "
          f"{'from ' + args.clip_norms if clip_norms else 'constant'}; "
          f"{time.process_time() - started:.0f} CPU-s\n")
    print("| target ε | accountant (RDP / PLD) | update channel (PLD) | final model (exact) "
          "| estimate: median [95 % of runs] | runs: estimate > accountant | runs: interval "
          "low > accountant | interval covers final model | one-run bound: max (runs > "
          "accountant) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['target_epsilon']:g} | {r['accountant']:.2f} / {r['accountant_pld']:.2f} "
              f"| {r['update_channel_pld']:.2f} | {r['final_model']:.2f} "
              f"| {r['estimate_median']:.2f} [{r['estimate_2.5%']:.2f}, "
              f"{r['estimate_97.5%']:.2f}] | {r['estimate_above_accountant']:.0%} "
              f"| {r['interval_low_above_accountant']:.0%} "
              f"| {r['interval_covers_final_model']:.0%} "
              f"| {r['bound_max']:.2f} ({r['bound_above_accountant']:.0%}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
