"""Benchmarks of the pruning cost and of pruned models' speed (``make bench``, ``scripts/bench.py``).

- ``reference.py``: the straightforward K-prune schedule the fast one is checked and timed against;
- ``latency.py``: latency and throughput of a model at a batch size and sequence length;
"""
