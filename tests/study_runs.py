"""Running `workbench reproduce` from tests, as a user would (a subprocess of the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def reproduce(out: Path, studies: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`workbench reproduce [STUDIES] --quick --seeds 2 --out OUT --json` in a subprocess (1 torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "workbench_cli.main", "reproduce", *studies, "--quick", "--seeds", "2",
                           "--out", str(out), "--json", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=1200)
