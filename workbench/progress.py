"""Progress of long work: bars on a terminal, plain lines in a log, one switch to silence both.

Every long loop of the package (sweeps, evaluations, covariance statistics, training)
reports through :func:`progress_bar`. What it shows depends on the *mode*:

* ``"auto"`` (default): tqdm bars when stderr is a terminal or the code runs in a
  notebook; otherwise (a file, a pipe, a CI log) one plain line every few seconds
  (``interval``, default 5 s) plus one at the end, never a run of carriage returns.
* ``"bars"`` / ``"log"``: always bars / always plain lines.
* ``"off"``: nothing.

The mode comes from :func:`set_progress` when it was called, else from the
``WORKBENCH_PROGRESS`` environment variable (``0``/``off`` silences, ``bars``, ``log``,
``auto``); ``workbench --quiet`` sets ``"off"``. A call's own ``progress=False`` still
silences that call whatever the mode.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from tqdm import tqdm as _std_tqdm

MODES = ("auto", "bars", "log", "off")
"""Accepted progress modes."""

ENV = "WORKBENCH_PROGRESS"
"""Environment variable read when :func:`set_progress` was not called."""

DEFAULT_INTERVAL = 5.0
"""Seconds between two plain progress lines."""

_ALIASES = {"": "auto", "1": "auto", "on": "auto", "true": "auto", "yes": "auto",
            "0": "off", "false": "off", "no": "off", "none": "off", "quiet": "off",
            "bar": "bars", "tqdm": "bars", "lines": "log"}

_mode: str | None = None
_interval: float = DEFAULT_INTERVAL


def _normalise(value: str | bool, source: str) -> str:
    if isinstance(value, bool):
        return "auto" if value else "off"
    text = str(value).strip().lower()
    mode = _ALIASES.get(text, text)
    if mode not in MODES:
        raise ValueError(f"{source}: unknown progress mode {value!r}; use one of {', '.join(MODES)} "
                         f"(or 0/1)")
    return mode


def set_progress(mode: str | bool | None = "auto", *, interval: float | None = None) -> str | None:
    """Set how progress is shown for this process and return the previous setting.

    ``mode``: ``"auto"``, ``"bars"``, ``"log"``, ``"off"``, or a bool (``False`` = ``"off"``);
    ``None`` goes back to the ``WORKBENCH_PROGRESS`` environment variable. ``interval``:
    seconds between plain progress lines (log mode).
    """
    global _mode, _interval
    previous = _mode
    _mode = None if mode is None else _normalise(mode, "set_progress")
    if interval is not None:
        if not interval > 0:
            raise ValueError(f"set_progress: interval must be > 0 seconds, got {interval}")
        _interval = float(interval)
    return previous


def progress_mode() -> str:
    """The mode in force: the :func:`set_progress` setting, else ``WORKBENCH_PROGRESS``, else ``"auto"``."""
    if _mode is not None:
        return _mode
    return _normalise(os.environ.get(ENV, ""), f"environment variable {ENV}")


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where tqdm draws widget bars)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - IPython without a shell
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _stream_is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def resolved_style(file: Any = None) -> str:
    """``"bars"``, ``"log"`` or ``"off"``: what :func:`progress_bar` draws now on ``file`` (default stderr)."""
    mode = progress_mode()
    if mode != "auto":
        return mode
    if _in_notebook() or _stream_is_terminal(file if file is not None else sys.stderr):
        return "bars"
    return "log"


class _Discard:
    """Swallows what tqdm writes itself (redraws, carriage returns)."""

    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass


class LogProgress(_std_tqdm):
    """A tqdm whose display is one plain line per ``mininterval`` seconds, and one at the end.

    The lines go to ``out`` (default: whatever ``sys.stderr`` is when a line is written);
    tqdm's own redraws and carriage returns go nowhere.
    """

    _FORMAT = "{percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, *args: Any, out: Any = None, **kwargs: Any) -> None:
        self._out = out
        self._printed_n: float | None = None
        kwargs["file"] = _Discard()
        kwargs["miniters"] = 1  # check the clock on every update; lines are spaced by mininterval
        kwargs.pop("dynamic_ncols", None)
        kwargs.pop("ncols", None)
        super().__init__(*args, **kwargs)

    def _line(self) -> str:
        fmt = self._FORMAT if self.total else "{n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]"
        if self.desc:
            fmt = "{desc}: " + fmt
        return self.format_meter(**{**self.format_dict, "bar_format": fmt})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or self.n == self._printed_n:  # a clear (leave=False), or nothing new to say
            return True
        self._printed_n = self.n
        out = self._out if self._out is not None else sys.stderr
        try:
            out.write((msg if msg is not None else self._line()) + "\n")
            out.flush()
        except ValueError:  # the stream was closed (interpreter shutdown)
            pass
        return True

    def close(self) -> None:
        if not getattr(self, "disable", True) and hasattr(self, "last_print_t"):
            self._ema_dt = lambda: None  # the final line shows the overall rate
            self.display()
        super().close()


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, file: Any = None,
                 **kwargs: Any) -> _std_tqdm:
    """A progress bar for long work, drawn as the current mode says (see the module docstring).

    Takes tqdm's arguments (``total``, ``desc``, ``unit``, ``initial``, ``leave``, ...) and
    returns a tqdm object: ``update``, ``set_postfix``, ``close``, iteration and ``with`` all
    work in every mode. ``enabled=False`` (a caller's ``progress=False``) or mode ``"off"``
    gives a disabled bar.
    """
    disabled = kwargs.pop("disable", False) or not enabled
    style = "off" if disabled else resolved_style(file)
    if style == "off":
        return _std_tqdm(iterable, disable=True, **kwargs)
    if style == "log":
        kwargs["mininterval"] = _interval
        return LogProgress(iterable, out=file, **kwargs)
    from tqdm.auto import tqdm

    if file is not None:
        kwargs["file"] = file
    return tqdm(iterable, **kwargs)
