"""Custom Flower strategies, one per file; they depend on flwr and numpy only, never on fedtune."""
