"""The ServerApp wing: a run's set-up, its rounds and their listeners (``fedtune.server.app``);
it never imports the client wing or an engine (``docs/architecture.md``)."""
