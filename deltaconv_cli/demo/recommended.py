"""How the embedded demo teacher samples best: its recommended sampler, measured on held-out captions
(demo_teacher/REPORT.md). ``sample``, ``eval``, ``distill``'s report and ``analyze`` use it on the demo
unless told otherwise."""

RECOMMENDED_STEPS = 20
RECOMMENDED_GUIDANCE = 2.0  # the best of 1.5, 2 and 3 on held-out captions (demo_teacher/REPORT.md)
# The first 20 % of the steps unguided: there the layout is decided, and guidance adds objects
# (demo_teacher/REPORT.md: adherence 0.78 against 0.72 with guidance at every step on teacher v3, and a
# smaller Fréchet distance).
RECOMMENDED_GUIDANCE_START = 0.2
