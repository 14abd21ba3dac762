"""Sweeps and evaluations on Ray workers equal the single-process run, through faults.

One local Ray instance (2 CPUs) serves the whole module; each run starts two CPU actors
that load the bundled model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import workbench as wb
from workbench import scale
from workbench.tracing import dataset as dataset_mod

N_FACTS = 40
# A loaded 2-core machine can take Ray's node more than its default minute to come up.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="the [scale] extra (Ray) is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield ray
    scale.shutdown_workers()
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep_facts():
    return wb.load_facts("toy-facts", split="counterfact")[:N_FACTS]


@pytest.fixture(scope="module")
def reference(toy_model, sweep_facts, tmp_path_factory):
    """The single-process sweep (and its store) that every distributed run must equal."""
    out = tmp_path_factory.mktemp("single")
    return wb.trace_dataset(toy_model, sweep_facts, out=out, progress=False), out


def _store(folder: Path) -> tuple[dict, dict[int, dict]]:
    lines = (folder / "facts.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    by_index = {r["index"]: r for r in records}
    assert len(by_index) == len(records), "a fact was written twice"
    return json.loads((folder / "config.json").read_text()), by_index


def _assert_same_sweep(result, folder: Path, reference) -> None:
    ref, ref_folder = reference
    for kind in ref.kinds:
        assert result.aie[kind].equals(ref.aie[kind]), kind
    assert result.counts.equals(ref.counts)
    assert (result.n_facts, result.n_skipped, result.p_clean, result.p_corrupt) == (
        ref.n_facts, ref.n_skipped, ref.p_clean, ref.p_corrupt)
    for kind in ref.kinds:
        for a, b in zip(result.per_fact[f"scores_{kind}"], ref.per_fact[f"scores_{kind}"]):
            assert (a is None and b is None) or np.array_equal(a, b)
    assert _store(folder) == _store(ref_folder)  # same config (fingerprints) and the same records


def test_workers_without_ray_fail_at_once_naming_the_extra(monkeypatch, toy_model, sweep_facts, tmp_path, capsys):
    from workbench.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(scale.ScaleUnavailable, match=r"workbench\[scale\]"):
        wb.trace_dataset(toy_model, sweep_facts, workers=2, progress=False)
    t0 = time.perf_counter()
    assert main(["sweep", "--out", str(tmp_path / "s"), "--workers", "2", "--no-progress"]) == 1
    assert time.perf_counter() - t0 < 1.0  # before loading the model
    assert "workbench[scale]" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="positive"):
        scale.check_workers(0)


def test_sweep_on_two_workers_equals_single_process(ray_session, toy_model, sweep_facts, reference, tmp_path):
    result = wb.trace_dataset(toy_model, sweep_facts, out=tmp_path, workers=2, progress=False)
    _assert_same_sweep(result, tmp_path, reference)


def _worker_pids() -> set[int]:
    """Processes of live workbench Ray actors (Ray titles them ``ray::_Worker...``)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::_Worker"):
                pids.add(int(entry.name))
    return pids


def _when_stored(path: Path, n_lines: int, action, timeout: float = 120.0) -> threading.Thread:
    """Run ``action()`` in a thread as soon as ``path`` holds ``n_lines`` lines."""

    def watch() -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if path.exists() and path.read_bytes().count(b"\n") >= n_lines:
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_actor_killed_mid_run_gives_the_complete_identical_result(ray_session, toy_model, sweep_facts, reference,
                                                                  tmp_path, caplog):
    killed: list[int] = []

    def kill_one() -> None:
        pid = min(_worker_pids())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = _when_stored(tmp_path / "facts.jsonl", 8, kill_one)
    with caplog.at_level(logging.WARNING, logger="workbench.scale"):
        result = wb.trace_dataset(toy_model, sweep_facts, out=tmp_path, workers=2, progress=False)
    watcher.join(5)
    assert killed, "no worker was killed"
    assert any("died" in r.message for r in caplog.records)
    assert _store(tmp_path)[1].keys() == set(range(N_FACTS))
    _assert_same_sweep(result, tmp_path, reference)


