"""Case studies: each states a prediction, acts, and measures whether it held.

One module per study; the harness (prediction hashing, controls, seeds, verdicts) lives
in `workbench`.
"""
