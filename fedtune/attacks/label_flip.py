"""Label flipping (Tolpegin et al. 2020, "Data poisoning attacks against federated learning
systems"; Fang et al. 2020): an attacker trains on its own examples with every label ``y``
replaced by ``num_labels - 1 - y``."""

from __future__ import annotations

import numpy as np

from fedtune.attacks.plan import AttackPlan
from fedtune.attacks.poisoned_data import Encode, Poisoning, appended, take
from fedtune.data.encode import Encoded
from fedtune.data.federation import Federation


def flipped_labels(plan: AttackPlan, federation: Federation, encoded: Encoded,
                   encode: Encode, seed: int) -> Poisoning:
    """Every attacker's training rows copied with flipped labels."""
    num_labels = federation.data.num_labels
    train_rows: dict[int, np.ndarray] = {}
    for client in plan.attackers:
        rows = federation.client_train_rows[client]
        labels = num_labels - 1 - federation.data.labels[rows]
        federation, encoded, new_rows = appended(federation, encoded, rows, labels,
                                                 take(encoded, rows))
        train_rows[client] = new_rows
    return Poisoning(federation, encoded, train_rows)
