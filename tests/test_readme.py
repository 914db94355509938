"""The README's Python examples run as written, on the zoo models (each block in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workbench.storage import cache_dir

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
# The shared zoo cache, taken at import: the examples load the trained zoo models from it.
SHARED_CACHE = cache_dir()


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2
    text = "\n".join(BLOCKS)
    for needed in ("from editors import MEMIT, ROME", "from adversaries import CopyPaste", "wb.causal_trace(",
                   "wb.Rewrite", "wb.evaluate_rewrites("):
        assert needed in text, needed


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_as_written(index: int, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE", str(SHARED_CACHE))
    monkeypatch.chdir(tmp_path)  # files the example writes land here
    names: dict = {"__name__": "readme_example"}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), names)
    if "delta.save(" in BLOCKS[index]:  # the saved delta loads back and is the one fitted
        from workbench.delta import WeightDelta

        saved = WeightDelta.load(tmp_path / "rewrite.delta")
        assert saved.names == names["delta"].names and saved.method == "rome"
