"""Offline datasets load from installed packages, deduplicated, with stable label order."""

from __future__ import annotations

import numpy as np

from fedtune.data.sources import load_dataset


def test_rotten_tomatoes_is_deduplicated_with_movie_keys():
    data = load_dataset("rotten_tomatoes")
    assert data.label_names == ("fresh", "rotten")
    assert 12_700 <= len(data) <= 12_808  # 12,808 snippets before dropping duplicates
    assert len(set(data.texts)) == len(data)
    assert len(data.keys["movie_name"]) == len(data)
    assert 400 < len(np.unique(data.keys["movie_name"])) < 600  # about 25 snippets a movie
    assert abs(np.mean(data.labels == 0) - 0.578) < 0.01  # fresh is the majority


def test_bbc_news_has_five_sorted_topics_and_no_duplicates():
    data = load_dataset("bbc_news")
    assert data.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert 2_000 < len(data) <= 2_225
    assert len(set(data.texts)) == len(data)
    assert np.bincount(data.labels).min() > 300


def test_digits_are_scaled_pixels():
    data = load_dataset("digits")
    assert data.features.shape[1] == 64
    assert data.features.min() == 0.0 and data.features.max() == 1.0
    assert not data.is_text and data.num_labels == 10
