"""Progress off a terminal: sparse plain lines and one closing line; on a terminal a rich bar."""
from __future__ import annotations

import io

from grata import progress
from grata.progress import Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_are_sparse_and_the_stage_ends_in_one_line(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    out = io.StringIO()
    bar = Progress(100, "training", stream=out)
    for _ in range(100):
        clock.t += 0.5  # 50 s in all: at most one line per 2 s, one per tenth
        bar.update(loss=0.25)
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 11 and all(line.startswith("training") for line in lines)
    assert "eta" in lines[0] and lines[-1] == "training: 100/100 in 50 s loss 0.25"
    assert bar.closed


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_rich_bar_with_an_eta():
    out = Tty()
    with Progress(3, "rounds", stream=out) as bar:
        bar.write("  round 1/3: gamma dice 70.0")
        bar.update(dice=70.0)
    text = out.getvalue()
    assert "round 1/3" in text and "rounds" in text and "eta" in text
