"""A word while the callbacks work: the ``lightning_viz`` Python logger, progress lines from long loops.

Lines go through Python logging (logger ``lightning_viz``, level INFO), so they can be silenced or
redirected like any other library's: ``logging.getLogger("lightning_viz").setLevel(logging.WARNING)``.
When the program has configured no logging at all, a stream handler is added (as Lightning does for
its own logger), so the lines show in a plain ``lightning-viz fit`` run.

:func:`reporting` marks a stretch of work (a callback's compute on rank 0); inside it, loops in
:mod:`lightning_viz.methods` call :func:`progress`, which logs at most one line every ``every_s``
seconds. Outside :func:`reporting` (the methods used on their own, or on ranks other than 0)
:func:`progress` does nothing.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any, Optional, TextIO

__all__ = [
    "logger",
    "reporting",
    "reporting_part",
    "interruptible",
    "progress",
    "warnings_above_bars",
    "PROGRESS_EVERY_S",
]


def _tqdm_bars() -> Any:
    """tqdm's module while it shows progress bars (Lightning's ``TQDMProgressBar``), else ``None``."""
    std = sys.modules.get("tqdm.std")  # imported only where tqdm is in use
    return std if getattr(getattr(std, "tqdm", None), "_instances", None) else None


class _BarAwareHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write`` while tqdm progress bars are shown (Lightning's
    ``TQDMProgressBar``): the bars are cleared, the line printed on its own, the bars drawn again. A plain write glued
    the line to the end of the bar (``Epoch 0: 100%|...| 2/2 [...]lightning-viz epoch 0: 1.2 s (...)``).

    Without a ``stream`` it writes to whatever ``sys.stderr`` is at each line (as :data:`logging.lastResort`): rich's
    live display (Lightning's ``RichProgressBar``, the default progress bar when ``rich`` is installed) swaps
    ``sys.stderr`` for a proxy that prints above the bars. A stream taken at import wrote past the proxy, into the
    bars: the next redraw erased the line or left it between two copies of the bar."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        super().__init__(stream)
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return sys.stderr if self._stream is None else self._stream

    @stream.setter
    def stream(self, value: Optional[TextIO]) -> None:
        self._stream = value

    def emit(self, record: logging.LogRecord) -> None:
        std = _tqdm_bars()
        if std is None:
            super().emit(record)
            return
        try:
            std.tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


logger = logging.getLogger("lightning_viz")
if not logging.getLogger().hasHandlers() and not logger.handlers:
    logger.setLevel(logging.INFO)
    logger.addHandler(_BarAwareHandler())
    logger.propagate = False


@contextmanager
def warnings_above_bars() -> Iterator[None]:
    """Inside the block (a callback's run), a warning shown while tqdm bars are up prints through ``tqdm.write``, on a
    line of its own above the bars, as the log lines do. Python prints warnings straight to ``sys.stderr``, which glued
    them to the end of the bar (``Epoch 1: 100%|...| 6/6 [00:04<00:00]/path/base.py:647: GradientCallback: ...``).
    Warnings recorded (``catch_warnings(record=True)``: its log list), sent to a file or to a ``showwarning`` of the
    program's own are left as they are."""
    show = warnings.showwarning

    def above(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        std = _tqdm_bars()
        recorded = isinstance(getattr(getattr(warnings, "_showwarnmsg_impl", None), "__self__", None), list)
        own = show is not getattr(warnings, "_showwarning_orig", None)  # a showwarning of the program's own
        if std is None or file is not None or own or recorded:
            show(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        with suppress(OSError):  # as Python's own showwarning: a closed stream loses the warning, not the run
            std.tqdm.write(text.rstrip("\n"), file=sys.stderr)

    warnings.showwarning = above
    try:
        yield
    finally:
        if warnings.showwarning is above:
            warnings.showwarning = show


#: Seconds between two progress lines of one run.
PROGRESS_EVERY_S = 5.0


class _Run:
    def __init__(self, label: str, every_s: float):
        self.label, self.every_s = label, every_s
        self.start = self.last = time.perf_counter()
        self.loop: Optional[tuple[str, int]] = None  # (what, total) of the loop reporting now
        self.loop_start, self.loop_done = self.start, 0  # its first report: when, and how much was done then
        self.loop_last = 0  # how much it had done at its latest call


_current: ContextVar[Optional[_Run]] = ContextVar("lightning_viz_progress", default=None)
_check: ContextVar[Optional[Callable[[int, int, str], None]]] = ContextVar("lightning_viz_stop", default=None)


@contextmanager
def reporting(label: Optional[str], every_s: Optional[float] = None) -> Iterator[None]:
    """Let :func:`progress` calls inside log under ``label`` (``None``: stay silent, e.g. off rank 0), at most
    one line every ``every_s`` seconds (default :data:`PROGRESS_EVERY_S`)."""
    every = PROGRESS_EVERY_S if every_s is None else every_s
    token = _current.set(None if label is None else _Run(label, every))
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def reporting_part(name: str) -> Iterator[None]:
    """Inside the block, progress lines name this part of the run, e.g. the maps computed again on a randomized model:
    ``lightning-viz cam (sanity check): 17/512 masked images``, not a second ``cam: 0/512`` out of nowhere."""
    run = _current.get()
    if run is None:
        yield
        return
    label = run.label
    run.label = f"{label} ({name})"
    try:
        yield
    finally:
        run.label = label


@contextmanager
def interruptible(check: Callable[[int, int, str], None]) -> Iterator[None]:
    """Let every :func:`progress` call inside (each step of a long loop, on every rank) call ``check(done, total,
    what)`` first, which may raise to stop the loop there (a callback's run: the Trainer got a SIGTERM)."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)


def progress(done: int, total: int, what: str = "steps") -> None:
    """Report ``done`` of ``total`` ``what`` (one line at most every ``every_s`` seconds of a run), with the time
    the run has taken and, once the loop has reported twice, the time left at the loop's rate since its first
    report. Inside :func:`interruptible`, its check runs first (and may raise)."""
    check = _check.get()
    if check is not None:
        check(done, total, what)
    run = _current.get()
    if run is None:
        return
    now = time.perf_counter()
    if run.loop != (what, total) or done < run.loop_last:  # another loop (or the same one again): its rate anew
        run.loop, run.loop_start, run.loop_done = (what, total), now, done
    run.loop_last = done
    if now - run.last < run.every_s:
        return
    run.last = now
    rate_done, rate_s = done - run.loop_done, now - run.loop_start
    left = f", ~{(total - done) * rate_s / rate_done:.0f} s left" if rate_done > 0 and rate_s > 0 else ""
    logger.info("lightning-viz %s: %d/%d %s (%.0f s%s)", run.label, done, total, what, now - run.start, left)
