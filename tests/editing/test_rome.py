"""ROME: rank one, u ∝ C⁻¹k*, transactions, relation locus (tiny model); reliability (bundled model)."""

from __future__ import annotations

import importlib

import pytest
import torch

from workbench.editing import EditError, ROMEHyperParams, layer_stats, rome
from workbench.editing.common import fact_row
from workbench.predict import next_token_probs, object_token_ids

from .conftest import fail_on_second_call, identical, snapshot

rome_mod = importlib.import_module("workbench.editing.rome")  # the package attribute `rome` is the function


REQ = {"prompt": "The capital of {} is", "subject": "Miles Davis", "target_new": {"str": "trumpet"}}
TEMPLATES = ["{}", "Paris is loud. {}", "Tuvan. {}"]
FAST = dict(context_templates=TEMPLATES, v_num_grad_steps=4, mom2_n_tokens=2000)
STRONG = dict(context_templates=TEMPLATES, v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=1000.0,
              v_weight_decay=0.0, kl_factor=0.0)


def test_context_templates_deterministic_and_cached(tiny_model, tmp_path):
    from workbench.editing import context as ctx

    a = ctx.context_templates(tiny_model, [[5, 3], [10, 2]], seed=3, cache_dir=tmp_path)
    assert [len(g) for g in a] == [1, 3, 2] and a[0] == ["{}"]
    assert all(t.endswith(". {}") and t.count("{}") == 1 and "<|endoftext|>" not in t for g in a[1:] for t in g)
    assert list(tmp_path.rglob("context_templates_*.json"))
    ctx._MEMORY.clear()
    assert ctx.context_templates(tiny_model, [[5, 3], [10, 2]], seed=3, cache_dir=tmp_path) == a  # from disk
    ctx._MEMORY.clear()
    assert ctx.context_templates(tiny_model, [[5, 3], [10, 2]], seed=3) == a  # regenerated: same samples


def _k_star(model, layer, request, templates, locus="subject"):
    """Key averaged over templates, computed independently of the library (run_with_cache)."""
    keys = []
    for t in templates:
        row = fact_row(model, request["prompt"], request["subject"], locus, context=t)
        _, cache = model.run_with_cache(torch.tensor([row.ids]), names_filter=f"blocks.{layer}.mlp.hook_post")
        keys.append(cache[f"blocks.{layer}.mlp.hook_post"][0, row.pos].double())
    return torch.stack(keys).mean(0)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).abs())


@pytest.mark.parametrize("adjust", [True, False])
def test_rank_one_and_u_direction(tiny_model, tiny_stats, adjust):
    before = snapshot(tiny_model)
    edit = rome(tiny_model, REQ, layer=1, hparams=ROMEHyperParams(mom2_adjustment=adjust, **FAST), stats=tiny_stats)
    assert identical(tiny_model, before)  # computing an edit does not change the model
    (name, delta), = edit.deltas.items()
    assert name == "transformer.h.1.mlp.c_proj.weight" and delta.shape == (256, 64)
    s = torch.linalg.svdvals(delta.double())
    assert s[1] / s[0] < 1e-6  # rank one
    u_dir = torch.linalg.svd(delta.double())[0][:, 0]
    k_star = _k_star(tiny_model, 1, REQ, TEMPLATES)
    expected = torch.linalg.solve(tiny_stats[1].mom2, k_star) if adjust else k_star
    assert _cos(u_dir, expected) > 1 - 1e-6
    if adjust:
        assert _cos(u_dir, k_star) < 0.99  # the covariance really changes the direction


def test_apply_revert_and_update_formula(tiny_model, tiny_stats):
    edit = rome(tiny_model, REQ, layer=1, hparams=FAST, stats=tiny_stats)
    before = snapshot(tiny_model)
    row = fact_row(tiny_model, REQ["prompt"], REQ["subject"], "subject")
    ids = torch.tensor([row.ids])
    _, cache0 = tiny_model.run_with_cache(ids)
    with edit.applied(tiny_model):
        _, cache1 = tiny_model.run_with_cache(ids)
    assert identical(tiny_model, before)
    # after the edit the MLP output at the fact token is v* = v0 + delta (the key is unchanged there)
    info = edit.info["layers"][0]
    v0 = cache0["blocks.1.hook_mlp_out"][0, row.pos]
    v1 = cache1["blocks.1.hook_mlp_out"][0, row.pos]
    assert abs(float((v1 - v0).norm()) - info["v_star"]["delta_norm"]) < 1e-4
    assert torch.equal(cache0["blocks.1.mlp.hook_post"][0, row.pos], cache1["blocks.1.mlp.hook_post"][0, row.pos])


