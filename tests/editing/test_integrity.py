"""Edits under faults and bad input: provenance (fingerprints), saved-file integrity, transactional apply,
hyperparameter validation, and whether an edit reached its new object."""

from __future__ import annotations

import pytest
import torch

from workbench.editing import (Edit, EditFingerprintError, EditIntegrityError, EditNotReachedWarning,
                               HyperParameterError, MEMITHyperParams, ROMEHyperParams, memit, rome)
from workbench.editing.edit import named_parameters, record_outcome
from workbench.loading import model_fingerprint, random_model

from .conftest import identical, snapshot

NAME = "transformer.h.1.mlp.c_proj.weight"
REQ = {"prompt": "The capital of {} is", "subject": "Miles Davis", "target_new": {"str": "trumpet"}}
TEMPLATES = ["{}"]


def _edit(model, scale=0.1):
    p = named_parameters(model)[NAME]
    g = torch.Generator().manual_seed(0)
    return Edit(deltas={NAME: scale * torch.randn(p.shape, generator=g)}, method="test",
                model_fingerprint=model_fingerprint(model))


def test_apply_checks_the_fingerprint(tiny_model):
    """Problem 6: an edit computed on another model of the same shape (or an edited one) applied silently."""
    other = random_model(n_layers=3, d_model=64, n_heads=4, seed=5, device="cpu")
    edit = _edit(tiny_model)
    snap = snapshot(other)
    with pytest.raises(EditFingerprintError, match="force=True"):
        edit.apply(other)
    assert identical(other, snap) and not edit.is_applied(other)
    with edit.applied(other, force=True):
        assert not identical(other, snap)
    assert identical(other, snap)
    first, second = _edit(tiny_model, 0.2), edit
    with first.applied(tiny_model):  # the model is now an edited one: not what `second` was computed on
        with pytest.raises(EditFingerprintError, match="1 edit"):
            second.apply(tiny_model)
    with second.applied(tiny_model):
        pass


