"""Studies: grids of runs (sweeps), their tables and curves."""
