"""The developer benchmark harness (``make bench``, ``python -m benchmarks``): K-prune's pruning cost
(fast vs reference schedule), its scaling, pruned models' speed and a profile. Not part of the
installed package.

- ``reference.py``: the straightforward K-prune schedule the fast one is checked and timed against;
- ``cases.py``: the models and samples benchmarked (random shapes, MiniLM-MRPC from ``../shared``);
- ``pruning.py`` and ``worker.py``: one pruning run, in-process or in a fresh process;
- ``inference.py``, ``profile.py``: pruned models' speed, where pruning's time goes;
- ``suite.py``, ``tables.py``: the whole run and its printed tables.
"""
