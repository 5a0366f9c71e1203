"""Every privacy mode fedtune offers, one entry each (``privacy.mode``).

An entry declares the ``[privacy]`` keys the mode owns and its config checks, and names its
implementation, a ``fedtune.privacy.mode.PrivacyMode`` (``fedtune/privacy/<mode>.py``): the
plan fixed before the run (σ), how it wraps the strategy, how a client trains under it, and the
server's state during the run. Adding a mode: write that class and add one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.tables import Entry, Key, ReplyMetric
from fedtune.tables.strategies import STRATEGIES, check_secure_cohort

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.privacy.mode import PrivacyMode

ACCOUNTANTS = ("rdp", "prv")

# the PRV accountant's memory and time grow with the steps it composes (10,000: about 2 s and
# 0.5 GB for one ε on this machine, 100,000: 30 s and 1.5 GB); a plan evaluates ε many times
# (fedtune.privacy.accounting.MAX_PRV_COMPOSITIONS is the same bound; tables load no opacus)
MAX_PRV_COMPOSITIONS = 10_000
# a noise multiplier below this spends an ε of tens of thousands (the RDP and PRV accountants
# overflow or take minutes further down); above the maximum the noise drowns every update and
# each ε takes seconds
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 0.01, 1000.0
# the Rényi orders of opacus.accountants.RDPAccountant.DEFAULT_ALPHAS
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks")


@dataclass(frozen=True)
class PrivacyModeEntry(Entry):
    mechanism: bool = True  # it adds a privacy mechanism (False: the mode without privacy)
    asynchronous_refused: str = ""  # why it cannot run an asynchronous strategy ("" = it can)
    spends_budget: bool = False  # reports ε every round (and plots it)
    # its implementation's ``strategy`` replaces the configured strategy's aggregation (the
    # strategy entry's ``dp_server_optimizer`` says what it keeps of it)
    replaces_strategy: bool = False
    # under SecAgg+, what weights a client's input instead of the strategy's ``sum_weight``
    # ("1": the replacement sums the clients' updates unweighted); "" = the strategy's
    sum_weight: str = ""
    # what privacy.audit inserts: "examples" (sample-level canaries, Steinke et al. 2023) or
    # "clients" (user-level canary clients in the aggregation, Andrew et al. 2024)
    audit_inserts: str = "examples"
    check: Callable[[Config], None] | None = None
    # what its clients add to a training reply (``fedtune.protocol`` builds the reply schema)
    reply_metrics: Mapping[str, ReplyMetric] = field(default_factory=dict)
    reply_status: bool = False  # a training reply carries the ConfigRecord "status"
    declines: bool = False  # a client may answer "no update: my privacy budget is spent"
    client_accountants: bool = False  # each client's ε lives in its Context.state
    # its clients draw DP noise themselves (local DP), or do so under SecAgg+ (distributed DP):
    # such a client refuses noise seeded from run.seed unless its node config allows it
    client_noise: bool = False
    secure_aggregation_client_noise: bool = False


def smallest_epsilon(delta: float) -> float:
    """The ε the RDP accountant certifies for infinite noise at ``delta``: no target below it
    can be reached. Every order's RDP is 0 then, and Opacus' conversion (Balle et al. 2020,
    Theorem 21: ``eps = rdp - (log delta + log a) / (a - 1) + log((a - 1) / a)``) leaves
    its smallest value over the orders; pure math, so the config checks it without torch."""
    return min(-(math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
               for a in RDP_ORDERS)


def _check_budget(config: Config) -> None:
    """Exactly one of target_epsilon and noise_multiplier (both DP modes), each in the range
    an accountant can handle (a noise search for a smaller target runs for minutes and
    fails)."""
    p = config.privacy
    if 0 < p.noise_multiplier < MIN_NOISE_MULTIPLIER:
        raise ConfigError(
            f"privacy.noise_multiplier = {p.noise_multiplier!r} is not allowed: must be 0 "
            f"(derived from privacy.target_epsilon) or >= {MIN_NOISE_MULTIPLIER:g} (below, ε is "
            "tens of thousands and the accountants overflow)")
    floor = smallest_epsilon(p.delta)
    if 0 < p.target_epsilon <= floor:
        raise ConfigError(
            f"privacy.target_epsilon = {p.target_epsilon:g} is not allowed: must be > "
            f"{floor:.3g}, the ε that even infinite noise spends at privacy.delta = "
            f"{p.delta:g} (RDP accountant), or inf")
    if p.target_epsilon and p.noise_multiplier:
        raise ConfigError(
            f"privacy.noise_multiplier = {p.noise_multiplier:g} is not allowed with "
            f"privacy.target_epsilon = {p.target_epsilon:g}: set one of them (the other = 0)"
        )
    if not p.target_epsilon and not p.noise_multiplier:
        raise ConfigError(
            f"privacy.target_epsilon = 0 is not allowed with privacy.mode = {p.mode!r}: must "
            "be > 0 (inf = no noise), or set privacy.noise_multiplier > 0"
        )


def _check_insecure_noise(config: Config) -> None:
    """Clients that draw their own noise (local DP, SecAgg+'s distributed DP) accept the
    reproducible mode only where fedtune's runtime tells them it is a simulation."""
    p = config.privacy
    own_noise = p.mode == "local" or config.strategy.secure_aggregation
    if p.insecure_reproducible_noise and own_noise and config.engine.backend == "flower":
        raise ConfigError(
            "privacy.insecure_reproducible_noise = true is not allowed with engine.backend = "
            "'flower': must run on 'ray' or 'inprocess' (Flower's simulation starts the "
            "clients, whose node configs do not allow noise the server can rebuild)")


def check_prv_compositions(config: Config, compositions: int, what: str) -> None:
    """The PRV accountant only for as many compositions as it can hold."""
    if config.privacy.accountant == "prv" and compositions > MAX_PRV_COMPOSITIONS:
        raise ConfigError(
            f"privacy.accountant = 'prv' is not allowed for {compositions:,} {what}: must be "
            f"'rdp' beyond {MAX_PRV_COMPOSITIONS:,} (PRV's memory grows with every step it "
            "composes)"
        )


def _check_local(config: Config) -> None:
    _check_budget(config)
    _check_insecure_noise(config)
    if config.client.local_steps:  # with local_epochs the steps depend on the data
        rounds = config.privacy.client_rounds or config.run.rounds
        check_prv_compositions(config, rounds * config.client.local_steps,
                               "DP-SGD steps per client (rounds x client.local_steps)")
    with_client_side = [name for name, entry in STRATEGIES.items() if entry.client]
    if config.strategy.name in with_client_side:
        raise ConfigError(
            f"strategy.name = {config.strategy.name!r} is not allowed with privacy.mode = "
            "'local': must be one without a client-side objective (DP-SGD trains plain "
            f"cross-entropy), not {', '.join(with_client_side)}"
        )
    if config.client.max_grad_norm:
        raise ConfigError(
            f"client.max_grad_norm = {config.client.max_grad_norm:g} is not allowed with "
            "privacy.mode = 'local': must be 0 (privacy.max_grad_norm clips every example)"
        )


def _check_central(config: Config) -> None:
    _check_budget(config)
    _check_insecure_noise(config)
    check_prv_compositions(config, config.run.rounds, "rounds (run.rounds)")
    p = config.privacy
    if config.strategy.update_norm_z:
        raise ConfigError(
            f"strategy.update_norm_z = {config.strategy.update_norm_z:g} is not allowed with "
            "privacy.mode = 'central': must be 0 (whether it keeps a client would depend on "
            "every other client's norm, so one client's sensitivity is no longer clip_norm "
            "and epsilon would not bound it; strategy.max_update_norm is a fixed bound and "
            "allowed)"
        )
    if p.clipped_count_stddev and p.count_budget_share:
        raise ConfigError(
            f"privacy.count_budget_share = {p.count_budget_share:g} is not allowed with "
            f"privacy.clipped_count_stddev = {p.clipped_count_stddev:g}: set one of them (the "
            "other = 0)"
        )
    if p.delta >= 1 / config.data.num_clients:
        raise ConfigError(
            f"privacy.delta = {p.delta:g} is not allowed: must be < 1/data.num_clients = "
            f"{1 / config.data.num_clients:g} (user-level DP protects each client)"
        )
    entry = STRATEGIES[config.strategy.name]
    if entry.dp_release:
        _check_central_release(config)
    elif entry.asynchronous:  # refused with this mode's asynchronous_refused (tables/devices)
        pass
    elif entry.dp_server_optimizer is None:
        allowed = [name for name, entry in STRATEGIES.items() if entry.dp_server_optimizer]
        raise ConfigError(
            f"strategy.name = {config.strategy.name!r} is not allowed with privacy.mode = "
            "'central': must be " + ", ".join(repr(n) for n in allowed)
            + " (DP-FedAvg replaces the aggregation; the strategy's server optimizer runs on "
            "the noised mean)"
        )
    # Poisson sampling: the expected cohort decides what a secure sum reveals
    check_secure_cohort(config, config.strategy.fraction_train * config.data.num_clients)
    if config.strategy.secure_aggregation and p.adaptive_clipping:
        raise ConfigError(
            "privacy.adaptive_clipping = true is not allowed with strategy.secure_aggregation "
            "= true: must be false (the count of unclipped updates would need a second secure "
            "sum)")
    noisy = p.noise_multiplier > 0 or not math.isinf(p.target_epsilon)
    if math.isinf(p.clip_norm) and (noisy or p.audit):
        raise ConfigError(
            "privacy.clip_norm = inf is not allowed with "
            + ("privacy.audit = true" if not noisy else "noise")
            + ": must be finite (the noise std is noise_multiplier x clip_norm, and canary "
            "clients send clip_norm x a unit direction); inf only with target_epsilon = inf"
        )


def _check_central_release(config: Config) -> None:
    """Central DP under an asynchronous strategy that releases a noised buffer
    (``strategies.dp_fedbuff``): a fixed clipping bound and a buffer that distinct clients
    can fill (each adds at most one update to a release)."""
    p, s = config.privacy, config.strategy
    name = repr(s.name)
    if p.adaptive_clipping:
        raise ConfigError(
            f"privacy.adaptive_clipping = true is not allowed with strategy.name = {name}: "
            "must be false (adapting the bound needs a noised count of unclipped updates per "
            "release, which the buffered release does not draw yet)")
    if s.fedbuff_buffer_size > config.data.num_clients:
        raise ConfigError(
            f"strategy.fedbuff_buffer_size = {s.fedbuff_buffer_size} is not allowed with "
            f"privacy.mode = 'central': must be <= data.num_clients = "
            f"{config.data.num_clients} (each client adds at most one update to a release)")


TARGET_EPSILON = Key(0.0, "ε the run may spend (local: per client, central: for the run); inf "
                          "= clip without noise; 0 = not set (then give noise_multiplier)", ge=0,
                     infinite=True)
DELTA = Key(1e-5, "δ of the (ε, δ) guarantee; must be < 1/N (local: N = examples of the "
                  "smallest client, central: N = data.num_clients)", gt=0, lt=1)
NOISE_MULTIPLIER = Key(0.0, "Gaussian noise std / clipping bound; 0 = derived from "
                            "target_epsilon", ge=0, le=MAX_NOISE_MULTIPLIER)
ACCOUNTANT = Key("rdp", "privacy accountant (opacus.accountants)", choices=ACCOUNTANTS)
INSECURE_NOISE = Key(False, "NOT PRIVATE: draw the DP noise and sampling from generators "
                            "seeded by run.seed so runs repeat exactly; anyone with the run's "
                            "config can then remove the noise. For comparing simulations only: "
                            "summary.json and the terminal say 'not private', and a SuperNode "
                            "refuses it unless its node config allows it "
                            "(insecure-noise-allowed = true)")
BUDGET_KEYS = {"target_epsilon": TARGET_EPSILON, "delta": DELTA,
               "noise_multiplier": NOISE_MULTIPLIER, "accountant": ACCOUNTANT,
               "insecure_reproducible_noise": INSECURE_NOISE}

AUDIT = Key(False, "empirical privacy audit after the run (audit.json, plots/audit.png): "
                   "central = canary clients (Andrew et al. 2024), local and none = canary "
                   "examples (Steinke et al. 2023); canaries never enter the test sets")
AUDIT_EXAMPLES = {"audit": AUDIT,
                  "audit_examples": Key(200, "audit: canary examples with random labels, "
                                             "half of them added to random clients' data",
                                        ge=2)}
AUDIT_CLIENTS = {"audit": AUDIT,
                 "audit_canaries": Key(1000, "audit: canary clients, half of them inserted "
                                             "into a shadow release; each draws a random "
                                             "direction over the trained weights every round "
                                             "it is sampled", ge=2)}

PRIVACY_MODES: dict[str, PrivacyModeEntry] = {
    "none": PrivacyModeEntry("no privacy mechanism", keys=AUDIT_EXAMPLES,
                             implementation="fedtune.privacy.none:NoPrivacy", mechanism=False),
    "local": PrivacyModeEntry(
        "DP-SGD on every client (per example, Opacus)",
        keys={**BUDGET_KEYS,
              "max_grad_norm": Key(1.0, "clipping bound of every example's gradient", gt=0),
              "grad_sample_mode": Key(
                  "auto", "ghost = ghost clipping (no per-example gradients kept), hooks = "
                          "per-example gradients; auto = ghost unless the model ties "
                          "parameters", choices=GRAD_SAMPLE_MODES),
              "client_rounds": Key(
                  0, "rounds each client plans to train; its noise makes ε reach "
                     "target_epsilon after client_rounds x its steps per round; 0 = "
                     "run.rounds", ge=0),
              **AUDIT_EXAMPLES},
        implementation="fedtune.privacy.local:LocalDP", spends_budget=True,
        check=_check_local,
        # the keys are fedtune.protocol's EPSILON, NOISE_MULTIPLIER, SAMPLE_RATE (a test ties
        # them); ε is left out while it is infinite (no noise)
        reply_metrics={"epsilon": ReplyMetric(float, required=False, ge=0),
                       "noise-multiplier": ReplyMetric(float, ge=0),
                       "sample-rate": ReplyMetric(float, gt=0, le=1)},
        reply_status=True, declines=True, client_accountants=True, client_noise=True),
    "central": PrivacyModeEntry(
        "DP-FedAvg at the server (per client); each client is sampled with probability "
        "strategy.fraction_train; strategy.name = fedavgm or fedadam runs that server "
        "optimizer on the noised mean (DP-FedAvgM, DP-FedAdam)",
        keys={**BUDGET_KEYS,
              "clip_norm": Key(0.1, "clipping bound of every client's update; with "
                                    "adaptive_clipping the starting bound (start small: the "
                                    "bound grows by up to exp(clip_lr x target_quantile) a "
                                    "round); inf = no clipping (only without noise)",
                           gt=0, infinite=True),
              "adaptive_clipping": Key(
                  True, "move the bound towards the target_quantile of update norms (Andrew "
                        "et al. 2021). Recommended: keep it, with target_quantile 0.5, clip_lr "
                        "0.2 and a small clip_norm (TFF's defaults), and read the bound it "
                        "found in metrics.csv clip_norm; the noised unclipped count takes "
                        "count_budget_share of the budget"),
              "target_quantile": Key(0.5, "adaptive: share of updates left unclipped", gt=0,
                                     lt=1),
              "clip_lr": Key(0.2, "adaptive: geometric step size of the bound", gt=0),
              "clipped_count_stddev": Key(0.0, "adaptive: noise std of the centred unclipped "
                                               "count (sensitivity 1/2); 0 = from "
                                               "count_budget_share", ge=0),
              "count_budget_share": Key(
                  0.0, "adaptive: share of the privacy budget (of noise^-2, as Gaussian "
                       "mechanisms compose) spent on the unclipped count; the update noise "
                       "becomes noise / sqrt(1 - share). 0 = automatic, recommended: Andrew et "
                       "al.'s count std (expected cohort / 20) if that takes at most 0.1, else "
                       "0.1 (small cohorts: the clip bound then follows the quantile more "
                       "noisily; more than 0.1 buys little and costs accuracy)", ge=0, lt=1),
              **AUDIT_CLIENTS},
        implementation="fedtune.privacy.central_dp:CentralDP", spends_budget=True,
        audit_inserts="clients", check=_check_central, replaces_strategy=True,
        # DP-FedAvg sums the clients' clipped updates unweighted (a fixed-denominator estimator)
        sum_weight="1", secure_aggregation_client_noise=True,
        # an asynchronous strategy with a ``dp_release`` (FedBuff) runs under it
        asynchronous_refused=(
            "must be 'none' or 'local', or strategy.name = 'fedbuff' (central DP noises a "
            "release of many clipped updates: FedBuff's buffer; FedAsync releases a model "
            "after every single update, so each release would carry one client's update under "
            "noise of its own size)")),
}


def check_privacy(config: Config) -> None:
    """The chosen mode's checks that involve other keys (data-dependent ones: the mode's
    ``check_data``)."""
    entry = PRIVACY_MODES[config.privacy.mode]
    if entry.check is not None:
        entry.check(config)


def privacy_mode(config: Config) -> PrivacyMode:
    """The chosen mode's implementation (``fedtune.privacy.mode.PrivacyMode``)."""
    return PRIVACY_MODES[config.privacy.mode].load()()
