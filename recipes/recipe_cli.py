"""What every recipe script shares: a user's mistake (a ``DeltaConvError``: a missing folder, a pipeline of
another kind, a work folder of another recipe) ends the script with one line and exit status 1, as the
``deltaconv`` command does, instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from deltaconv_cli.errors import DeltaConvError


def run(main: Callable[[], None]) -> None:
    """Call a recipe's ``main``; a ``DeltaConvError`` becomes ``SCRIPT: message`` on stderr, exit 1."""
    try:
        main()
    except DeltaConvError as error:
        print(f"{Path(sys.argv[0]).name}: {error}", file=sys.stderr)
        sys.exit(1)