def _die_on(model, item, shared):
    """Work that kills its own process on item ``"die"`` (a fault of the worker, not of the work)."""
    if item == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return item.upper()


def test_item_whose_worker_keeps_dying_is_recorded_failed(ray_session, toy_model):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    items = list(enumerate(["a", "b", "c", "die"]))
    out = dict(scale.map_facts(toy_model, _die_on, items, workers=2, retries=1, depth=1,
                               on_failure=lambda i, item, err: f"failed {item}: {err}"))
    assert {i: out[i] for i in (0, 1, 2)} == {0: "A", 1: "B", 2: "C"}
    assert out[3].startswith("failed die: failed after 2 attempt(s)") and "Error" in out[3]


def _without_timings(details):
    """The rows less their timings and the store's row checksum (a SHA-256 over the row, timings included)."""
    return details.drop(columns=[c for c in ("seconds", "edit_s", "checksum") if c in details]).reset_index(drop=True)


def test_evaluate_on_two_workers_equals_single_process(ray_session, toy_model, tmp_path, monkeypatch):
    """ROME and MEMIT edits on workers: same summary, same rows, the statistics computed once here."""
    from workbench.editing import stats

    facts = wb.load_facts("toy-facts")
    kwargs = dict(methods=("rome", "memit"), n=2, progress=False, raise_errors=True)  # both requests, paired loci
    single = wb.evaluate(toy_model, facts, out=tmp_path / "single", **kwargs)
    calls = []
    real = stats.layer_stats
    monkeypatch.setattr(stats, "layer_stats", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    spread = wb.evaluate(toy_model, facts, out=tmp_path / "spread", workers=2, **kwargs)
    from workbench.editing.hparams import MEMIT_TOY, ROME_TOY

    assert sorted(calls) == sorted(ROME_TOY.layers + MEMIT_TOY.layers)  # ROME's layer, MEMIT's: once, on the driver
    assert spread.equals(single)
    assert spread.attrs["long"].equals(single.attrs["long"])  # means and bootstrap intervals
    assert _without_timings(spread.attrs["details"]).equals(_without_timings(single.attrs["details"]))
    assert spread[("n", "edits")].tolist() == [2] * 6  # unedited x 2 requests, then rome, memit x 2
    cfg = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("single", "spread")]
    assert cfg[0] == cfg[1]


def test_workers_that_cannot_load_the_model_fail_clearly(ray_session, tiny_model, sweep_facts):
    """A random model's spec names no weights: the workers' load error comes back at once."""
    with pytest.raises(scale.WorkerSetupError, match="could not load the model 'random-gpt2.*Error"):
        wb.trace_dataset(tiny_model, sweep_facts[:2], workers=2, progress=False)


def test_interrupted_driver_resumes_to_the_same_result(ray_session, toy_model, sweep_facts, reference, tmp_path):
    """A `workbench sweep --workers 1 --ray ADDRESS` process interrupted mid-run; the rest is done here, in one process."""
    scale.shutdown_workers()  # the warm workers hold both CPUs of the module's Ray; the other driver needs them
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "sweep"
    # One worker, interrupted after its second row: on an idle machine two workers can finish the
    # remaining facts before the signal lands, and the point here is the driver's interruption.
    cmd = [sys.executable, "-m", "workbench.cli", "sweep", "--facts", "toy-facts", "--limit", str(N_FACTS),
           "--out", str(out), "--workers", "1", "--ray", address, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    # A child inherits an ignored SIGINT (and Python then installs no KeyboardInterrupt handler) when
    # something earlier in this test process ignored it; the driver must see Ctrl-C as a user's would.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _when_stored(out / "facts.jsonl", 2, lambda: proc.send_signal(signal.SIGINT), timeout=300).join(310)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output  # interrupted, not finished
    written = _store(out)[1]
    assert 2 <= len(written) < N_FACTS
    result = wb.trace_dataset(toy_model, sweep_facts, out=out, progress=False)  # a mix: resumed in one process
    resumed = _store(out)[1]
    assert all(resumed[i] == rec for i, rec in written.items())  # kept, not recomputed
    _assert_same_sweep(result, out, reference)
