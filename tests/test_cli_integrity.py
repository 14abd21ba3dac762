"""Integrity at the command line: bad inputs, missing devices, unwritable outputs and runs whose every edit
failed each end in one clear line on stderr and a non-zero exit status."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from workbench.cli import main

TRACE = ["trace", "--device", "cpu", "--prompt", "Varo Keltin plays the", "--subject", "Varo Keltin", "--samples",
         "2", "--kinds", "hidden"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"not one line: {err!r}"
    return err


def _missing_device() -> str:
    """A CUDA device this machine lacks: ``cuda`` on a CPU build, else an index past the last GPU."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("command", [["predict", "hello"], ["info"]])
def test_a_device_that_does_not_exist_is_one_clear_line(command, capsys):
    """Issue 21: `--device cuda` on a CPU build gave a raw traceback (predict, info, load_model)."""
    device = _missing_device()
    assert main([*command, "--device", device]) == 1
    assert f"device '{device}' is not available" in _err(capsys) or "does not exist" in _err(capsys)


def test_load_model_refuses_a_missing_device():
    from workbench.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="is not available|does not exist"):
        load_model("toy-facts", device=_missing_device())
    with pytest.raises(ModelLoadError, match="not a torch device"):
        load_model("toy-facts", device="gpu0")


@pytest.mark.parametrize("command, match", [
    (["predict", "hello", "-k", "0"], "-k: must be >= 1, got 0"),
    ([*TRACE, "--top", "-3"], "--top: must be >= 1, got -3"),
])
def test_counts_below_one_are_refused(command, match, capsys):
    """Issue 21: `predict -k 0` printed nothing and `--top -3` all but three cells, with exit status 0."""
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 2 and match in _err(capsys)


@pytest.mark.parametrize("extra, match", [
    (["--noise", "1e300"], "noise level 1e\\+300 .*overflows the corrupted runs"),
    (["--window", "99"], "window=99 is larger than the model's 6 layers"),
    (["--answer", ""], "answer must be a non-blank object string"),
    (["--answer", "   "], "answer must be a non-blank object string"),
])
def test_meaningless_trace_parameters_are_refused(extra, match, capsys):
    """Issue 21: `--noise 1e300` gave a NaN map, `--window 99` on a 6-layer model a flat one and `--answer ""`
    scored a space, all with exit status 0."""
    import re

    assert main([*TRACE, *extra]) == 1
    assert re.search(match, _err(capsys))


def test_trace_api_refuses_them_too(toy_model):
    from workbench.tracing import severed_trace, trace
    from workbench.tracing.api import TraceParameterError

    kw = dict(subject="Varo Keltin", samples=2, kinds=("hidden",))
    with pytest.raises(TraceParameterError, match="overflows"):
        trace(toy_model, "Varo Keltin plays the", noise=1e300, **kw)
    with pytest.raises(TraceParameterError, match="overflows"):
        severed_trace(toy_model, "Varo Keltin plays the", subject="Varo Keltin", samples=2, noise=1e300)
    with pytest.raises(TraceParameterError, match="window=7"):
        trace(toy_model, "Varo Keltin plays the", window=7, **kw)
    assert trace(toy_model, "Varo Keltin plays the", window=6, **kw).window == 6  # the whole depth is allowed


@pytest.mark.parametrize("option", ["--kn-preset", "--ft-preset"])
def test_unknown_presets_are_refused_before_any_work(option, capsys, tmp_path):
    """Issue 21: an unknown --kn-preset / --ft-preset made every edit fail, exit status 0."""
    from workbench.editing.presets import preset_table

    name = option[2:4]
    assert main(["reproduce", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), option,
                 "no-such-preset"]) == 1
    err = _err(capsys)
    assert f"{name} has no preset 'no-such-preset'; choose from " in err
    assert all(p in err for p in preset_table(name).named)  # from the registry, whatever the presets are called
    assert not (tmp_path / "o").exists()


