"""The fedlora Flower ServerApp and its strategies."""
