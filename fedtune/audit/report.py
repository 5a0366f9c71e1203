"""Run a run's privacy audit and write it: ``audit.json`` and ``plots/audit.png``.

The audit fits the privacy mode (``fedtune.tables.privacy_modes``: ``audit_inserts``):

- ``clients`` (central DP): the canary clients of ``strategies.dp_fedavg`` (under FedBuff,
  ``strategies.dp_fedbuff``: in every buffer release); the statistic of
  canary i is the cosine of the final delta of the shadow release (the model released had the
  canary clients taken part, minus the initial travelling floats, in the order DP-FedAvg
  flattens them; kept in ``canary_release.safetensors``) with its direction; the one-shot
  estimate of Andrew et al. 2024 separates inserted from held-out canaries
  (``estimators.canary_epsilon``).
- ``examples`` (local DP, no privacy): the canary examples of ``canary_examples``; the score
  of a canary is minus its loss under the final model, and the one-run bound of Steinke et
  al. 2023 turns membership guesses into an ε lower bound (``estimators.one_run_audit``).

Two kinds of number, never to be confused (``docs/privacy.md``, "The audit"):

- a **lower bound** (``epsilon_lower_bound``, both modes; for central DP the one-run bound on the
  same canary cosines, its canaries being a random half): it holds at 95 % confidence whatever
  the mechanism. A lower bound above the accountant's ε is a bug in the mechanism or its
  accounting: ``violation`` in audit.json, a warning in the log, exit code 1 of ``fedtune
  audit``.
- an **estimate** (central DP: ``empirical_epsilon``, the one-shot estimate, and its bootstrap
  ``interval``): not a bound, and biased upwards at a few hundred inserted canaries (the
  study's DP-FedAvg at accountant ε = 1, whose final model's true ε is 0.84, reads 1.19 in
  median with its 500; ``benchmarks/audit_calibration.py``).
  Beside it, ``estimate_reference``: what the estimator reads at this canary count for a
  Gaussian mechanism at exactly the accountant's ε. An estimate above that reference's 97.5 %
  quantile is ``estimate_high``: worth a look, not a violation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtune.audit.estimators import canary_epsilon, canary_estimate_reference, one_run_audit
from fedtune.config import Config
from fedtune.models.weights import load_shared_state
from fedtune.results.run_dir import RunDirectory, json_safe
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.task import TaskResources
from strategies.dp_fedavg import canary_direction, canary_inserted

AUDIT_JSON = "audit.json"
AUDIT_PLOT = "audit.png"
CANARY_RELEASE = "canary_release.safetensors"  # the shadow release with canary clients
USER_LEVEL = ("user-level: canary clients, one-shot estimate from final-model cosines "
              "(Andrew et al. 2024) and the one-run lower bound on the same cosines (Steinke, "
              "Nasr, Jagielski 2023)")
SAMPLE_LEVEL = ("sample-level: canary examples, one-run lower bound from loss-based "
                "membership guesses (Steinke, Nasr, Jagielski 2023)")


def floating_delta(initial: Mapping[str, np.ndarray], final: Mapping[str, np.ndarray]
                   ) -> np.ndarray:
    """final - initial over the floating arrays, flattened in order (DP-FedAvg's layout)."""
    parts = [(np.asarray(final[name], dtype=np.float64) - np.asarray(value, np.float64)).ravel()
             for name, value in initial.items() if np.issubdtype(value.dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


def canary_cosines(delta: np.ndarray, seed: int, count: int) -> np.ndarray:
    """Cosine of ``delta`` with each canary client's direction."""
    norm = float(np.linalg.norm(delta))
    if norm == 0:
        return np.zeros(count)
    return np.array([float(canary_direction(seed, i, delta.size) @ delta) / norm
                     for i in range(count)])


def user_level(config: Config, initial: Mapping[str, np.ndarray],
               final: Mapping[str, np.ndarray], accountant_epsilon: float) -> dict[str, Any]:
    """The one-shot estimate, its reference at the accountant's ε and the one-run lower bound,
    all from the canary clients' cosines (``final``: the release)."""
    p = config.privacy
    delta = floating_delta(initial, final)
    cosines = canary_cosines(delta, config.run.seed, p.audit_canaries)
    inserted = canary_inserted(config.run.seed, p.audit_canaries)
    estimate = canary_epsilon(cosines[inserted], cosines[~inserted], p.delta,
                              dimension=delta.size, seed=config.run.seed)
    bound = one_run_audit(cosines, inserted, p.delta, exactly_half=True)
    reference = (canary_estimate_reference(accountant_epsilon, p.delta, int(inserted.sum()),
                                           seed=config.run.seed)
                 if math.isfinite(accountant_epsilon) else None)
    return {"kind": USER_LEVEL, "empirical_epsilon": estimate.epsilon,
            "empirical_is": "estimate", "interval": [estimate.ci_low, estimate.ci_high],
            "estimate": estimate.to_dict(),
            "estimate_reference": reference.to_dict() if reference else None,
            "estimate_high": bool(reference and estimate.epsilon > reference.high),
            "epsilon_lower_bound": bound.epsilon_lower_bound, "bound": bound.to_dict(),
            "dimension": int(delta.size), "statistic": "cosine",
            "inserted_values": cosines[inserted].tolist(),
            "held_out_values": cosines[~inserted].tolist()}


def sample_level(config: Config, resources: TaskResources, final: Mapping[str, np.ndarray]
                 ) -> dict[str, Any]:
    """The one-run bound from minus the canary examples' losses."""
    load_shared_state(resources.model, final)
    losses = example_losses(resources.model, resources)
    canaries = resources.canaries
    audit = one_run_audit(-losses, canaries.included, config.privacy.delta)
    return {"kind": SAMPLE_LEVEL, "empirical_epsilon": audit.epsilon_lower_bound,
            "empirical_is": "lower bound", "interval": [audit.epsilon_lower_bound, None],
            "epsilon_lower_bound": audit.epsilon_lower_bound, "bound": audit.to_dict(),
            "statistic": "minus loss",
            "inserted_values": (-losses[canaries.included]).tolist(),
            "held_out_values": (-losses[~canaries.included]).tolist()}


@torch.no_grad()
def example_losses(model: nn.Module, resources: TaskResources) -> np.ndarray:
    """Cross-entropy of every canary example under ``model``, in canary order."""
    canaries = resources.canaries
    labels = resources.federation.data.labels
    model.to(resources.device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    out = []
    for start in range(0, canaries.count, 256):
        rows = canaries.rows[start:start + 256]
        inputs = {k: v.to(resources.device) for k, v in resources.encoded.pad(rows).items()}
        logits = model(**inputs)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        truth = torch.from_numpy(labels[rows]).to(resources.device)
        out.append(loss_fn(logits.float(), truth).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def run_audit(config: Config, resources: TaskResources, initial: Mapping[str, np.ndarray],
              final: Mapping[str, np.ndarray], accountant_epsilon: float) -> dict[str, Any]:
    """The audit of one run, beside the accountant's ε (inf without noise or privacy)."""
    kind = PRIVACY_MODES[config.privacy.mode].audit_inserts
    result = (user_level(config, initial, final, accountant_epsilon) if kind == "clients"
              else sample_level(config, resources, final))
    # only a lower bound can contradict the accountant; an estimate above it is not proof
    violation = bool(math.isfinite(accountant_epsilon)
                     and result["epsilon_lower_bound"] > accountant_epsilon + 1e-6)
    count = (config.privacy.audit_canaries if kind == "clients"
             else config.privacy.audit_examples)
    return {"mode": config.privacy.mode, "delta": config.privacy.delta, "canaries": count,
            "accountant_epsilon": accountant_epsilon, **result, "violation": violation}


def save_canary_release(run_dir: RunDirectory, release: Mapping[str, np.ndarray]) -> None:
    """The shadow release with canary clients, so ``fedtune audit`` can redo the audit."""
    from safetensors.numpy import save

    (run_dir.path / CANARY_RELEASE).write_bytes(  # the permissions of the run's other files
        save({k: np.ascontiguousarray(v) for k, v in release.items()}))


def audit_run_dir(path: str | Path) -> tuple[RunDirectory, dict[str, Any]]:
    """Audit a finished run from what its directory kept (config.toml, summary.json, the
    saved model or, with canary clients, their release): canaries and the initial model are
    rebuilt from the run's seed."""
    from safetensors.numpy import load_file

    from fedtune.audit import audited_config
    from fedtune.config import ConfigError
    from fedtune.models.build import SAVED_WEIGHTS, build_model
    from fedtune.models.weights import shared_state
    from fedtune.task import task_resources

    folder = Path(path)
    config = audited_config(path)
    run_dir = RunDirectory(folder.resolve())
    resources = task_resources(config)
    initial = shared_state(build_model(resources.spec, config.run.seed))
    clients = PRIVACY_MODES[config.privacy.mode].audit_inserts == "clients"
    saved = load_file(str(folder / (CANARY_RELEASE if clients else f"model/{SAVED_WEIGHTS}")))
    if clients:  # the release holds the floating arrays only
        initial = {k: v for k, v in initial.items() if np.issubdtype(v.dtype, np.floating)}
    missing = sorted(set(initial) - set(saved))
    if missing:
        raise ConfigError(f"{str(path)!r}: the saved model lacks the trained tensors "
                          f"{missing[:3]} (a LoRA model is saved merged): audit it during the "
                          "run with privacy.audit = true")
    final = {name: saved[name] for name in initial}
    spent = run_dir.read_json("summary.json")["privacy"].get("epsilon")
    return run_dir, run_audit(config, resources, initial, final,
                              math.inf if spent is None else float(spent))


def write_audit(run_dir: RunDirectory, audit: dict[str, Any]) -> Path:
    """audit.json and plots/audit.png; a violation is logged as a warning."""
    from flwr.common import log

    run_dir.write_json(AUDIT_JSON, json_safe(audit))
    plot = run_dir.plots_dir / AUDIT_PLOT
    plot_audit(audit, plot)
    if audit["violation"]:
        log(WARNING, "fedtune audit: VIOLATION: the lower bound on epsilon, %.4g at 95%% "
            "confidence, is above the accountant's %.4g: the mechanism or its accounting is "
            "wrong", audit["epsilon_lower_bound"], audit["accountant_epsilon"])
    return plot


def plot_audit(audit: dict[str, Any], path: Path) -> None:
    """Left: the canaries' statistic, inserted against held-out. Right: the lower bound, the
    estimate (central DP: with its interval and the range it reads for a mechanism at the
    accountant's ε) and the accountant's ε."""
    from fedtune.results.plots import plt  # the Agg backend is chosen there

    fig, (hist_ax, eps_ax) = plt.subplots(1, 2, figsize=(10, 4))
    values = [np.asarray(audit["inserted_values"]), np.asarray(audit["held_out_values"])]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=30)
    hist_ax.hist(values[0], bins=bins, alpha=0.6, label=f"inserted ({len(values[0])})")
    hist_ax.hist(values[1], bins=bins, alpha=0.6, label=f"held out ({len(values[1])})")
    hist_ax.set_xlabel(f"canary statistic: {audit['statistic']}")
    hist_ax.set_ylabel("canaries")
    hist_ax.set_title(audit["kind"].split(":")[0])
    hist_ax.legend()
    accountant = float(audit["accountant_epsilon"])
    bars = [("lower bound\n(95 %)", float(audit["epsilon_lower_bound"]), "tab:green")]
    estimate = audit.get("empirical_is") == "estimate"
    if estimate:
        bars.append(("estimate\n(one-shot)", float(audit["empirical_epsilon"]), "tab:orange"))
    bars.append(("accountant", accountant, "tab:blue"))
    reference = audit.get("estimate_reference") if estimate else None
    low, high = audit["interval"]
    finite = [v for _, v, _ in bars if math.isfinite(v)]
    finite += [high] if estimate and math.isfinite(high) else []
    finite += [reference["high"]] if reference else []
    top = 1.25 * max(finite + [1.0])
    if reference:  # where a mechanism at the accountant's ε puts the estimate (95 %)
        eps_ax.axhspan(reference["low"], reference["high"], color="tab:blue", alpha=0.12,
                       label=f"estimate at ε {reference['epsilon']:.3g} (95 % of runs)")
        eps_ax.legend(loc="upper left", fontsize=8)
    drawn = eps_ax.bar(range(len(bars)), [min(v, top) for _, v, _ in bars],
                       color=[c for _, _, c in bars])
    if estimate and math.isfinite(high):
        value = float(audit["empirical_epsilon"])
        eps_ax.errorbar([1], [value], yerr=[[value - low], [high - value]], color="black",
                        capsize=6)
    for bar, (_, value, _) in zip(drawn, bars, strict=True):
        text = "∞" if math.isinf(value) else f"{value:.3g}"
        eps_ax.text(bar.get_x() + bar.get_width() / 2, min(value, top), text, ha="center",
                    va="bottom")
    eps_ax.set_xticks(range(len(bars)), [name for name, _, _ in bars])
    eps_ax.set_ylim(0, top * 1.1)
    eps_ax.set_ylabel(f"ε at δ = {audit['delta']:g}")
    if audit["violation"]:
        eps_ax.set_title("VIOLATION: lower bound above the accountant's ε", color="red")
    elif audit.get("estimate_high"):
        eps_ax.set_title("estimate above its reference range (not a proof)", color="darkorange")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
