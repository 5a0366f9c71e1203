"""Distributed DP under SecAgg+: each client's noise share and the quantiser's range.

Each of the round's clients clips its update to L2 norm ``C`` and adds ``N(0, s²)`` per
coordinate with ``s = σC / sqrt(m_min)`` (``share_std``), ``m_min`` being the fewest inputs the
round accepts: a sum of ``m >= m_min`` shares carries at least ``N(0, (σC)²)``, the noise of
central DP (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", section 3, split the noise the same way). If only
``h`` of the survivors add their share, the multiplier is ``σ sqrt(h / m_min)``
(``honest_noise_multiplier``): the guarantee holds while ``h >= m_min``.

The quantiser clips every noised coordinate to ``[-c, c]`` before rounding it with a
subtractive dither (``fedtune.secagg.masking``). Without clipping the decoded sum is the
Gaussian mechanism's real-valued output plus data-independent rounding noise (a
post-processing). A coordinate of an update of norm at most ``C`` is at most ``C``, so the
quantiser clips a noised coordinate only if its noise exceeds ``c - C``: with ``d`` coordinates
and ``m`` clients that happens with probability at most ``η = 2 d m Φ̄((c - C) / s)`` in a
round (``clip_probability``, a union bound). The released mechanism is then within total
variation ``η`` of the unclipped one, so an ``(ε, δ)`` guarantee of the Gaussian becomes
``(ε, δ + (1 + e^ε) Σ η)`` over the rounds. The automatic range (``automatic_clip_range``) makes
``η`` at most ``CLIP_PROBABILITY`` per round.
"""

from __future__ import annotations

import math
from statistics import NormalDist

CLIP_PROBABILITY = 1e-12  # the automatic range's bound on η per round


def share_std(noise_multiplier: float, clip_norm: float, min_survivors: int) -> float:
    """``s``: the std of each client's noise share, ``σC / sqrt(m_min)``."""
    return noise_multiplier * clip_norm / math.sqrt(min_survivors)


def honest_noise_multiplier(noise_multiplier: float, honest: int, min_survivors: int) -> float:
    """The multiplier of the noise in the sum when ``honest`` clients add their share."""
    return noise_multiplier * math.sqrt(honest / min_survivors)


def automatic_clip_range(clip_norm: float, std: float, coordinates: int, clients: int) -> float:
    """``c = C + k s`` with ``2 d m Φ̄(k) = CLIP_PROBABILITY``."""
    tail = CLIP_PROBABILITY / (2 * max(1, coordinates) * max(1, clients))
    return clip_norm + -NormalDist().inv_cdf(tail) * std


def clip_probability(clip_range: float, clip_norm: float, std: float, coordinates: int,
                     clients: int) -> float:
    """``η``: a bound on the probability that the quantiser clips any noised coordinate of
    any of ``clients`` clients in one round (1: no bound, the range is not above ``C``)."""
    if clip_range <= clip_norm:
        return 1.0
    if std == 0:
        return 0.0
    tail = 0.5 * math.erfc((clip_range - clip_norm) / (std * math.sqrt(2)))
    return min(1.0, 2 * coordinates * clients * tail)
