"""The one exception type that carries a user-facing message."""


class DeltaConvError(Exception):
    """A user mistake or an unusable input: the CLI prints the message as one line and exits non-zero."""
