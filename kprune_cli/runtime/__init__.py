"""Job infrastructure with no ML in it: the output directory and its lock, interrupts, the console,
timing, user errors, the device and what the hardware offers, peak memory, matmul precision, the
version, and the step checkpoints that keep a pruner's state opaquely (tensors and JSON values)
for ``resume=true``.

This layer imports nothing of ``models``, ``pruners``, ``tasks``, ``core`` or ``cli``
(``tests/test_imports.py`` holds it to that).
"""
