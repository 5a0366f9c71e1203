"""The ServerApp wing: a run set up, its rounds played, their listeners (docs/architecture.md)."""
