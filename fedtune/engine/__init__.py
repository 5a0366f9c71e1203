"""Runtimes that drive the same ServerApp and ClientApp: in-process and Flower's simulation."""
