"""Synthetic worlds: generated data whose ground truth is known, for training zoo models."""
