"""The zoo models for the slow tests that need a trained one."""

from __future__ import annotations

from workbench.handle import ModelHandle


def factgpt() -> ModelHandle:
    """The zoo FactGPT: trained on first use (a few minutes), then cached.

    Never a skip: a test that skips whenever the cache is cold would never run in CI's clean
    checkout, and would pass there without checking anything.
    """
    from workbench.models import load

    return load("zoo:factgpt", device="cpu", progress=False)
