"""K-prune (Park, Choi, Kang; ICLR 2024), one stage per file.

- ``measure.py``: knowledge measurement (predictive and representational knowledge, per-FLOP scores);
- ``tune.py``: knowledge-preserving weight-tuning (KPWT);
- ``pruner.py``: the schedule (sub-layer-wise iterative, or one-shot) and :class:`KPrunePruner`.

The mask search, KPMS, is a shared block (the magnitude and random pruners use it too):
:mod:`kprune_cli.pruners.common.kpms`.
"""
