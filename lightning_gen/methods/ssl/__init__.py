"""Self-supervised representation learning methods."""
