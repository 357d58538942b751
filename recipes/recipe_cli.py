"""What every recipe script shares: a user's mistake (a ``DeltaConvError``: a missing folder, a pipeline of
another kind, a work folder of another recipe) ends the script with one line and exit status 1, as the
``deltaconv`` command does, instead of a traceback. Output piped into a reader that stops early (``head``)
ends the script quietly."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from deltaconv_cli.errors import DeltaConvError


def run(main: Callable[[], None]) -> None:
    """Call a recipe's ``main``; a ``DeltaConvError`` becomes ``SCRIPT: message`` on stderr, exit 1."""
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
