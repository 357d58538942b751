"""Distillation recipes (JSON, one per model family) and the embedded teacher's training script.

Installed as ``deltaconv_cli.recipes``; ``deltaconv distill --recipe NAME`` reads ``NAME.json``.
"""