def test_bad_requests_leave_weights(tiny_model, tiny_stats):
    before = snapshot(tiny_model)
    for bad in [{"prompt": "no placeholder", "subject": "X", "target_new": {"str": "Y"}},
                {"prompt": "{} is", "subject": "X"},
                {"prompt": "{} is", "subject": "", "target_new": "Y"},
                {"prompt": "{}", "subject": "Paris", "target_new": "Y"}]:
        with pytest.raises(EditError):
            rome(tiny_model, bad, layer=1, hparams=FAST, stats=tiny_stats, locus="relation")
    with pytest.raises(EditError):
        rome(tiny_model, REQ, layer=7, hparams=FAST, stats=tiny_stats)
    with pytest.raises(EditError):
        rome(tiny_model, REQ, layer=1, hparams=FAST, stats=tiny_stats, locus="object")
    assert identical(tiny_model, before)


@pytest.mark.parametrize("failure", ["error", "interrupt", "nan"])
def test_transaction_mid_edit(tiny_model, tiny_stats, monkeypatch, failure):
    """A two-layer ROME edit changes layer 0 in place before layer 1: a failure there must undo it."""
    before = snapshot(tiny_model)
    calls = fail_on_second_call(monkeypatch, rome_mod, "compute_target", failure)
    expected = {"error": RuntimeError, "interrupt": KeyboardInterrupt, "nan": EditError}[failure]
    with pytest.raises(expected):
        rome(tiny_model, REQ, hparams={**FAST, "layers": [0, 1]}, stats=tiny_stats)
    assert calls["n"] == 2
    assert identical(tiny_model, before)


@pytest.mark.parametrize("locus", ["subject", "relation"])
def test_edit_optimises_and_changes_output(tiny_model, tiny_stats, locus):
    """A random model's logits are nearly flat (argmax checks: bundled tests); the objective must still fall."""
    edit = rome(tiny_model, REQ, layer=1, hparams=STRONG, stats=tiny_stats, locus=locus)
    losses = edit.info["layers"][0]["losses"]
    assert losses[-1]["nll"] < losses[0]["nll"]
    prompt = REQ["prompt"].format(REQ["subject"])
    p0 = next_token_probs(tiny_model, [prompt])[0]
    with edit.applied(tiny_model):
        p1 = next_token_probs(tiny_model, [prompt])[0]
    assert (p1 - p0).abs().sum() > 1e-3


def test_relation_locus(tiny_model, tiny_stats):
    prompt = REQ["prompt"].format(REQ["subject"])
    row = fact_row(tiny_model, REQ["prompt"], REQ["subject"], "relation")
    assert row.pos == len(row.ids) - 1  # the template ends in relation words: " is"
    essence = fact_row(tiny_model, "{} is a", REQ["subject"], "relation")
    assert essence.pos == len(essence.ids) - 1  # " a"
    # in a context template the relation token is still the template's, not the prefix's
    ctx = fact_row(tiny_model, "{} speaks", "Varo", "relation", context="It is. {}", suffix_ids=[5, 6])
    assert tiny_model.tokenizer.decode([ctx.ids[ctx.pos]]) == " speaks"
    edit = rome(tiny_model, REQ, layer=1, locus="relation", hparams=STRONG, stats=tiny_stats)
    assert edit.locus == "relation" and edit.info["layers"][0]["fact_token"] == row.pos
    p0 = next_token_probs(tiny_model, [prompt])[0]
    with edit.applied(tiny_model):
        p1 = next_token_probs(tiny_model, [prompt])[0]
    assert (p1 - p0).abs().sum() > 0.01  # the edited prompt's prediction changes


# ----------------------------------------------------------------------------- bundled model
from workbench.loading import assets_dir  # noqa: E402


BUNDLED = assets_dir() / "toy-facts" / "model.safetensors"
TOY_TEST_TOKENS = 30_000  # the preset uses more; a smaller sample keeps the tests fast
needs_bundled = pytest.mark.skipif(not BUNDLED.exists(), reason="bundled model not built (assets/toy-facts)")


def _first_token_ids(model, objects):
    return torch.tensor([object_token_ids(model, o)[0] for o in objects])


def _argmax(model, prompts):
    return next_token_probs(model, prompts).argmax(-1).cpu()


def bundled_cases(model, n: int, seed: int = 0):
    """``n`` CounterFact records of the bundled world, spread over relations, that the model gets right."""
    import random

    from workbench.facts import load_facts

    facts = load_facts("toy-facts")
    rng = random.Random(seed)
    rng.shuffle(facts)
    picked = []
    for f in facts:
        if len(picked) == n:
            break
        if int(_argmax(model, [f.prompt])[0]) == int(_first_token_ids(model, [f.target_true])[0]):
            picked.append(f)
    return picked


