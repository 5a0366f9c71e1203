"""Bulyan (Flower's): fedtune's path gives Flower's own aggregate."""

from tests.strategy_messages import assert_flowers_own


def test_bulyan_is_flowers_bulyan_with_its_malicious_count():
    assert_flowers_own("bulyan", ["strategy.num_malicious=1"], {"num_malicious_nodes": 1},
                       num_nodes=7)  # Bulyan needs 4 x num_malicious + 3 replies
