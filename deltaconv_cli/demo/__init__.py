"""The embedded demo: a procedural captioned-image domain, its checker, and a small teacher trained on it."""

DEMO = "demo"  # the short name that selects the embedded teacher (as MODEL) or domain (as DATA)
