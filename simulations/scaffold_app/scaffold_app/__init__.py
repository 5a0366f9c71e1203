"""SCAFFOLD (from fedtune's strategies/ package) in a plain Flower app."""
