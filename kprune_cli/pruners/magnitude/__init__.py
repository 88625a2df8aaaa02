"""Weight-magnitude pruning: a data-free floor for comparison tables."""
