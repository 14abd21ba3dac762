"""Monotone progress with elapsed time and a cancel check, for the Inspector's runs."""

from __future__ import annotations

import html
import threading
import time
from typing import Sequence

import ipywidgets as widgets


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


class Cancelled(Exception):
    """Raised inside a run when its Cancel button was pressed."""


class Progress:
    """A monotone progress bar with a label "step i/n: what — elapsed s" for one run.

    The number of steps is fixed when the run starts, the bar only moves forward, and
    :meth:`step` raises :class:`Cancelled` once ``cancel`` is set.
    """

    def __init__(self, bar: widgets.IntProgress, label: widgets.HTML, steps: Sequence[str],
                 cancel: threading.Event) -> None:
        self.bar, self.label, self.steps, self.cancel = bar, label, list(steps), cancel
        self.started = time.perf_counter()
        self.done = 0
        bar.bar_style, bar.min, bar.value = "", 0, 0
        bar.max = max(1, len(self.steps))
        self._say(self.steps[0] if self.steps else "")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _say(self, what: str) -> None:
        n = len(self.steps)
        self.label.value = html.escape(f"{min(self.done + 1, n)}/{n} {what}… {self.elapsed():.1f} s")

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def step(self) -> None:
        """Mark the current step done and announce the next (or check for a cancel)."""
        self.check()
        self.done += 1
        self.bar.value = min(self.done, self.bar.max)
        if self.done < len(self.steps):
            self._say(self.steps[self.done])

    def tick(self) -> None:
        """Refresh the elapsed time of the current step."""
        if self.done < len(self.steps):
            self._say(self.steps[self.done])

    def finish(self, style: str, text: str) -> None:
        if style == "success":
            self.bar.value = self.bar.max
        self.bar.bar_style = style
        self.label.value = html.escape(f"{text} in {self.elapsed():.1f} s")
