"""Result stores: key checks, the lock, damage-tolerant append-only rows; real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.store import ResultStore, StoreLockedError, StoreMismatchError, key_hash

KEY = {"model_fingerprint": "abc", "facts_hash": "f1", "seed": 0, "methods": {"ft": {"kwargs": {"steps": 2}}}}
WORKER = Path(__file__).with_name("sweep_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _open(folder, key=KEY, **kw):
    return ResultStore.open(folder, kind="test", key=key, id_fields=("i",), **kw)


def _fill(folder, n):
    with _open(folder) as store:
        for i in range(n):
            store.append({"i": i, "value": i * i})


# ------------------------------------------------------------------ in-process contract

def test_rows_roundtrip_and_carry_the_key(tmp_path):
    _fill(tmp_path, 3)
    with _open(tmp_path) as store:
        assert [r["value"] for r in store.rows()] == [0, 1, 4]
        assert store.done == {("0",), ("1",), ("2",)} and 2 in store and 3 not in store
        assert all(r["store_key"] == key_hash(KEY) for r in store.rows())
        assert store.damaged == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["key"] == KEY and cfg["kind"] == "test" and cfg["format_version"] >= 1


def test_damaged_middle_line_is_skipped_counted_and_kept(tmp_path):
    """Problem 9: one bad line in the middle must not cost the intact records after it."""
    _fill(tmp_path, 6)
    path = tmp_path / "rows.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:15] + b"\x00garbage"
    path.write_bytes(b"\n".join(lines))
    size = path.stat().st_size
    with pytest.warns(RuntimeWarning, match="1 damaged line"):
        store = _open(tmp_path)
    with store:
        assert store.damaged == 1 and store.damaged_lines == [3]
        assert sorted(int(r["i"]) for r in store.rows()) == [0, 1, 3, 4, 5]
        assert path.stat().st_size == size  # reading truncated nothing
        store.append({"i": 2, "value": 4})
    with pytest.warns(RuntimeWarning):
        store = _open(tmp_path)
    with store:
        assert sorted(int(r["i"]) for r in store.rows()) == list(range(6))


def test_torn_last_line_cannot_swallow_the_next_row(tmp_path):
    """Problem 9: a half-written last row, then an append: both neighbours stay readable."""
    _fill(tmp_path, 3)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(path.read_bytes() + b'{"i": 3, "val')
    with pytest.warns(RuntimeWarning, match="damaged"):
        store = _open(tmp_path)
    with store:
        assert store.damaged == 1 and len(store) == 3
        store.append({"i": 3, "value": 9})
    text = path.read_text()
    assert text.endswith("\n")
    assert [json.loads(line)["i"] for line in text.splitlines()] == [0, 1, 2, 3]


def test_other_key_is_refused_naming_the_fields(tmp_path):
    """Problems 1 and 5: other facts / kwargs / hparams in the same folder are refused, not mixed."""
    _fill(tmp_path, 2)
    other = {**KEY, "facts_hash": "f2", "methods": {"ft": {"kwargs": {"steps": 3}}}}
    with pytest.raises(StoreMismatchError, match="another --out") as info:
        _open(tmp_path, key=other)
    assert info.value.fields == ["key.facts_hash", "key.methods.ft.kwargs.steps"]
    assert "f1" in str(info.value) and "f2" in str(info.value)
    with pytest.raises(StoreMismatchError, match="kind"):
        ResultStore.open(tmp_path, kind="other", key=KEY, id_fields=("i",))
    with _open(tmp_path) as store:  # the lock was released by the refusals
        assert len(store) == 2


def test_rows_without_config_are_refused(tmp_path):
    """Problem 5: a deleted config.json must not relabel old rows with the new settings."""
    _fill(tmp_path, 2)
    (tmp_path / "config.json").unlink()
    with pytest.raises(StoreMismatchError, match="config.json is missing"):
        _open(tmp_path)


def test_foreign_and_duplicate_rows_are_skipped(tmp_path):
    _fill(tmp_path, 2)
    path = tmp_path / "rows.jsonl"
    first = path.read_text().splitlines()[0]
    alien = json.dumps({"i": 7, "value": 0, "store_key": "0" * 16})
    path.write_text(path.read_text() + first + "\n" + alien + "\n")
    with pytest.warns(RuntimeWarning, match="another key"):
        store = _open(tmp_path)
    with store:
        assert len(store) == 2 and store.duplicates == 1 and store.foreign == 1
        with pytest.raises(Exception, match="already holds"):
            store.append({"i": 0, "value": 0})


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(Exception, match="is a file, not a folder"):
        _open(target)


def test_second_open_in_another_process_is_refused_with_pid(tmp_path):
    """Problem 2 (lock): while one process holds the store, another cannot open it."""
    with _open(tmp_path):
        code = ("import sys; from workbench.store import ResultStore, StoreLockedError\n"
                f"try:\n    ResultStore.open({str(tmp_path)!r}, kind='test', key={KEY!r}, id_fields=('i',))\n"
                "except StoreLockedError as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              env=_env(), timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout
    with _open(tmp_path):  # released on close
        pass
    with pytest.raises(StoreLockedError):  # and within one process, a second open waits for nobody
        with _open(tmp_path):
            _open(tmp_path)


# ------------------------------------------------------------------ real sweeps, killed and concurrent

SWEEP = ["--model", "toy-facts", "--device", "cpu", "--limit", "6", "--samples", "2", "--kinds", "hidden",
         "--no-progress"]


def _env() -> dict:
    """The environment of child processes: this checkout importable (after any PYTHONPATH given), one thread."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _worker(delay: float | Path, out: Path, *extra: str) -> subprocess.Popen:
    env = _env()
    return subprocess.Popen([sys.executable, str(WORKER), str(delay), *SWEEP, "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for rows")


def _records(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["index"]: r for r in rows}


def test_sigkill_mid_sweep_then_resume_is_identical(tmp_path):
    """Problems 2/5/9 with a real process: SIGKILL mid-sweep, resume; equals an uninterrupted sweep."""
    full = _worker(0, tmp_path / "full")
    killed = _worker(0.4, tmp_path / "b")
    _wait_rows(tmp_path / "b" / "facts.jsonl", 2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    n_before = len(_records(tmp_path / "b" / "facts.jsonl"))
    assert 2 <= n_before < 6
    resumed = _worker(0, tmp_path / "b")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert full.wait(300) == 0, full.stderr.read()
    a, b = _records(tmp_path / "full" / "facts.jsonl"), _records(tmp_path / "b" / "facts.jsonl")
    assert sorted(a) == sorted(b) == list(range(6))
    assert a == b  # bit-identical records, store key included
    assert (tmp_path / "b" / "facts.jsonl").read_text().count("\n") == 6  # nothing computed twice


def test_concurrent_sweep_on_one_folder_is_refused(tmp_path):
    """Problem 2: a second run on the same --out refuses (naming the holder) instead of interleaving."""
    gate = tmp_path / "gate"
    gate.touch()
    first = _worker(gate, tmp_path / "sw")  # holds the store, waits at its first fact until the gate opens
    t0 = time.time()
    while not (tmp_path / "sw" / ".lock").exists() or not (tmp_path / "sw" / ".lock").read_text().strip():
        assert first.poll() is None and time.time() - t0 < 120, "first run did not start"
        time.sleep(0.05)
    second = _worker(0, tmp_path / "sw")
    _, err = second.communicate(timeout=300)
    gate.unlink()
    assert second.returncode == 1
    assert f"in use by another run (pid {first.pid})" in err
    assert first.wait(300) == 0, first.stderr.read()
    lines = (tmp_path / "sw" / "facts.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(6))


def test_sweep_with_other_settings_or_without_config_refuses(tmp_path):
    """Problems 1/5 at the CLI: another --samples, or a deleted config.json, exit 1 with the fix."""
    from workbench.cli import main

    out = tmp_path / "sw"
    args = ["sweep", "--model", "toy-facts", "--device", "cpu", "--limit", "2", "--samples", "2", "--kinds", "hidden",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert main([*args, "--window", "2"]) == 1  # the default here is 3 (half of 6 layers)
    (out / "config.json").unlink()
    assert main(args) == 1
    assert (out / "facts.jsonl").read_text().count("\n") == 2


# ------------------------------------------------------------------ the stores in place: sweeps and evaluations

def _facts():
    from workbench.facts import Fact

    subjects = ["Varo Keltin", "Miles Davis", "Toko Yasuda", "Mira Dos"]
    return [Fact(subject=s, template="{} was born in", target_true="Osla", target_new="Paris", relation_id="P19",
                 id=10 + i) for i, s in enumerate(subjects)]


def test_sweep_resume_keeps_records_after_a_damaged_line(tiny_model, tmp_path, monkeypatch):
    """Problem 9: resume stopped at the first damaged line and truncated every intact record after it."""
    import workbench.tracing.dataset as ds
    from workbench.tracing import trace_dataset

    kw = dict(kinds=("hidden",), samples=2, progress=False, out=tmp_path / "sw")
    trace_dataset(tiny_model, _facts(), **kw)
    path = tmp_path / "sw" / "facts.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:30]  # a damaged record in the middle
    path.write_text("\n".join(lines) + "\n")
    real, calls = ds._trace_fact, []
    monkeypatch.setattr(ds, "_trace_fact", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with pytest.warns(RuntimeWarning, match="1 damaged line"):
        res = trace_dataset(tiny_model, _facts(), **kw)
    assert calls == [1] and res.n_facts == 4  # only the damaged record is recomputed
    kept = path.read_text().splitlines()
    assert kept[:4] == lines[:4]  # nothing after the damage was truncated


def test_evaluation_torn_last_row_does_not_swallow_the_next(tiny_model, tmp_path):
    """Problem 9: a half-written evaluation row got the next row appended to the same line."""
    from workbench.evaluation import evaluate

    out = tmp_path / "ev"
    evaluate(tiny_model, _facts(), methods=(), out=out, progress=False)
    path = out / "details.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # the last row cut short by a crash
    with pytest.warns(RuntimeWarning, match="damaged"):
        evaluate(tiny_model, _facts(), methods=(), out=out, progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert len(rows) == len(lines)


# ------------------------------------------------------------------ integrity (row checksums, all-or-nothing appends)

def _rewrite(path, change):
    """Apply ``change(rows)`` to the parsed rows of ``path`` and write them back as valid JSON lines."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = change(rows)
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def test_changed_number_in_a_valid_row_is_detected(tmp_path):
    """Issue 21: a changed number in a valid JSON row was used silently."""
    _fill(tmp_path, 3)
    _rewrite(tmp_path / "rows.jsonl", lambda rows: [{**r, "value": 99} if r["i"] == 1 else r for r in rows])
    with pytest.warns(RuntimeWarning, match=r"1 damaged line.*line 2.*checksum"):
        store = _open(tmp_path)
    with store:
        assert store.done == {("0",), ("2",)} and store.damaged_lines == [2]
        store.append({"i": 1, "value": 1})  # recomputed
    with pytest.warns(RuntimeWarning):
        store = _open(tmp_path)
    with store:
        assert store.get(1)["value"] == 1


def test_row_without_its_store_key_is_refused(tmp_path):
    """Issue 21: a row without its store key was accepted as if it had the folder's key."""
    _fill(tmp_path, 2)
    _rewrite(tmp_path / "rows.jsonl", lambda rows: rows + [{"i": 5, "value": 25}])
    with pytest.warns(RuntimeWarning, match="without their store key"):
        store = _open(tmp_path)
    with store:
        assert 5 not in store and store.damaged == 1


def test_forged_duplicate_placed_first_does_not_win(tmp_path):
    """Issue 21: a forged row with an existing id, placed first, replaced the genuine one."""
    from workbench.integrity import seal
    from workbench.store import StoreIntegrityError

    _fill(tmp_path, 2)
    path = tmp_path / "rows.jsonl"
    genuine = json.loads(path.read_text().splitlines()[1])
    forged = {**genuine, "value": -1}
    _rewrite(path, lambda rows: [forged] + rows)  # checksum not updated: damaged, the genuine row wins
    with pytest.warns(RuntimeWarning, match="damaged"):
        store = _open(tmp_path)
    with store:
        assert store.get(1)["value"] == 1
    _rewrite(path, lambda rows: [seal(forged)] + rows[1:])  # a forger who recomputed the checksum
    with pytest.raises(StoreIntegrityError, match=r"two different rows for \{'i': '1'\} \(lines 1 and 3\)"):
        _open(tmp_path)


def test_disk_full_mid_append_loses_nothing(tmp_path, monkeypatch):
    """Issue 21: after a disk-full error mid-append, the next append returned normally and its row was lost."""
    import errno

    from workbench.store import StoreWriteError

    real_write, real_truncate = os.write, os.ftruncate
    path = tmp_path / "rows.jsonl"

    def half_then_full(fd, data):  # the disk fills up part-way through the line
        if len(data) > 8:
            real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    for truncate_fails in (False, True):  # even when cutting the partial line fails too
        folder = tmp_path / f"s{truncate_fails}"
        path = folder / "rows.jsonl"
        with _open(folder) as store:
            store.append({"i": 0, "value": 0})
            monkeypatch.setattr(os, "write", half_then_full)
            if truncate_fails:
                monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
            with pytest.raises(StoreWriteError, match=f"cannot write the result rows {path}: the disk is full"):
                store.append({"i": 1, "value": 1})
            monkeypatch.setattr(os, "write", real_write)
            monkeypatch.setattr(os, "ftruncate", real_truncate)
            assert 1 not in store
            store.append({"i": 1, "value": 1})  # space freed: the next append must keep its row
            store.append({"i": 2, "value": 4})
        with _open(folder) as store:
            assert store.damaged == 0 and [r["value"] for r in store.rows()] == [0, 1, 4]
        assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_folder_from_before_row_checksums_is_refused_clearly(tmp_path):
    """Old folders (store format 1, rows without checksums) are refused with a message, not trusted."""
    _fill(tmp_path, 2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["format_version"] = 1
    cfg.pop("checksum")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreMismatchError, match="older workbench .store format 1, rows without checksums"):
        _open(tmp_path)
    cfg["format_version"] = 2  # a config whose content no longer matches its checksum
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="config.json has no checksum"):
        _open(tmp_path)


def test_append_cut_short_in_another_process_loses_nothing(tmp_path):
    """Issue 21, across processes: a process that dies half-way through writing a row (here: its disk fills
    up and it exits without cleaning up) must not make the next process's row unreadable."""
    _fill(tmp_path, 2)
    script = f"""
import errno, os, sys
sys.path.insert(0, {str(ROOT)!r})
from workbench.store import ResultStore
store = ResultStore.open({str(tmp_path)!r}, kind="test", key={KEY!r}, id_fields=("i",))
real = os.write
def half(fd, data):
    real(fd, bytes(data[: len(data) // 2]))
    os._exit(3)  # dies mid-row: no truncate, no cleanup
os.write = half
store.append({{"i": 2, "value": 4}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert not (tmp_path / "rows.jsonl").read_bytes().endswith(b"\n")  # a torn row really is there
    with pytest.warns(RuntimeWarning, match="damaged"):
        store = _open(tmp_path)
    with store:
        assert 2 not in store
        store.append({"i": 2, "value": 4})
        store.append({"i": 3, "value": 9})
    with _open(tmp_path) as store:
        assert store.damaged == 0 and [r["value"] for r in store.rows()] == [0, 1, 4, 9]


def test_config_edited_to_match_another_run_is_refused(tmp_path):
    """The store's config.json is sealed: editing its key to match another run's settings (to reuse rows
    computed with other settings) is detected."""
    from workbench.store import StoreIntegrityError

    _fill(tmp_path, 2)
    other = {**KEY, "seed": 1}
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["key"] = other
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreIntegrityError, match="config.json does not match its recorded SHA-256"):
        _open(tmp_path, key=other)
    with pytest.raises(StoreMismatchError, match="key.seed: folder has 1, this run 0"):  # another run: named
        _open(tmp_path)
