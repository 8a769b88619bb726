"""Data and models to try fastattr without PyHealth: a seeded synthetic cohort with planted truth
and small protocol models, and the two commands that run on them (``fastattr demo``, ``fastattr bench``).

Modules: :mod:`.synthetic` (cohorts and their dataset), :mod:`.models` (fastattr's own models and
checkpoints), :mod:`.demo` (the demo, in steps), :mod:`.bench` (side-by-side timings against the
methods fastattr replaces) and :mod:`.timing` (interleaved timing, also used by ``benchmarks/``).
"""
