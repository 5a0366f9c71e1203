"""Personalisation: each client's own model beside the global one (``strategy.name`` of a
personalised strategy; ``fedtune.tables.strategies`` names the algorithm of each).

Every algorithm is a ``Personalisation`` (``base.py``) in its own module: how a client trains
in a round (what its reply carries: the shared part; what it keeps: its state) and what its
personalised model is. ``evaluation.py`` evaluates every client's global, personalised and
local-only models on its own local test split; ``stats.py`` summarises the distribution.
"""