def test_a_run_whose_every_edit_failed_exits_non_zero(monkeypatch, tmp_path, capsys):
    """Issue 21: a reproduce run whose every edit failed printed its tables and exited 0."""
    import importlib

    ft_module = importlib.import_module("workbench.editing.ft")

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ft_module, "ft", broken)
    rc = main(["reproduce", "--device", "cpu", "--out", str(tmp_path / "o"), "-n", "1", "--methods", "ft",
               "--requests", "entity", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "ft: all 1 edit(s) failed (first error: " in err and "injected failure" in err


def test_reproduce_with_facts_sharing_an_id_is_one_clear_line(tmp_path, capsys):
    """Issue 21: facts sharing an id stopped reproduce with a misleading "already holds the row"."""
    rec = json.loads((Path(__file__).parent / "fixtures" / "counterfact_small.json").read_text())
    for r in rec:
        r["case_id"] = 0
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(rec))
    assert main(["reproduce", "--device", "cpu", "--facts", str(path), "--out", str(tmp_path / "o")]) == 1
    err = _err(capsys)
    assert "share an id" in err and "already holds" not in err


@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A folder nothing can be written into. Tests run as root, for whom chmod does not stop writes, so the
    folder is made immutable (chattr +i) where the file system allows; else writes into it fail with EROFS
    through a patched os.open (a simulated read-only file system)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)

    def writable() -> bool:
        try:
            (folder / "probe").write_text("x")
            (folder / "probe").unlink()
            return True
        except OSError:
            return False

    immutable = False
    if writable():
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0 \
            if Path("/usr/bin/chattr").exists() or Path("/bin/chattr").exists() else False
    if writable():
        real_open = os.open

        def ro_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", ro_open)
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    os.chmod(folder, 0o755)


def test_edit_save_to_a_read_only_folder_or_a_directory(readonly_dir, tmp_path, capsys, tiny_model):
    """Issue 21: `edit --save` to a read-only path or a directory raised SafetensorError."""
    from workbench.editing import Edit
    from workbench.editing.edit import named_parameters
    from workbench.integrity import WriteError

    name = "transformer.h.1.mlp.c_proj.weight"
    edit = Edit(deltas={name: torch.ones_like(named_parameters(tiny_model)[name])})
    with pytest.raises(WriteError, match=f"cannot write the edit file {readonly_dir / 'e.safetensors'}: "
                                         f"(permission denied|the file system is read-only)"):
        edit.save(readonly_dir / "e.safetensors")
    assert list(readonly_dir.iterdir()) == []
    base = ["edit", "--device", "cpu", "--subject", "Varo Keltin", "--prompt", "{} plays the", "-o", "piano"]
    for target, why in ((readonly_dir / "e.safetensors", "cannot write the edit file"),
                        (tmp_path, "it is a folder")):
        start = time.perf_counter()
        assert main([*base, "--save", str(target)]) == 1
        assert why in _err(capsys) and time.perf_counter() - start < 30  # before the edit is computed


def test_edit_save_to_a_full_disk_is_one_clear_line(monkeypatch, tmp_path, capsys):
    """Issue 21: `edit --save` to a full disk raised SafetensorError (the disk fills while the file is written)."""
    import workbench.integrity as integrity

    real_write = os.write

    def full(fd, data):
        if len(data) > 1000:  # the edit file, not the small writes of the run
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(integrity.os, "write", full)
    target = tmp_path / "e.safetensors"
    rc = main(["edit", "--device", "cpu", "--subject", "Varo Keltin", "--prompt", "{} plays the", "-o", "piano",
               "--save", str(target)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and f"cannot write the edit file {target}: the disk is full" in err
    assert not target.exists() and not list(tmp_path.glob(".*tmp"))


def test_unreachable_ray_address_fails_fast(tmp_path, capsys):
    """Issue 21: `--ray 127.0.0.1:1` retried for minutes."""
    from workbench.scale import check_workers

    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        check_workers(2, "127.0.0.1:1")
    assert main(["reproduce", "--out", str(tmp_path / "o"), "--workers", "2", "--ray", "127.0.0.1:1"]) == 1
    assert "cannot reach the Ray cluster" in _err(capsys) and time.perf_counter() - start < 15
    with pytest.raises(ValueError, match="not a cluster address"):
        check_workers(2, "nonsense")


def test_memit_with_no_layers_is_refused(tiny_model):
    """Issue 21: memit(layers=[]) silently used the preset's layers."""
    from workbench.editing import HyperParameterError, memit

    req = {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": {"str": "piano"}}
    with pytest.raises(HyperParameterError, match=r"memit\(layers=\[\]\) names no layer"):
        memit(tiny_model, [req], layers=[])


def test_any_other_failure_is_one_line_too(monkeypatch, capsys):
    """A failure of a type the command does not expect still ends in one line, not a traceback."""
    import workbench.commands.predict as predict

    monkeypatch.setattr(predict, "run", lambda args: {}["missing"])
    assert main(["predict", "hello"]) == 1
    assert "workbench predict: error: KeyError: 'missing' (rerun with --debug for the traceback)" in _err(capsys)
