"""The ClientApp wing: a client's training and evaluation (``fedtune.client.app``); it never
imports the server wing (``docs/architecture.md``)."""
