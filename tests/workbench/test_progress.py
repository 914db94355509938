"""Progress bars: a few plain lines in a log, a live bar on a terminal, never a change of numbers."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import progress
from workbench.progress import LogBar, progress_bar

ROOT = Path(__file__).resolve().parents[2]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_redirected_stderr_gets_a_few_plain_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    code = ("import time\n"
            "import workbench.progress as p\n"
            "p.LOG_SECONDS = 0.0\n"  # the worst case: a line at every tenth, however fast the bar
            "for _ in p.progress_bar(range(1000), desc='steps', unit='step'):\n"
            "    time.sleep(0.001)\n")
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-c", code], stderr=fh, check=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text
    assert 2 <= len(lines) <= 12, text
    assert lines[-1].startswith("steps: 1000/1000 (100%), done in ")
    assert all(line.startswith("steps: ") for line in lines)


def test_log_lines_wait_for_the_interval() -> None:
    stream = io.StringIO()
    bar = progress_bar(total=1000, desc="slow", file=stream, mininterval=0)
    clock = iter(range(3, 10**6, 3))
    bar._time = lambda: bar.start_t + next(clock)  # every reading of the clock is 3 s later
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 5 <= len(lines) <= 11, lines
    assert lines[0].startswith("slow: ") and "elapsed" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("slow: 1000/1000 (100%), done in ")


def test_short_transient_bar_writes_nothing_and_kept_bar_one_line() -> None:
    stream = io.StringIO()
    for _ in progress_bar(range(1000), desc="inner", file=stream, leave=False):
        pass
    assert stream.getvalue() == ""
    for _ in progress_bar(range(1000), desc="outer", file=stream):
        pass
    assert stream.getvalue().count("\n") == 1 and stream.getvalue().startswith("outer: 1000/1000")


def test_unknown_total_and_early_stop() -> None:
    stream = io.StringIO()
    bar = progress_bar(desc="search", unit="cand", file=stream)
    bar.update(7)
    bar.close()
    assert stream.getvalue().startswith("search: 7, done in ")
    stream = io.StringIO()
    for i in progress_bar(range(100), desc="broken", file=stream):
        if i == 40:
            break
    assert "stopped after" in stream.getvalue()


def test_a_terminal_still_gets_a_live_bar() -> None:
    stream = FakeTerminal()
    bar = progress_bar(total=1000, desc="live", file=stream, mininterval=0, miniters=1)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") > 100  # redrawn in place
    assert "1000/1000" in text


def test_disabled_bar_is_silent_and_keeps_the_interface() -> None:
    stream = FakeTerminal()
    with progress_bar(total=5, desc="off", enabled=False, file=stream) as bar:
        bar.update(2)
        bar.set_postfix(loss=1.0)
    assert list(progress_bar(range(3), enabled=False)) == [0, 1, 2]
    assert stream.getvalue() == ""


@pytest.mark.parametrize("where", ["log", "terminal", "off"])
def test_bars_never_touch_random_state(where: str) -> None:
    def seeded_run(with_bar: bool) -> list[float]:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        stream = FakeTerminal() if where == "terminal" else io.StringIO()
        steps = progress_bar(range(50), desc="rng", file=stream, enabled=with_bar and where != "off",
                             mininterval=0) if with_bar else range(50)
        return [float(torch.rand(())) + random.random() + float(np.random.rand()) for _ in steps]

    assert seeded_run(True) == seeded_run(False)


def test_log_bar_is_what_a_non_terminal_gets() -> None:
    assert isinstance(progress_bar(total=1, file=io.StringIO()), LogBar)
    assert not isinstance(progress_bar(total=1, file=FakeTerminal()), LogBar)
    assert progress.is_terminal(FakeTerminal()) and not progress.is_terminal(io.StringIO())
