"""Interrupts held for a moment: a Ctrl-C (or SIGTERM, SIGHUP) recorded instead of raised while the main thread is
somewhere it must not be interrupted (an import of a C extension, a library's bare `except:`, the lock juggling of
`concurrent.futures.wait`), to be acted on by the caller right after."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence

INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_held(signals: Sequence[signal.Signals] = INTERRUPTS) -> Iterator[list[int]]:
    """Within the block, each of `signals` that the process handles in Python (Ctrl-C's default included) is appended
    to the yielded list instead of running its handler; the handlers are back after. Signals that are ignored or left
    to the system keep their meaning, and outside the main thread (which alone may set handlers) nothing changes."""
    held: list[int] = []
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            handler = signal.getsignal(sig)
            if callable(handler):
                saved[sig] = signal.signal(sig, lambda signum, _frame: held.append(signum))
    try:
        yield held
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def deliver(held: list[int]) -> None:
    """Run the handler of the first signal held, now (Ctrl-C's default: KeyboardInterrupt)."""
    if held:
        signal.raise_signal(held[0])
