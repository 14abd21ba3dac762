"""The Edit object: apply/revert bit-identity, misuse errors, transactions, save/load."""

from __future__ import annotations

import pytest
import torch

from workbench.editing import Edit, EditStateError
from workbench.editing.edit import named_parameters, param_name
from workbench.loading import hf_model

NAME = "transformer.h.1.mlp.c_proj.weight"


def _param(model, name=NAME):
    return named_parameters(model)[name]


def _edit(model, scale=0.1, seed=0, name=NAME):
    g = torch.Generator().manual_seed(seed)
    p = _param(model, name)
    return Edit(deltas={name: scale * torch.randn(p.shape, generator=g)}, method="test")


def test_param_names(tiny_model):
    assert param_name(tiny_model, tiny_model.blocks[1].mlp.W_out) == NAME
    assert _param(tiny_model) is tiny_model.blocks[1].mlp.W_out


def test_apply_revert_bit_identical(tiny_model):
    before = _param(tiny_model).detach().clone()
    edit = _edit(tiny_model)
    edit.apply(tiny_model)
    assert edit.is_applied(tiny_model)
    assert not torch.equal(_param(tiny_model), before)
    # the bridge sees the same tensor
    assert torch.equal(tiny_model.blocks[1].mlp.W_out, _param(tiny_model))
    edit.revert(tiny_model)
    assert torch.equal(_param(tiny_model), before)
    assert not edit.is_applied(tiny_model)


def test_misuse_errors(tiny_model):
    before = _param(tiny_model).detach().clone()
    edit = _edit(tiny_model)
    with pytest.raises(EditStateError):
        edit.revert(tiny_model)
    edit.apply(tiny_model)
    with pytest.raises(EditStateError):
        edit.apply(tiny_model)
    # state is shared between the bridge and its HF model
    with pytest.raises(EditStateError):
        edit.apply(hf_model(tiny_model))
    assert edit.is_applied(hf_model(tiny_model))
    other = _edit(tiny_model, seed=1)
    other.apply(tiny_model)
    with pytest.raises(EditStateError):  # out of order on the same weight
        edit.revert(tiny_model)
    other.revert(tiny_model)
    edit.revert(tiny_model)
    with pytest.raises(EditStateError):
        edit.revert(tiny_model)
    assert torch.equal(_param(tiny_model), before)


def test_context_manager_reverts_on_error(tiny_model):
    before = _param(tiny_model).detach().clone()
    edit = _edit(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with edit.applied(tiny_model):
            assert not torch.equal(_param(tiny_model), before)
            raise RuntimeError("boom")
    assert torch.equal(_param(tiny_model), before)
    assert not edit.is_applied(tiny_model)


def test_apply_is_transactional(tiny_model):
    n0, n1 = "transformer.h.0.mlp.c_proj.weight", NAME
    b0, b1 = _param(tiny_model, n0).detach().clone(), _param(tiny_model, n1).detach().clone()
    bad = Edit(deltas={n0: torch.ones_like(b0), n1: torch.full_like(b1, float("nan"))})
    with pytest.raises(ValueError, match="non-finite"):
        bad.apply(tiny_model)
    wrong = Edit(deltas={n0: torch.ones_like(b0), n1: torch.ones(3, 3)})
    with pytest.raises(ValueError, match="shape"):
        wrong.apply(tiny_model)
    with pytest.raises(KeyError):
        Edit(deltas={"nope": torch.ones(1)}).apply(tiny_model)
    assert torch.equal(_param(tiny_model, n0), b0) and torch.equal(_param(tiny_model, n1), b1)
    assert not bad.is_applied(tiny_model)


def test_save_load_roundtrip(tiny_model, tmp_path):
    edit = _edit(tiny_model)
    edit.requests = [{"prompt": "{} is", "subject": "X", "target_new": {"str": "Y"}}]
    edit.hparams = {"layers": [1]}
    edit.info = {"loss": [1.0, 0.5], "norm": torch.tensor(2.0)}
    path = edit.save(tmp_path / "e.safetensors")
    loaded = Edit.load(path)
    assert loaded.method == "test" and loaded.requests == edit.requests and loaded.hparams == {"layers": [1]}
    assert loaded.info["loss"] == [1.0, 0.5] and loaded.info["norm"] == 2.0
    assert torch.equal(loaded.deltas[NAME], edit.deltas[NAME])
    before = _param(tiny_model).detach().clone()
    with loaded.applied(tiny_model):
        with edit.applied(tiny_model):  # a loaded copy is a separate edit object
            pass
    assert torch.equal(_param(tiny_model), before)


def test_compose(tiny_model):
    a, b = _edit(tiny_model, seed=2), _edit(tiny_model, seed=3)
    c = a + b
    assert torch.allclose(c.deltas[NAME], a.deltas[NAME] + b.deltas[NAME])
    assert c.method == "compose"


def test_save_model(tiny_model, tmp_path):
    c = _edit(tiny_model, seed=4)
    before = _param(tiny_model).detach().clone()
    out = c.save_model(tiny_model, tmp_path / "hf")
    assert (out / "config.json").exists()
    assert torch.equal(_param(tiny_model), before)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert torch.allclose(saved[NAME], before + c.deltas[NAME])
