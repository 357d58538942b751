"""The embedded demo: a procedural captioned-image domain, its checker, the recommended sampler of the small
teacher trained on it (whose training is research: demo_teacher/), and its feature extractor."""

DEMO = "demo"  # the short name that selects the embedded teacher (as MODEL) or domain (as DATA)
