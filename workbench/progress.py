"""Progress bars that suit where they are written: live on a terminal, a few plain lines in a log.

Every bar in the workbench and its methods comes from `progress_bar`. On a terminal (or in
a notebook) it is an ordinary tqdm bar. When the stream is not a terminal (`make demo > log`,
CI), tqdm's live bar would write a carriage-return frame ten times a second; instead the bar
writes one plain line each time another `LOG_FRACTION` of its total is done, at most every
`LOG_SECONDS` (every `LOG_SECONDS_UNKNOWN` when the total is unknown), and a last line when
it closes: a handful of lines per bar. Either way the bar is a tqdm object (iterate it, or
`update`, `set_postfix`, `close` it), and it never touches a random number generator.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.std import tqdm

LOG_FRACTION = 0.1
LOG_SECONDS = 10.0
LOG_SECONDS_UNKNOWN = 60.0


class _Discard(io.TextIOBase):
    """Where a log bar sends tqdm's own frames."""

    def write(self, text: str) -> int:
        return len(text)


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _in_notebook() -> bool:
    """True where tqdm.auto picks the notebook widget (it then differs from the plain bar)."""
    import importlib

    importlib.import_module("tqdm.auto")  # imports tqdm.autonotebook without its notebook-mode warning
    return sys.modules["tqdm.autonotebook"].tqdm is not tqdm


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


class LogBar(tqdm):
    """tqdm that writes occasional plain lines to `stream` instead of a live bar.

    It checks the clock on every update (`miniters=1`) instead of tqdm's adaptive count, so
    a bar that slows down still logs on time, and needs no monitor thread for that.
    """

    monitor_interval = 0

    def __init__(self, iterable: Iterable[Any] | None = None, *, stream: IO[str], **kwargs: Any) -> None:
        kwargs.setdefault("miniters", 1)
        self._stream = stream
        self._next_mark = LOG_FRACTION
        self._lines = 0
        self._done = False
        super().__init__(iterable, file=_Discard(), **kwargs)
        self._last_line_t = self.start_t

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._done or not hasattr(self, "start_t"):  # finished, or tqdm's first frame inside __init__
            return True
        now = self._time()
        if self.disable:  # close() disables the bar before its last display
            leave = (pos or 0) == 0 if self.leave is None else self.leave
            if leave or self._lines:
                self._write(self._line(final=True))
            self._done = True
            return True
        total = self.total
        if total:  # the last line is close()'s
            due = self._next_mark * total <= self.n < total and now - self._last_line_t >= LOG_SECONDS
        else:
            due = now - self._last_line_t >= LOG_SECONDS_UNKNOWN
        if due:
            self._write(self._line(final=False))
            self._last_line_t = now
            if total:
                while self._next_mark * total <= self.n:
                    self._next_mark += LOG_FRACTION
        return True

    def _write(self, line: str) -> None:
        self._lines += 1
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def _line(self, *, final: bool) -> str:
        d = self.format_dict
        n, total, elapsed, unit = d["n"], d["total"], d["elapsed"], d["unit"] or "it"
        head = f"{d['prefix'] or 'progress'}: {_num(n)}"
        if total:
            head += f"/{_num(total)} ({100 * n / total:.0f}%)"
        parts = [head]
        rate = (n - (d.get("initial") or 0)) / elapsed if elapsed > 0 else None
        if final:
            done = not total or n >= total
            parts.append(f"{'done in' if done else 'stopped after'} {self.format_interval(elapsed)}")
        else:
            parts.append(f"{self.format_interval(elapsed)} elapsed")
            if rate and total and n < total:
                parts.append(f"about {self.format_interval((total - n) / rate)} left")
        if rate:
            parts.append(f"{rate:.3g} {unit}/s")
        if d.get("postfix"):
            parts.append(str(d["postfix"]))
        return ", ".join(parts)


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    enabled: bool = True,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`) on `file` (default stderr).

    `enabled=False` gives a silent bar with the same interface. Other keyword arguments
    (`unit`, `leave`, `initial`, ...) are tqdm's.
    """
    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if file is None and _in_notebook():
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(iterable, total=total, desc=desc, **kwargs)
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, file=stream, **kwargs)
    return LogBar(iterable, total=total, desc=desc, stream=stream, **kwargs)


__all__ = ["LOG_FRACTION", "LOG_SECONDS", "LOG_SECONDS_UNKNOWN", "LogBar", "is_terminal", "progress_bar"]
