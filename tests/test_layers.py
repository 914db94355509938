"""The layers the folders show, checked by import-linter with the contract in pyproject.toml.

core (workbench) < methods (editors | adversaries) < protocols < case studies < command line.
The contract holds for the tree, and it breaks when a core module imports a method module,
even inside a function (the way upward imports used to hide).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def contract_section() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r"^\[tool\.importlinter\].*?(?=^\[(?!\[tool\.importlinter)|\Z)", text, re.S | re.M)
    assert match, "pyproject.toml has no [tool.importlinter] section"
    return match.group(0)


def lint(root: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(config), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def has_linter() -> None:
    if not LINT.is_file():
        pytest.fail(f"import-linter is not installed beside {sys.executable}; `make test` installs it (.[test])")


def test_the_tree_keeps_its_layers(has_linter) -> None:
    result = lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_core_module_importing_a_method_breaks_the_contract(has_linter, tmp_path) -> None:
    packages = ["workbench", "editors", "adversaries", "workbench_protocols", "case_studies", "workbench_cli",
                "workbench_app"]
    for name in packages:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "editors" / "rome.py").write_text("import workbench\n")
    (tmp_path / "pyproject.toml").write_text(contract_section())
    assert lint(tmp_path, tmp_path / "pyproject.toml").returncode == 0  # methods may import the core
    (tmp_path / "workbench" / "report.py").write_text("def draw():\n    from editors import rome\n    return rome\n")
    result = lint(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode != 0
    assert "workbench is not allowed to import editors" in result.stdout
    assert "workbench.report -> editors.rome" in result.stdout
