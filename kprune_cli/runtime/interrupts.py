"""Ctrl-C and SIGTERM inside a job: raised as exceptions, never lost.

:func:`catchable_interrupts` (around a job) makes SIGTERM raise :class:`Terminated`, a
``KeyboardInterrupt``, so both signals unwind the job the same way (it cleans up and marks its
directory failed). Python runs signal handlers between any two bytecodes, so an interrupt can be
raised where code swallows it; two such places are handled:

- finalisers (``__del__``): Python only prints what they raise. Such an interrupt is sent again
  from another thread, so it is raised once the finaliser has returned;
- library code that catches every exception, such as the bare ``except:`` around the
  fingerprint hashing of ``datasets`` transforms. Code that calls into it runs under
  :func:`deferred_interrupts`: an interrupt arriving there is held and raised when the block ends.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

REDELIVERY_DELAY_S = 0.05
"""Seconds after which an interrupt swallowed in a finaliser is sent again."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the job like Ctrl-C's KeyboardInterrupt, so it cleans up the same way."""

    exit_code = 128 + signal.SIGTERM


class _Deferral:
    """How many :func:`deferred_interrupts` blocks are open, and the interrupt held meanwhile."""

    depth = 0
    pending: KeyboardInterrupt | None = None


def _interrupt(error: KeyboardInterrupt) -> None:
    """Raise ``error`` from a signal handler, or hold it while a :func:`deferred_interrupts` block is open."""
    if _Deferral.depth:
        _Deferral.pending = _Deferral.pending or error
        return
    raise error


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold an interrupt that arrives in the block (under :func:`catchable_interrupts`) and raise it
    when the block ends: for calls into code that would swallow it. Usable as a decorator."""
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        pending = None
        if not _Deferral.depth:  # the outermost block: the held interrupt leaves with it, raised or not
            pending, _Deferral.pending = _Deferral.pending, None
    if pending is not None:
        raise pending


def _set_by_submitit(handler: object) -> bool:
    """Whether ``handler`` is submitit's (a job it runs): submitit ignores SIGTERM, which SLURM sends
    at preemption, and checkpoints and requeues the job on its own signal (kprune_cli/sweeps/launchers.py)."""
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit.")


@contextmanager
def catchable_interrupts() -> Iterator[None]:
    """While the block runs in the main thread: SIGTERM raises :class:`Terminated` (unless submitit
    handles it, in a job it runs), Ctrl-C ``KeyboardInterrupt`` (unless SIGINT is ignored, as in a
    background job), both held inside
    :func:`deferred_interrupts`, and an interrupt swallowed by a finaliser is delivered again.
    The previous handlers and hook are restored after. Elsewhere than in the main thread (where
    no handler can be set), nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        _interrupt(Terminated(f"stopped by {signal.Signals(signum).name}"))

    def interrupt(signum: int, frame: object) -> None:
        _interrupt(KeyboardInterrupt())

    def redeliver(unraisable: "sys.UnraisableHookArgs") -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)
            return
        # Later and from another thread: a signal sent now would be handled here, and swallowed again.
        signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        resend = threading.Timer(REDELIVERY_DELAY_S, os.kill, args=(os.getpid(), signum))
        resend.daemon = True
        resend.start()

    previous_term, previous_hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    if not _set_by_submitit(previous_term):
        signal.signal(signal.SIGTERM, terminate)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_term is None else previous_term)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
