"""Poisoning attacks (the ``[attack]`` section, ``fedtune.tables.attacks``): who attacks
(``plan``), the examples a data attack trains on (``poisoned_data``, ``label_flip``,
``backdoor``) and what an update attack sends instead of its honest update (``scaling``,
``gaussian``, ``alie``, ``ipm``, ``min_max``). Plain numpy functions: the client wing plays
them (``fedtune.client.attacking``), so every runtime does."""
