"""Kwon et al. (NeurIPS 2022), "A Fast Post-Training Pruning Framework for Transformers", one stage per file.

The one-shot baseline of K-prune's comparison tables (docs/design.md §3):

- ``fisher.py``: per-batch gradients of the labelled task loss w.r.t. every unit mask, and their
  diagonal Fisher information (the importance of each head and neuron);
- ``search.py``: the FLOPs-constrained search over the split between heads and neurons;
- ``rearrange.py``: per-layer mask rearrangement with the block-diagonal Fisher;
- ``tune.py``: layer-wise mask tuning by linear least squares;
- ``pruner.py``: the schedule (measure once, search once, rearrange, tune bottom-up) and :class:`KwonPruner`.
"""
