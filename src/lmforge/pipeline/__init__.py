"""`lmforge run pipeline.yaml`: the stages of a pipeline file, each rerun only when its config or inputs changed.

spec.py reads and validates the file; state.py fingerprints stages and records what ran; run.py is the command.
"""
