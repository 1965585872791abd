"""One progress bar per stage, through rich (a terminal) and logging (everything else).

On a terminal: a rich bar with done/total, elapsed time, the stage's ETA and the latest figures
(e.g. the loss), redrawn in place on stderr. Not on a terminal (CI, a log file): a plain line about
every tenth of the stage. Either way the stage's end is one logging line (logger "fedgrata"), which
Hydra also writes to the run's job log.
"""
from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

LOG = logging.getLogger("fedgrata")


def _fmt(info: dict[str, float | str]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())


class Progress:
    """A stage of `total` steps named `label`: `update(n, **figures)` per step, `close()` at the end
    (also on leaving a `with` block, or by itself when `total` is reached)."""

    def __init__(self, total: int, label: str, every: int = 0, stream=None) -> None:
        self.total, self.label, self.done, self.info = max(0, total), label, 0, {}
        self.start, self.closed = time.perf_counter(), False
        self.last = self.start - 2.0  # when the last plain line was printed
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every or max(1, self.total // 10)
        self.bar = None
        if self.tty:
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                    TextColumn("{task.fields[info]}"), console=Console(file=self.stream),
                                    transient=False)
            self.task = self.bar.add_task(label, total=self.total, info="")
            self.bar.start()

    def update(self, n: int = 1, **info: float | str) -> None:
        self.done += n
        self.info.update(info)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, info=_fmt(self.info))
        elif self.done % self.every == 0 and self.done < self.total and time.perf_counter() - self.last >= 2.0:
            # a line per tenth of the stage, at most one per 2 s; the end is the logging line below
            self.last = time.perf_counter()
            elapsed = self.last - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(f"{self.label} {self.done}/{self.total} [{elapsed:5.0f}s, eta {eta:4.0f}s] {_fmt(self.info)}",
                  file=self.stream, flush=True)
        if self.done >= self.total:
            self.close()

    def write(self, line: str) -> None:
        """A line above the bar (a round's summary), not through it."""
        if self.bar is not None:
            self.bar.console.print(line, highlight=False, markup=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.stop()
        line = f"{self.label}: {self.done}/{self.total} in {time.perf_counter() - self.start:.0f} s {_fmt(self.info)}"
        if LOG.isEnabledFor(logging.INFO) and logging.getLogger().handlers:
            LOG.info(line)  # the console and, under Hydra, the run's job log
        elif not self.tty:
            print(line, file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
