"""The `melange-sky` command (and `python -m melange_sky`).

Loading the command line takes ~0.1 s; a Ctrl-C in that time would print a KeyboardInterrupt traceback from the middle
of an import. Until the CLI has loaded, Ctrl-C exits at once with the documented code for an interruption (130).
"""
import signal
import sys

INTERRUPTED = 130


def _exit_interrupted(_signum: int, _frame: object) -> None:
    print("Interrupted.", file=sys.stderr)
    sys.exit(INTERRUPTED)


_previous = signal.getsignal(signal.SIGINT)
if _previous is signal.default_int_handler:  # leave an ignored SIGINT (nohup, background jobs) ignored
    signal.signal(signal.SIGINT, _exit_interrupted)
from melange_sky.cli import main  # noqa: E402 - loaded under the handler above

if _previous is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run() -> None:
    try:
        main()
    finally:  # the command has ended and said so: a Ctrl-C now must not turn its exit code into a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run()
