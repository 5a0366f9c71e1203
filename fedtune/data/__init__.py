"""Offline datasets, partitioners, encodings and loaders."""
