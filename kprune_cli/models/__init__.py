"""Encoder families and what is done to them: layouts (``modeling_kprune.py``), role adapters,
keep-masks, physical slicing, loading, pruned checkpoints and the FLOPs model (docs/design.md §4-5)."""
