"""Per-client state that lives across rounds: a client side's variates, a local DP accountant,
a personal model. ``codec`` turns a client's state (a Flower ``RecordDict``) into bytes and
back (``arrays``: one ArrayRecord of it read and replaced in the bytes, for clients trained
together), ``blobs`` keeps such bytes on disk in files named by their SHA-256, and ``store``
is the memory-bounded store every fedtune simulation runtime keeps its clients' state in
(checkpoints: ``fedtune.server.checkpoint``; a deployment's SuperNodes:
``fedtune.client.node_state``).
"""
