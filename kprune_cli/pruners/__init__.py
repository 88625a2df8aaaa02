"""The pruning methods: one folder per method (``kprune``, ``kwon``, ``magnitude``, ``random``), the
``PruneProblem`` -> ``PruneResult`` contract (``base.py``) and their shared blocks (``common/``)."""
