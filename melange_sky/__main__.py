"""The `melange-sky` command (and `python -m melange_sky`).

Loading the command line takes ~0.1 s; a Ctrl-C in that time would print a KeyboardInterrupt traceback from the middle
of an import. Until the CLI has loaded, a Ctrl-C is held, then ends the command with the documented code for an
interruption (130).
"""
import signal
import sys

from melange_sky._signals import signals_held

INTERRUPTED = 130

# While the CLI loads, a Ctrl-C is held and acted on once loading ends (~0.1 s later): raised in the middle of an
# import it could leave a C extension half-initialised (a crash), or be swallowed by a library's bare `except:`.
with signals_held((signal.SIGINT,)) as _held:
    from melange_sky.cli import main
if _held:
    print("Interrupted.", file=sys.stderr)
    sys.exit(INTERRUPTED)


def run() -> None:
    try:
        main()
    finally:  # the command has ended and said so: a Ctrl-C now must not turn its exit code into a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run()
