"""KN baseline: integrated-gradients attribution, neuron selection, and the W_out row edit."""

from __future__ import annotations

import pytest
import torch

from workbench.editing import Edit
from workbench.editing.kn import KNHyperParams, integrated_gradients, kn, kn_prompts, select_neurons
from workbench.facts import Fact
from workbench.loading import model_fingerprint
from workbench.predict import next_token_probs, object_token_ids
from workbench.spans import SpanError

FACT = Fact(subject="Varo Keltin", template="The mother tongue of {} is", target_true="French",
            target_new="Tuvan", relation_id="P103", id=1,
            paraphrases=("Varo Keltin speaks", "Varo Keltin grew up speaking", "Mira Dos speaks"))


def test_ig_completeness(tiny_model):
    """Per layer, attributions sum to P(full) - P(layer's units zeroed) (Riemann sum, 50 steps)."""
    tok = object_token_ids(tiny_model, "French")[0]
    attr, kept = integrated_gradients(tiny_model, [FACT.prompt], FACT.subject, tok, "relation", steps=50)
    assert attr.shape == (1, tiny_model.cfg.n_layers, tiny_model.cfg.d_mlp) and kept == [FACT.prompt]
    p_full = next_token_probs(tiny_model, [FACT.prompt])[0, tok]
    for layer in range(tiny_model.cfg.n_layers):
        def zero(x, hook):
            x = x.clone()
            x[0, -1] = 0
            return x
        logits = tiny_model.run_with_hooks(tiny_model.to_tokens(FACT.prompt),
                                           fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", zero)])
        p0 = torch.softmax(logits[0, -1], -1)[tok]
        assert float(attr[0, layer].sum()) == pytest.approx(float(p_full - p0), rel=0.05, abs=1e-6)


def test_ig_batches_agree_and_skip_prompts_without_subject(tiny_model):
    tok = object_token_ids(tiny_model, "French")[0]
    prompts = kn_prompts(FACT, refine=True)
    a, kept = integrated_gradients(tiny_model, prompts, FACT.subject, tok, "subject", steps=4, batch_size=7)
    b, _ = integrated_gradients(tiny_model, prompts, FACT.subject, tok, "subject", steps=4, batch_size=1000)
    assert "Mira Dos speaks" not in kept and len(kept) == 3
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(SpanError):
        integrated_gradients(tiny_model, ["Mira Dos speaks"], FACT.subject, tok)


def test_original_baseline_defaults():
    """The original KN baseline: the request prompt only, refine off, 0.4 of the max, lam = 2."""
    hp = KNHyperParams()
    assert (hp.threshold, hp.lam, hp.refine, hp.max_neurons) == (0.4, 2.0, False, None)
    assert kn_prompts(FACT) == [FACT.prompt]
    assert kn_prompts(FACT, refine=True)[1:] == list(FACT.paraphrases)


def test_ig_grid_includes_alpha_one(tiny_model, monkeypatch):
    """With 2 steps the grid is alpha = 0 and 1: attribution = a * (grad at 0 + grad at a) / 2."""
    tok = object_token_ids(tiny_model, "French")[0]
    attr, _ = integrated_gradients(tiny_model, [FACT.prompt], FACT.subject, tok, "relation", steps=2, layers=[1])
    acts = {}
    tiny_model.run_with_hooks(tiny_model.to_tokens(FACT.prompt), fwd_hooks=[(
        "blocks.1.mlp.hook_post", lambda x, hook: acts.setdefault("a", x[0, -1].detach().clone()))])
    a = acts["a"]
    grads = []
    for alpha in (0.0, 1.0):
        scaled = (alpha * a).clone().requires_grad_(True)

        def patch(x, hook):
            x = x.clone()
            x[0, -1] = scaled
            return x
        logits = tiny_model.run_with_hooks(tiny_model.to_tokens(FACT.prompt), fwd_hooks=[("blocks.1.mlp.hook_post", patch)])
        (g,) = torch.autograd.grad(torch.softmax(logits[0, -1], -1)[tok], scaled)
        grads.append(g)
    torch.testing.assert_close(attr[0, 1], a * (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-7)


def test_select_neurons():
    attr = torch.zeros(4, 2, 5)
    attr[:, 1, 3] = 1.0           # top unit in every prompt
    attr[:2, 0, 2] = 0.5          # in half of the prompts
    attr[0, 0, 4] = 0.9           # in one prompt only
    attr[:, 1, 0] = 0.1           # below 0.2 x max everywhere
    neurons, fallback = select_neurons(attr, threshold=0.2, prompt_fraction=0.5)
    assert neurons == [(1, 3), (0, 2)] and not fallback
    assert select_neurons(attr, 0.2, 0.5, max_neurons=1)[0] == [(1, 3)]
    none, fallback = select_neurons(-torch.ones(2, 2, 3) + 0.01 * torch.arange(3), 0.2, 0.5)
    assert fallback and len(none) == 1


def test_kn_edit_rows(tiny_model):
    before = model_fingerprint(tiny_model)
    edit = kn(tiny_model, FACT, locus="subject", steps=4, lam=2.0)
    assert model_fingerprint(tiny_model) == before
    assert isinstance(edit, Edit) and edit.method == "kn" and edit.locus == "subject"
    W_E = tiny_model.W_E
    d = W_E[object_token_ids(tiny_model, "Tuvan")[0]] - W_E[object_token_ids(tiny_model, "French")[0]]
    touched = set()
    for name, delta in edit.deltas.items():
        layer = int(name.split(".")[2])
        for unit in delta.abs().sum(1).nonzero().squeeze(-1).tolist():
            touched.add((layer, unit))
            torch.testing.assert_close(delta[unit], 2.0 * d)
    assert touched == {tuple(n) for n in edit.info["neurons"]}
    with edit.applied(tiny_model):
        assert model_fingerprint(tiny_model) != before
    assert model_fingerprint(tiny_model) == before


def test_kn_locus_and_auto_lambda(tiny_model):
    a = kn(tiny_model, FACT, locus="subject", steps=4)
    b = kn(tiny_model, FACT, "Polish", locus="relation", steps=4, preset="kn-calibrated", lam_grid=(0.5, 1.0, 1e4))
    assert a.info["neurons"] != b.info["neurons"]
    assert b.info["lam"] in (0.5, 1.0, 1e4) and b.info["lam_tried"][-1] == b.info["lam"]
    assert b.hparams["preset"] == "kn-calibrated" and a.hparams["preset"] == "kn-original"
    c = kn(tiny_model, FACT, locus="relation_before_subject", steps=4)
    assert c.info["neurons"] != b.info["neurons"]
    with pytest.raises(SpanError):  # a subject-first prompt has no relation token before the subject
        kn(tiny_model, Fact(subject="Varo Keltin", template="{} speaks", target_true="French", target_new="Tuvan"),
           locus="relation_before_subject", steps=2)
    with pytest.raises(ValueError):
        kn(tiny_model, FACT, locus="everywhere")
    with pytest.raises(ValueError):
        kn(tiny_model, FACT, new_object="French")
