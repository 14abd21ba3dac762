"""Progress: bars on a terminal, plain lines in a log (no carriage returns), one switch for both."""

from __future__ import annotations

import io
import logging
import time

import pytest

from workbench import progress
from workbench.progress import LogProgress, progress_bar, progress_mode, set_progress


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    yield
    set_progress(None, interval=progress.DEFAULT_INTERVAL)
    logging.getLogger("workbench").setLevel(logging.NOTSET)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_have_no_carriage_returns_and_end_with_the_total():
    set_progress("log", interval=3600)  # nothing between the first and the last line
    out = io.StringIO()
    with progress_bar(total=50, desc="layer_stats L0", unit="tok", file=out, leave=False) as bar:
        for _ in range(50):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [text.splitlines()[0], text.splitlines()[-1]]
    assert text.startswith("layer_stats L0: 0% 0/50 [") and "layer_stats L0: 100% 50/50 [" in text
    assert text.endswith("tok/s]\n")


def test_log_lines_come_every_interval():
    set_progress("log", interval=0.05)
    out = io.StringIO()
    for _ in progress_bar(range(8), desc="sweep", file=out):
        time.sleep(0.03)
    lines = out.getvalue().splitlines()
    assert 4 <= len(lines) <= 9, lines  # a line at most every 0.05 s, and one at the end
    assert lines[-1].startswith("sweep: 100% 8/8")
    assert [int(line.split()[2].split("/")[0]) for line in lines] == sorted({int(line.split()[2].split("/")[0])
                                                                           for line in lines})


def test_auto_draws_bars_on_a_terminal_and_lines_elsewhere():
    term, log = FakeTerminal(), io.StringIO()
    bar = progress_bar(total=3, desc="t", file=term)
    assert not isinstance(bar, LogProgress)
    bar.update(3)
    bar.close()
    assert "\r" in term.getvalue()
    bar = progress_bar(total=3, desc="t", file=log)
    assert isinstance(bar, LogProgress)
    bar.update(3)
    bar.close()
    assert "\r" not in log.getvalue() and log.getvalue().count("\n") == 2


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_environment_switch_silences_bars_and_lines(monkeypatch, value):
    monkeypatch.setenv(progress.ENV, value)
    for stream in (FakeTerminal(), io.StringIO()):
        with progress_bar(total=2, file=stream) as bar:
            bar.update(2)
        assert stream.getvalue() == ""


def test_set_progress_overrides_the_environment_and_restores_it(monkeypatch):
    monkeypatch.setenv(progress.ENV, "log")
    assert progress_mode() == "log"
    assert set_progress(False) is None
    assert progress_mode() == "off"
    assert set_progress(None) == "off"
    assert progress_mode() == "log"
    out = io.StringIO()
    with progress_bar(total=2, enabled=False, file=out) as bar:  # a call's progress=False
        bar.update(2)
    assert out.getvalue() == ""


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv(progress.ENV, "sometimes")
    with pytest.raises(ValueError, match="WORKBENCH_PROGRESS.*'sometimes'.*auto, bars, log, off"):
        progress_mode()
    with pytest.raises(ValueError, match="set_progress"):
        set_progress("loud")
    with pytest.raises(ValueError, match="interval"):
        set_progress("log", interval=0)


def test_sweep_log_is_plain_lines_and_quiet_silences_it(tmp_path, capsys):
    from workbench.cli import main

    assert main(["sweep", "--limit", "3", "--samples", "2", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal, so plain lines
    assert "\r" not in err and "tracing (subject): 100% 3/3" in err, err
    assert main(["sweep", "--limit", "3", "--samples", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "tracing" not in captured.err and "3 facts" in captured.out
    assert progress_mode() == "off"
