"""Encoder families and what is done to them: one module per family (``families/``), role adapters,
keep-masks, physical slicing, loading, pruned checkpoints and the FLOPs model (docs/design.md §4-5)."""
