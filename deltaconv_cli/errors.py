"""The one exception type that carries a user-facing message, and how the repository's scripts report it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path


class DeltaConvError(Exception):
    """A user mistake or an unusable input: the CLI prints the message as one line and exits non-zero."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name where it
    has none: what a one-line error quotes of another library's failure."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def run_script(main: Callable[[], None]) -> None:
    """Call a script's ``main`` (the benchmarks, the demo teacher's research): a ``DeltaConvError`` becomes
    ``SCRIPT: message`` on stderr and exit status 1, as the ``deltaconv`` command does, instead of a
    traceback; output piped into a reader that stops early (``head``) ends the script quietly."""
    try:
        main()
        sys.stdout.flush()  # a closed pipe shows here, not at exit where it could no longer be caught
    except DeltaConvError as error:
        print(f"{Path(sys.argv[0]).name}: {error}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        # Python flushes stdout once more at exit; pointed at devnull, that flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
