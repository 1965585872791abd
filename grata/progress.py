"""A tiny progress line: rewrites itself on a terminal, prints sparse lines in logs and CI."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, every: int = 0) -> None:
        self.total, self.label, self.start, self.done = total, label, time.perf_counter(), 0
        self.tty = sys.stderr.isatty()
        self.every = every or max(1, total // 10)

    def update(self, n: int = 1, **info: float | str) -> None:
        self.done += n
        if not self.tty and self.done % self.every and self.done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        line = f"{self.label} {self.done}/{self.total} [{elapsed:5.0f}s, eta {eta:4.0f}s] {extra}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and self.done == self.total:
            print(file=sys.stderr)
