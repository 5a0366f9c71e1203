"""Runtimes that drive the same ServerApp and ClientApp: the fast Ray engine, in-process, and
Flower's simulation."""