def test_saved_edit_with_a_flipped_bit_is_refused(tiny_model, tmp_path):
    """Problem 6: a flipped bit inside a saved edit loaded and applied (one entry became 9.4e36)."""
    path = _edit(tiny_model).save(tmp_path / "e.safetensors")
    assert torch.equal(Edit.load(path).deltas[NAME], _edit(tiny_model).deltas[NAME])
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # inside the last delta's float bytes (the header comes first)
    path.write_bytes(bytes(data))
    with pytest.raises(EditIntegrityError, match=f"{path} .edit file. does not match its recorded SHA-256"):
        Edit.load(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(EditIntegrityError, match=f"{path} is not a readable edit file"):  # problem 11
        Edit.load(path)


def _header_edit(path, change):
    """Rewrite a saved edit's JSON metadata with ``change(meta)``, keeping the file valid safetensors."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    meta = json.loads(header["workbench_edit"])
    change(meta)
    save_file(tensors, str(path), metadata={"workbench_edit": json.dumps(meta)})


def test_saved_edit_metadata_is_inside_the_checksum(tiny_model, tmp_path):
    """Issue 21: renaming `model_fingerprint` disabled the fingerprint check, and damaging `checksums` together
    with a data byte applied a wrong delta with only an "older workbench" warning."""
    path = _edit(tiny_model).save(tmp_path / "e.safetensors")
    _header_edit(path, lambda m: m.update(model_fingerprintX=m.pop("model_fingerprint")))
    with pytest.raises(EditIntegrityError, match=f"{path} .edit file. does not match its recorded SHA-256"):
        Edit.load(path)
    path = _edit(tiny_model).save(tmp_path / "e2.safetensors")
    _header_edit(path, lambda m: m.update(hparams={"lr": 1.0}))
    with pytest.raises(EditIntegrityError, match="does not match"):
        Edit.load(path)
    # a file from before whole-record checksums (per-delta checksums only): a clear error, not a warning
    path = _edit(tiny_model).save(tmp_path / "e3.safetensors")
    _header_edit(path, lambda m: m.pop("checksum"))
    with pytest.raises(EditIntegrityError, match="no checksum .*older workbench.*recompute the edit"):
        Edit.load(path)
    # damaging the checksums together with a data byte
    path = _edit(tiny_model).save(tmp_path / "e4.safetensors")
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40
    path.write_bytes(bytes(data))
    _header_edit(path, lambda m: m.pop("checksums"))
    with pytest.raises(EditIntegrityError, match="does not match"):
        Edit.load(path)


def test_compose_refuses_edits_of_two_models(tiny_model):
    """Issue 21: `Edit.compose` of edits computed on two models applied anywhere."""
    other = random_model(n_layers=3, d_model=64, n_heads=4, seed=5, device="cpu")
    with pytest.raises(EditFingerprintError, match="cannot compose edits computed on different weights"):
        Edit.compose([_edit(tiny_model), _edit(other)])
    both = _edit(tiny_model) + _edit(tiny_model, 0.2)
    assert both.model_fingerprint == model_fingerprint(tiny_model)
    with both.applied(tiny_model):
        pass


def test_save_to_a_bad_path_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    """Issue 21: `edit --save` to a full disk, a read-only path or a directory raised SafetensorError."""
    import errno
    import os

    from workbench.integrity import WriteError

    edit = _edit(tiny_model)
    with pytest.raises(WriteError, match=f"cannot write the edit file {tmp_path}: it is a folder"):
        edit.save(tmp_path)
    real = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(WriteError, match="the disk is full"):
        edit.save(tmp_path / "e.safetensors")
    monkeypatch.setattr(os, "write", real)
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_failure_after_the_weights_changed_leaves_nothing_behind(tiny_model, monkeypatch):
    """Problem 10: a failure in apply's checksum step left the weights edited, unrecorded, revert refusing."""
    import workbench.editing.edit as edit_module

    edit = _edit(tiny_model)
    snap = snapshot(tiny_model)

    def broken(t):
        raise RuntimeError("injected")

    monkeypatch.setattr(edit_module, "_checksum", broken)
    for failure in (RuntimeError, KeyboardInterrupt):
        if failure is KeyboardInterrupt:
            def broken(t):  # noqa: F811
                raise KeyboardInterrupt
            monkeypatch.setattr(edit_module, "_checksum", broken)
        with pytest.raises(failure):
            edit.apply(tiny_model)
        assert identical(tiny_model, snap) and not edit.is_applied(tiny_model)
    monkeypatch.undo()
    with edit.applied(tiny_model):  # and it still applies and reverts afterwards
        assert not identical(tiny_model, snap)
    assert identical(tiny_model, snap)


def test_hparams_typos_duplicates_and_ranges_are_refused(tiny_model):
    """Problems 6 and 14: `v_num_grad_step` was ignored (20 steps ran), MEMIT layers=[3, 3] accepted,
    v_num_grad_steps=0 gave KeyError 'v0'."""
    with pytest.raises(HyperParameterError, match="did you mean 'v_num_grad_steps'"):
        rome(tiny_model, REQ, layer=1, hparams={"v_num_grad_step": 1, "context_templates": TEMPLATES})
    with pytest.raises(HyperParameterError, match="lists a layer twice"):
        memit(tiny_model, [REQ], layers=[1, 1], hparams={"context_templates": TEMPLATES})
    with pytest.raises(HyperParameterError, match="v_num_grad_steps = 0"):
        rome(tiny_model, REQ, layer=1, hparams={"v_num_grad_steps": 0, "context_templates": TEMPLATES})
    with pytest.raises(HyperParameterError, match="v_lr"):
        ROMEHyperParams(v_lr=float("nan"))
    with pytest.raises(HyperParameterError, match="mom2_update_weight"):
        MEMITHyperParams(mom2_update_weight=-1.0)
    # the originals' module-name fields are still accepted (and skipped) when loading their JSON files
    assert ROMEHyperParams.from_dict({"layers": [1], "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"}).layers == [1]


def test_edit_reports_whether_it_reached_the_new_object(tiny_model, tiny_stats):
    """Problem 6: an edit that missed its new object (multi-token, P(new) 2e-6) was returned without a word."""
    far = {**REQ, "target_new": {"str": "New Tuvanopolis City"}}
    with pytest.warns(EditNotReachedWarning, match="top-1"):
        edit = rome(tiny_model, far, layer=1, stats=tiny_stats,
                    hparams={"context_templates": TEMPLATES, "v_num_grad_steps": 1})
    assert edit.info["reached"] is False and 0 <= edit.info["p_new"] < 0.5
    (row,) = edit.info["outcome"]
    assert row["target_new"] == "New Tuvanopolis City" and isinstance(row["top1"], str)
    # an edit whose target is what the model already predicts: reached, no warning
    from workbench.predict import top_tokens

    top = top_tokens(tiny_model, "The capital of Miles Davis is", k=1)[0][0]
    zero = Edit(deltas={NAME: torch.zeros_like(named_parameters(tiny_model)[NAME])},
                requests=[{**REQ, "target_new": {"str": top}}])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", EditNotReachedWarning)
        record_outcome(tiny_model, zero)
    assert zero.info["reached"] is True and zero.info["outcome"][0]["top1"] == top
