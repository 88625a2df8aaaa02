"""The pipeline's stages as plain functions: built-in model and data names, evaluation, fine-tuning,
latency, the report, the out-of-memory safeguard, the demo model; the stages ``kprune run`` shares
with the Python API (``stages.py``), and that API (``api.py``: ``prune``, ``save_pruned``).
"""
