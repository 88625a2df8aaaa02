"""kprune: retraining-free pruning of fine-tuned encoders (K-prune, ICLR 2024)."""

__version__ = "0.1.0"
