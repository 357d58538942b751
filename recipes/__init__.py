"""Distillation recipes (JSON, one per model family and the demo).

Installed as ``deltaconv_cli.recipes``; ``deltaconv distill --recipe NAME`` reads ``NAME.json``.
"""
