"""The run directory and what is drawn from it."""
