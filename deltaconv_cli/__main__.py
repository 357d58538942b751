"""``python -m deltaconv_cli`` (and ``accelerate launch -m deltaconv_cli ...``) runs the CLI."""

from .cli import app

app()
