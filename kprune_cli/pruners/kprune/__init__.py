"""K-prune (Park, Choi, Kang; ICLR 2024), one stage per file.

- ``measure.py``: knowledge measurement (predictive and representational knowledge, per-FLOP scores);
- ``search.py``: knowledge-preserving mask search (KPMS);
- ``tune.py``: knowledge-preserving weight-tuning (KPWT);
- ``pruner.py``: the schedule (sub-layer-wise iterative, or one-shot) and :class:`KPrunePruner`.
"""
