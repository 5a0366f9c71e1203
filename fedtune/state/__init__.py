"""Per-client state that lives across rounds: a client side's variates, a local DP accountant,
a personal model. ``codec`` turns a client's state (a Flower ``RecordDict``) into bytes and
back, ``blobs`` keeps such bytes on disk under their SHA-256, ``store`` is the memory-bounded
store every fedtune runtime keeps its clients' state in, and ``checkpoints`` read and write
it for the server's checkpoints.
"""
