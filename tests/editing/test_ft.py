"""FT baseline: an L-inf-bounded change of one W_out that makes the rewrite prompt predict o*."""

from __future__ import annotations

import os

import pytest
import torch

from workbench.editing import Edit, HyperParameterError
from workbench.editing.ft import FT_GPT2_XL, FTHyperParams, ft
from workbench.evaluation import score_objects
from workbench.facts import Fact
from workbench.loading import hf_parameter, model_fingerprint

NAME = "transformer.h.1.mlp.c_proj.weight"
FACT = Fact(subject="Varo Keltin", template="The mother tongue of {} is", target_true="French",
            target_new="Tuvan", relation_id="P103", id=1)
FAST = dict(layer=1, lr=0.05, norm_constraint=0.05, steps=15)


def test_ft_returns_bounded_edit_without_touching_weights(tiny_model):
    before = model_fingerprint(tiny_model)
    edit = ft(tiny_model, FACT, locus="relation", **FAST)
    assert model_fingerprint(tiny_model) == before  # computing an edit changes nothing
    assert isinstance(edit, Edit) and edit.method == "ft" and edit.locus == "relation"
    assert edit.param_names == [NAME]
    assert float(edit.deltas[NAME].abs().max()) <= FAST["norm_constraint"] + 1e-7
    assert edit.info["loss"][-1] < edit.info["loss"][0]
    assert edit.requests[0]["target_new"]["str"] == "Tuvan"
    assert edit.hparams["norm_constraint"] == FAST["norm_constraint"]


def test_ft_moves_prediction_and_reverts_bit_identically(tiny_model):
    w = hf_parameter(tiny_model, NAME).detach().clone()
    edit = ft(tiny_model, FACT, **FAST)
    new_before = score_objects(tiny_model, [(FACT.prompt, "Tuvan")])[0].mean_logprob
    with edit.applied(tiny_model):
        new_after = score_objects(tiny_model, [(FACT.prompt, "Tuvan")])[0].mean_logprob
    assert new_after > new_before + 0.5
    assert torch.equal(hf_parameter(tiny_model, NAME), w)


def test_ft_delta_equals_weight_change(tiny_model):
    """Training through hooks (post @ D) is the same as running with W_out + D."""
    edit = ft(tiny_model, FACT, **FAST)
    with edit.applied(tiny_model):
        applied = score_objects(tiny_model, [(FACT.prompt, "Tuvan")])[0].mean_logprob
    final_nll = edit.info["final_loss"]
    assert applied == pytest.approx(-final_nll, abs=1e-4)


def test_ft_locus_positions_variant(tiny_model):
    a = ft(tiny_model, FACT, locus="subject", positions="locus", **FAST)
    b = ft(tiny_model, FACT, locus="relation", positions="locus", **FAST)
    assert not torch.equal(a.deltas[NAME], b.deltas[NAME])
    assert a.hparams["locus_position"] != b.hparams["locus_position"]


def test_ft_save_load(tiny_model, tmp_path):
    edit = ft(tiny_model, FACT, layer=0, steps=2)
    path = edit.save(tmp_path / "ft.safetensors")
    back = Edit.load(path)
    assert back.method == "ft" and torch.equal(back.deltas["transformer.h.0.mlp.c_proj.weight"],
                                               edit.deltas["transformer.h.0.mlp.c_proj.weight"])


def test_ft_errors_leave_model_alone(tiny_model):
    before = model_fingerprint(tiny_model)
    with pytest.raises(ValueError):
        ft(tiny_model, FACT, layer=99)
    with pytest.raises(ValueError):
        ft(tiny_model, Fact(subject="Varo Keltin", template="{} speaks", target_true="French"))
    with pytest.raises(ValueError):
        ft(tiny_model, FACT, locus="object")
    with pytest.raises(HyperParameterError, match="no_such_field"):
        ft(tiny_model, FACT, hparams={"no_such_field": 1})
    assert model_fingerprint(tiny_model) == before
    assert FTHyperParams().to_dict()["steps"] == 25


def test_ft_gpt2_xl_preset_trains_weight_and_bias_within_bound(tiny_model):
    """ROME's constrained FT-L for GPT-2 XL: weight and bias of c_proj at layer 0, lr = bound = 5e-4."""
    edit = ft(tiny_model, FACT, preset="ft-gpt2-xl", steps=3)
    assert set(edit.deltas) == {"transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"}
    assert all(0 < float(d.abs().max()) <= 5e-4 + 1e-9 for d in edit.deltas.values())
    assert edit.hparams["preset"] == "ft-gpt2-xl" and edit.hparams["lr"] == 5e-4 and edit.hparams["train_bias"]
    assert FT_GPT2_XL.layer == 0 and FT_GPT2_XL.norm_constraint == FT_GPT2_XL.lr == 5e-4
    assert ft(tiny_model, FACT, layer=0, steps=1).hparams["preset"] == "ft-generic"  # an unknown model
    with pytest.raises(ValueError):
        ft(tiny_model, FACT, preset="ft-nothing")


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "..", "assets", "toy-facts",
                                                    "model.safetensors")), reason="bundled model not built")
def test_ft_bundled_reaches_new_object(toy_model):
    from workbench.facts import load_facts

    fact = next(f for f in load_facts("toy-facts") if f.target_new)
    edit = ft(toy_model, fact)
    with edit.applied(toy_model):
        assert score_objects(toy_model, [(fact.prompt, fact.target_new)])[0].correct
