"""Editing on every family (GPT-2, GPT-J, GPT-NeoX, GPT-Neo, Llama, Mistral, Qwen2 with GQA).

Tiny random models (``family_models``, 3 layers) built offline from HF configs. On random
weights the late layers' attention does not carry a subject-position change to the last
token, so the reach checks key ROME/MEMIT at the relation locus (the prompt's last token);
the subject locus is checked for computing the right rank-one update.
"""

from __future__ import annotations

import pytest
import torch

from workbench.architecture import FAMILY_NAMES, mlp_weights
from workbench.editing import Edit, ft, kn, layer_stats, memit, rome
from workbench.editing.corpus import token_rows
from workbench.evaluation import score_objects
from workbench.facts import Fact
from workbench.loading import hf_state_dict, load_model

from .conftest import CORPUS, identical, snapshot

# subject-locus and round-trip edits take a few steps only: they check shapes and bits, not reach
pytestmark = pytest.mark.filterwarnings("ignore::workbench.editing.edit.EditNotReachedWarning")

FACT = Fact(subject="Miles Davis", template="{} plays the", target_true=" trumpet", target_new=" guitar")
EDIT_HP = dict(context_templates=["{}"], v_num_grad_steps=40, clamp_norm_factor=10.0)

_STATS: dict = {}


def stats_of(model, model_type, tmp_path_factory):
    if model_type not in _STATS:
        cache = tmp_path_factory.getbasetemp() / f"family-stats-{model_type}"
        _STATS[model_type] = {l: layer_stats(model, l, corpus=CORPUS, n_tokens=2000, cache_dir=cache,
                                             progress=False, verbose=False) for l in (0, 1)}
    return _STATS[model_type]


def reaches(model, edit: Edit) -> bool:
    with edit.applied(model):
        return score_objects(model, [(FACT.prompt, FACT.target_new)])[0].correct


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_edits_reach_new_object_and_revert(family_models, model_type, tmp_path_factory):
    model = family_models(model_type)
    stats = stats_of(model, model_type, tmp_path_factory)
    before = snapshot(model)
    assert not score_objects(model, [(FACT.prompt, FACT.target_new)])[0].correct
    out = mlp_weights(model, 1).out_name
    edits = {
        "rome": rome(model, FACT, layer=1, locus="relation", hparams=EDIT_HP, stats=stats),
        "memit": memit(model, [FACT], layers=[0, 1], locus="relation",
                       hparams={**EDIT_HP, "mom2_update_weight": 1.0}, stats=stats, progress=False),
        "ft": ft(model, FACT, layer=1, steps=40, lr=0.05, norm_constraint=0.1),
        "kn": kn(model, FACT, preset="kn-calibrated", threshold=0.2, lam_grid=(1.0, 4.0, 16.0, 64.0, 256.0)),
    }
    assert identical(model, before)  # computing never changes the model
    for method, edit in edits.items():
        assert edit.deltas and all(torch.isfinite(d).all() for d in edit.deltas.values())
        if method != "kn":
            assert out in edit.deltas or method == "memit"
        assert reaches(model, edit), f"{method} on {model_type} does not reach {FACT.target_new!r}"
        assert identical(model, before), f"{method} on {model_type} did not revert bit-identically"


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_subject_locus_rome_is_rank_one_on_the_out_projection(family_models, model_type, tmp_path_factory):
    model = family_models(model_type)
    stats = stats_of(model, model_type, tmp_path_factory)
    edit = rome(model, FACT, layer=1, hparams={**EDIT_HP, "v_num_grad_steps": 3}, stats=stats)
    w = mlp_weights(model, 1)
    (name, delta), = edit.deltas.items()
    assert name == w.out_name and delta.shape == w.out_weight.shape
    sv = torch.linalg.svdvals(w.key_major(delta).double())
    assert sv[1] < 1e-6 * sv[0]  # u ⊗ (v* - v)/(k·u): rank one in the key-major layout


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_edit_and_model_save_load_round_trip(family_models, model_type, tmp_path):
    model = family_models(model_type)
    edit = ft(model, FACT, layer=1, steps=3, lr=0.05, norm_constraint=0.1)
    loaded = Edit.load(edit.save(tmp_path / "edit.safetensors"))
    assert loaded.deltas.keys() == edit.deltas.keys()
    assert all(torch.equal(loaded.deltas[n], edit.deltas[n]) for n in edit.deltas)
    ids = torch.tensor([model.tokenizer(FACT.prompt)["input_ids"]])
    with loaded.applied(model):
        edited = {n: p.detach().clone() for n, p in hf_state_dict(model).items()}
        logits = model(ids, return_type="logits")
    folder = edit.save_model(model, tmp_path / "hf")
    again = load_model(folder, device="cpu")
    params = hf_state_dict(again)
    assert params.keys() == edited.keys()
    assert all(torch.equal(params[n], edited[n]) for n in edited)
    assert torch.allclose(again(ids, return_type="logits"), logits, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_covariance_is_the_mean_outer_product_of_the_keys(family_models, model_type, tmp_path_factory):
    model = family_models(model_type)
    stats = stats_of(model, model_type, tmp_path_factory)[1]
    w = mlp_weights(model, 1)
    assert stats.mom2.shape == (w.d_mlp, w.d_mlp)
    rows = list(token_rows(model, CORPUS, min(int(model.cfg.n_ctx), 256)))  # layer_stats' default rows
    keys = []
    for row in rows:
        _, cache = model.run_with_cache(torch.tensor([row]), names_filter=lambda n: n == w.key_hook)
        keys.append(cache[w.key_hook][0].double())
    k = torch.cat(keys)[:2000]
    assert torch.allclose(stats.mom2, k.T @ k / len(k), rtol=1e-4, atol=1e-8)
