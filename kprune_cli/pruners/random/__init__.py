"""Random pruning under the FLOPs budget: a seeded floor for comparison tables."""