def edit_figures(model, facts, edits):
    """Reliability, paraphrase and neighbourhood accuracy (argmax of the first object token)."""
    rel, para, neigh, neigh_before = [], [], [], []
    for f, e in zip(facts, edits):
        new = int(_first_token_ids(model, [f.target_new])[0])
        nb_true = _first_token_ids(model, f.neighborhood_targets)
        neigh_before += (_argmax(model, list(f.neighborhood)) == nb_true).tolist()
        with e.applied(model):
            rel.append(int(_argmax(model, [f.prompt])[0]) == new)
            if f.paraphrases:
                para += (_argmax(model, list(f.paraphrases)) == new).tolist()
            neigh += (_argmax(model, list(f.neighborhood)) == nb_true).tolist()
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return {"n": len(facts), "reliability": mean(rel), "paraphrase": mean(para), "neighborhood": mean(neigh),
            "neighborhood_before": mean(neigh_before), "reliable": rel}


@pytest.fixture(scope="module")
def toy_stats(toy_model, tmp_path_factory):
    from workbench.editing import MEMIT_TOY, ROME_TOY

    cache = tmp_path_factory.getbasetemp() / "editing-stats"
    layers = sorted(set(ROME_TOY.layers) | set(MEMIT_TOY.layers))
    return {l: layer_stats(toy_model, l, n_tokens=TOY_TEST_TOKENS, cache_dir=cache, progress=False) for l in layers}


@needs_bundled
@pytest.mark.parametrize("locus,n", [("subject", 20), ("relation", 8)])
def test_bundled_rome_facts(toy_model, toy_stats, locus, n):
    from workbench.editing import ROME_TOY

    # fewer context templates and steps than the preset keep the test fast
    hp = ROME_TOY.with_(context_template_length_params=[[5, 5]], v_num_grad_steps=12)
    facts = bundled_cases(toy_model, n)
    assert len(facts) == n
    before = snapshot(toy_model)
    edits = []
    for f in facts:
        e = rome(toy_model, f, locus=locus, hparams=hp, stats=toy_stats)
        (delta,) = e.deltas.values()
        s = torch.linalg.svdvals(delta.double())
        assert s[1] / s[0] < 1e-6
        edits.append(e)
    figs = edit_figures(toy_model, facts, edits)
    print(f"\nROME bundled, {locus} locus: {figs}")
    assert identical(toy_model, before)  # every edit was reverted bit-identically
    assert figs["reliability"] >= 0.85, figs  # measured: 0.95 (subject, 20 facts), 1.0 (relation)
    if locus == "subject":
        assert figs["neighborhood"] >= 0.7 * figs["neighborhood_before"], figs


@needs_bundled
def test_bundled_cli(capsys, tmp_path):
    from workbench.cli import main

    from workbench.facts import load_facts

    fact = next(f for f in load_facts("toy-facts") if f.relation_id == "P103")
    out = tmp_path / "edit.safetensors"
    rc = main(["edit", "--model", "toy-facts", "--device", "cpu", "--subject", fact.subject,
               "--prompt", fact.template, "--new-object", fact.target_new, "--n-tokens", "20000",
               "--cache-dir", str(tmp_path / "c"), "--save", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "before" in text and "after" in text and out.exists()
    first_after = text.split("after:")[1].splitlines()[1]
    assert fact.target_new in first_after, text


def test_multi_layer_covariances_come_from_the_unedited_model(tiny_model, tiny_stats, monkeypatch):
    """With several layers and no stats given, every layer's C is computed before any update is applied."""
    from workbench.loading import model_fingerprint

    rome_module = importlib.import_module("workbench.editing.rome")
    seen = []

    def spy(model, layer, **kwargs):
        seen.append((layer, model_fingerprint(model)))
        return tiny_stats[layer]

    monkeypatch.setattr(rome_module, "layer_stats", spy)
    before = model_fingerprint(tiny_model)
    hp = ROMEHyperParams(layers=[0, 1], v_num_grad_steps=3, context_templates=["{}"], mom2_n_tokens=2000)
    edit = rome(tiny_model, REQ, hparams=hp)
    assert [l for l, _ in seen] == [0, 1] and all(fp == before for _, fp in seen)
    assert len(edit.info["layers"]) == 2


def test_relation_before_subject_locus(tiny_model):
    row = fact_row(tiny_model, "The capital of {} is", "Miles Davis", "relation_before_subject")
    assert tiny_model.tokenizer.decode([row.ids[row.pos]]) == " of"
    with pytest.raises(EditError):
        fact_row(tiny_model, "{} plays the", "Miles Davis", "relation_before_subject")
    edit = rome(tiny_model, REQ, locus="relation_before_subject",
                hparams=ROMEHyperParams(layers=[1], v_num_grad_steps=2, context_templates=["{}"],
                                        mom2_adjustment=False))
    assert edit.locus == "relation_before_subject" and edit.info["layers"][0]["fact_token_str"] == " of"
