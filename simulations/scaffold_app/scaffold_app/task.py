"""Softmax regression in NumPy on synthetic label-skewed data (each client sees mostly one class)."""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 4
NUM_FEATURES = 10
EXAMPLES_PER_CLIENT = 200
DOMINANT_SHARE = 0.9  # share of a client's examples from its own class


def _class_means() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=1.5, size=(NUM_CLASSES, NUM_FEATURES))


def _sample(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    features = _class_means()[labels] + rng.normal(size=(len(labels), NUM_FEATURES))
    return features, labels


def client_data(partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``partition_id``'s examples: mostly class ``partition_id % NUM_CLASSES``."""
    rng = np.random.default_rng(1000 + partition_id)
    own = partition_id % NUM_CLASSES
    labels = np.where(rng.random(EXAMPLES_PER_CLIENT) < DOMINANT_SHARE, own,
                      rng.integers(NUM_CLASSES, size=EXAMPLES_PER_CLIENT))
    return _sample(labels, rng)


def held_out_data() -> tuple[np.ndarray, np.ndarray]:
    """A balanced held-out set for the server's evaluation."""
    rng = np.random.default_rng(7)
    return _sample(np.arange(1000) % NUM_CLASSES, rng)


def initial_model() -> dict[str, np.ndarray]:
    return {"weight": np.zeros((NUM_CLASSES, NUM_FEATURES)), "bias": np.zeros(NUM_CLASSES)}


def loss_and_gradient(model: dict[str, np.ndarray], features: np.ndarray, labels: np.ndarray
                      ) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy and its gradient."""
    logits = features @ model["weight"].T + model["bias"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))
    probs[np.arange(len(labels)), labels] -= 1
    probs /= len(labels)
    return loss, {"weight": probs.T @ features, "bias": probs.sum(axis=0)}


def accuracy(model: dict[str, np.ndarray], features: np.ndarray, labels: np.ndarray) -> float:
    predicted = np.argmax(features @ model["weight"].T + model["bias"], axis=1)
    return float(np.mean(predicted == labels))
