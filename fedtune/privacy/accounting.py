"""ε of repeated Poisson-subsampled Gaussian mechanisms, computed by opacus.accountants.

A *history* is Opacus' own accountant format: a list of ``(noise_multiplier, sample_rate,
steps)``, one entry per run of identical steps. The same functions serve a client's DP-SGD
steps (sample-level DP, Abadi et al. 2016) and the server's DP-FedAvg rounds (user-level DP,
McMahan et al. 2018): each step or round samples every record (example or client) with
probability ``sample_rate`` and adds Gaussian noise of ``noise_multiplier`` times the
sensitivity. Accountants: ``rdp`` (Rényi DP of the subsampled Gaussian, Mironov et al. 2019)
and ``prv`` (numerical composition of privacy random variables, Gopi et al. 2021, tighter).
Pure math, no I/O.

RDP composes additively (Mironov 2017), so the ε of a history needs the RDP of one step per
(σ, q) pair, cached here, times that pair's step count: a server that accounts every client
every round, and a client searching its step budget, pay the costly series once per pair, not
once per question. The state of an account stays the history (a few numbers a client).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import opacus
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier

from fedtune.errors import ConfigError
from fedtune.tables.privacy_modes import MAX_NOISE_MULTIPLIER, smallest_epsilon

MECHANISMS = ("rdp", "prv")
# the PRV accountant's memory and time grow with the steps it composes (10,000: about 2 s and
# 0.5 GB for one ε on this machine, 100,000: 30 s and 1.5 GB); a plan evaluates ε many times
MAX_PRV_COMPOSITIONS = 10_000
ACCOUNTANT_LIBRARY = f"opacus {opacus.__version__} accountants"  # what computes every ε

HistoryEntry = tuple[float, float, int]


def compose(history: Sequence[HistoryEntry], noise_multiplier: float, sample_rate: float,
            steps: int) -> list[HistoryEntry]:
    """``history`` followed by ``steps`` more steps (merged into the last entry when equal)."""
    out = [(float(n), float(q), int(s)) for n, q, s in history]
    if steps <= 0:
        return out
    if out and out[-1][:2] == (float(noise_multiplier), float(sample_rate)):
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def total_steps(history: Sequence[HistoryEntry]) -> int:
    return sum(int(s) for _, _, s in history)


def epsilon(history: Sequence[HistoryEntry], delta: float, mechanism: str) -> float:
    """ε spent by ``history`` at ``delta``: 0 without steps, inf if any step had no noise."""
    steps = tuple((float(n), float(q), int(s)) for n, q, s in history if s > 0)
    if not steps:
        return 0.0
    if any(n <= 0 for n, _, _ in steps):
        return math.inf
    return _epsilon(steps, delta, mechanism)


@lru_cache(maxsize=4096)  # clients ask for the same histories round after round
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, mechanism: str) -> float:
    if mechanism == "rdp":
        return _rdp_epsilon(history, delta)
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)  # pairs: a client's σ and q follow from its batch count alone
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Rényi DP of one subsampled Gaussian step at Opacus' default orders (the costly part of
    an RDP ε: a series per fractional order, 10 to 500 ms; the rest takes microseconds)."""
    rdp = privacy_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                       steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)  # shared by every history with this step
    return rdp


def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """``RDPAccountant.get_epsilon`` of ``history``, composed from cached one-step RDP (RDP
    adds up over steps, Mironov 2017): the same operations in the same order as Opacus (its
    ``compute_rdp`` multiplies the one-step RDP by the steps, then the entries are summed),
    so the same bits, while the histories of a run - a server accounting hundreds of clients,
    a client searching its step budget - share a few (σ, q) pairs instead of each paying for
    every order's series. Step counts, not running RDP sums, are what an account keeps: adding
    each round's RDP to a kept vector can round differently from Opacus' one product."""
    rdp = sum([_rdp_of_one_step(noise, rate) * steps for noise, rate, steps in history])
    eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                                delta=delta)
    return float(eps)


@lru_cache(maxsize=1024)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     mechanism: str) -> float:
    """The smallest noise multiplier (to 0.01 in ε) whose ``steps`` stay within the target.

    ``target_epsilon = inf`` asks for no noise (clipping only). Opacus' search doubles the
    noise until ε fits (up to 10^6, each ε taking longer than the last); a target within twice
    the least ε any noise gives is first checked against ``MAX_NOISE_MULTIPLIER``, so an
    unreachable one is refused in seconds, by name.
    """
    if math.isinf(target_epsilon):
        return 0.0
    if target_epsilon < 2 * smallest_epsilon(delta):
        ceiling = epsilon([(MAX_NOISE_MULTIPLIER, sample_rate, max(1, steps))], delta, mechanism)
        if ceiling > target_epsilon:
            raise ConfigError(
                f"privacy.target_epsilon = {target_epsilon:g} is not allowed for {steps} steps "
                f"at sampling rate {sample_rate:g}: must be >= {ceiling:.4g}, what noise "
                f"multiplier {MAX_NOISE_MULTIPLIER:g} (the most fedtune adds) spends")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=max(1, steps),
                                      accountant=mechanism))


def steps_within_budget(history: Sequence[HistoryEntry], noise_multiplier: float,
                        sample_rate: float, wanted: int, target_epsilon: float, delta: float,
                        mechanism: str) -> int:
    """The most steps (at most ``wanted``) after which ε is still <= ``target_epsilon``.

    ε only grows with every step, so a binary search over the step count finds it.
    """
    if math.isinf(target_epsilon):
        return wanted

    def fits(steps: int) -> bool:
        spent = epsilon(compose(history, noise_multiplier, sample_rate, steps), delta, mechanism)
        return spent <= target_epsilon

    if fits(wanted):
        return wanted
    fitting, too_many = 0, wanted
    while too_many - fitting > 1:
        middle = (fitting + too_many) // 2
        if fits(middle):
            fitting = middle
        else:
            too_many = middle
    return fitting


def epsilon_by_accountants(noise_multiplier: float, sample_rate: float, steps: int,
                           delta: float) -> dict[str, float | None]:
    """ε of ``steps`` identical Poisson-subsampled Gaussian steps by both accountants (PRV
    only up to ``MAX_PRV_COMPOSITIONS`` steps, None beyond)."""
    history = [(noise_multiplier, sample_rate, steps)]
    return {"rdp": epsilon(history, delta, "rdp"),
            "prv": epsilon(history, delta, "prv") if steps <= MAX_PRV_COMPOSITIONS else None}


def history_to_lists(history: Sequence[HistoryEntry]) -> dict[str, list]:
    """Columns of a history (what a Flower ConfigRecord can hold)."""
    return {"noise": [float(n) for n, _, _ in history],
            "rate": [float(q) for _, q, _ in history],
            "steps": [int(s) for _, _, s in history]}


def history_from_lists(columns: Mapping[str, Sequence]) -> list[HistoryEntry]:
    """Inverse of ``history_to_lists``."""
    return [(float(n), float(q), int(s)) for n, q, s in
            zip(columns["noise"], columns["rate"], columns["steps"], strict=True)]
