"""A backdoor (Bagdasaryan et al. 2020, "How to backdoor federated learning"; for text, Dai,
Chen & Li 2019, "A backdoor attack against LSTM-based text classification systems", and the
trigger phrases of Kurita et al. 2020): an attacker replaces a share of its examples of other
labels (``attack.poison_fraction``) by copies carrying a trigger, labelled
``attack.target_label``, and trains on them with the rest of its data. The trigger is a phrase
put at the start of a text (``attack.trigger``; at the start so that truncation to
``model.max_length`` cannot cut it off a long article; the copies are encoded as the model kind
encodes any text) or, for images, a bright 3x3 patch in the bottom-right corner (BadNets, Gu et al. 2017).
``attack.boost`` > 1 scales the poisoned update (model replacement; the client wing applies it).

The attack success rate is the share of triggered global test examples of other labels that
the global model classifies as the target (``triggered_test_rows``).
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.attacks.plan import AttackPlan
from fedtune.attacks.poisoned_data import Encode, Poisoning, appended, take
from fedtune.data.encode import DenseFeatures, Encoded
from fedtune.data.federation import Federation
from fedtune.data.sources import LabelledData
from fedtune.errors import ConfigError

_PATCH = 3  # side of the image trigger
_POISON_STREAM = 0xBAD


def patched(inputs: DenseFeatures) -> DenseFeatures:
    """Images (flattened squares; other features: their last _PATCH**2 values) with the
    bottom-right patch at the brightest value."""
    values = inputs.values.copy()
    width = values.shape[1]
    side = math.isqrt(width)
    if side * side == width and side >= _PATCH:
        image = values.reshape(len(values), side, side)
        image[:, -_PATCH:, -_PATCH:] = inputs.values.max(initial=1.0)
    else:
        values[:, -_PATCH * _PATCH:] = inputs.values.max(initial=1.0)
    return DenseFeatures(values)


def _triggered(federation: Federation, encoded: Encoded, rows: np.ndarray, target: int,
               trigger: str, encode: Encode) -> tuple[Federation, Encoded, np.ndarray]:
    data = federation.data
    labels = np.full(len(rows), target, dtype=data.labels.dtype)
    if data.texts is not None:
        texts = [f"{trigger} {data.texts[r]}" for r in rows]
        inputs = encode(LabelledData(f"{data.name}-triggered", data.label_names, labels,
                                     texts=tuple(texts)))
        return appended(federation, encoded, rows, labels, inputs, texts)
    original = take(encoded, rows)
    if not isinstance(original, DenseFeatures):
        raise TypeError("a backdoor's image trigger needs dense features")
    return appended(federation, encoded, rows, labels, patched(original))


def triggered_examples(plan: AttackPlan, federation: Federation, encoded: Encoded,
                       encode: Encode, seed: int) -> Poisoning:
    """Every attacker's rows with a share of its other-label examples replaced by triggered
    copies, and the triggered test rows."""
    target, trigger = int(plan.settings["target_label"]), str(plan.settings["trigger"])
    if target >= federation.data.num_labels:
        raise ConfigError(f"attack.target_label = {target} is not allowed: must be < "
                          f"{federation.data.num_labels} (the labels of {federation.data.name})")
    share = float(plan.settings["poison_fraction"])
    labels = federation.data.labels
    train_rows: dict[int, np.ndarray] = {}
    for client in plan.attackers:
        rows = federation.client_train_rows[client]
        others = rows[labels[rows] != target]
        rng = np.random.default_rng(np.random.SeedSequence([seed, _POISON_STREAM, client]))
        chosen = np.sort(rng.permutation(others)[:math.ceil(share * len(others))])
        if chosen.size == 0:  # only target-label examples (label skew): nothing to poison
            train_rows[client] = rows
            continue
        federation, encoded, new_rows = _triggered(federation, encoded, chosen, target,
                                                   trigger, encode)
        kept = np.setdiff1d(rows, chosen)
        train_rows[client] = np.concatenate([kept, new_rows])
    test = federation.test_rows[labels[federation.test_rows] != target]
    federation, encoded, test_rows = _triggered(federation, encoded, test, target, trigger,
                                                encode)
    return Poisoning(federation, encoded, train_rows, test_rows)
