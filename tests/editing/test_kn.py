"""KN baseline: integrated-gradients attribution, neuron selection, and the W_out row edit."""

from __future__ import annotations

import pytest
import torch

from workbench.editing import Edit
from workbench.editing.kn import (KN_PRESETS, KNHyperParams, integrated_gradients, kn, kn_prompts, kn_subject,
                                  select_neurons)
from workbench.editing.presets import HyperParameterError
from workbench.facts import Fact
from workbench.loading import hf_model, model_fingerprint
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


def test_original_baseline_settings(tiny_model):
    """kn-original is kmeng01/rome hparams/KN/gpt2-xl.json with knowledge_neurons' arithmetic: adaptive threshold
    0.2, p = 0.4 (prompt sharing, unused without refine), 20 steps, the last token, c_fc's output (before the
    nonlinearity), every object token, the edit -2 E[top] + sum E[o*_j]."""
    hp = KN_PRESETS["kn-original"]
    assert hp == KNHyperParams()
    assert (hp.threshold, hp.prompt_fraction, hp.refine, hp.steps, hp.max_neurons) == (0.2, 0.4, False, 20, None)
    assert (hp.attribution_at, hp.activation, hp.object_tokens, hp.edit_rule) == ("last", "pre", "all", "original")
    sub = KN_PRESETS["kn-subject"]  # the earlier KN, kept as a named ablation
    assert (sub.threshold, sub.attribution_at, sub.activation, sub.object_tokens, sub.edit_rule, sub.lam) == (
        0.4, "locus", "post", "first", "difference", 2.0)
    assert kn_prompts(FACT) == [FACT.prompt]
    assert kn_prompts(FACT, refine=True)[1:] == list(FACT.paraphrases)
    with pytest.raises(HyperParameterError, match="attribution_at"):
        KNHyperParams(attribution_at="middle").validate()
    with pytest.raises(HyperParameterError, match="difference"):
        KNHyperParams(lam="auto").validate()
    with pytest.raises(HyperParameterError, match="no scale"):
        kn(tiny_model, FACT, lam=4.0)  # the original rule is not scaled: refused, not ignored


def _reference_kn(model, prompt: str, old: str, new: str, steps: int = 20, threshold: float = 0.2):
    """A direct re-derivation of the original KN baseline on the Hugging Face model, one alpha and one object
    token at a time (knowledge_neurons.py get_scores_for_layer, get_coarse_neurons, modify_weights)."""
    hf = hf_model(model)
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    old_ids = tok(" " + old, add_special_tokens=False)["input_ids"]
    new_ids = tok(" " + new, add_special_tokens=False)["input_ids"]
    n_layers = hf.config.n_layer
    scores = []
    for layer in range(n_layers):
        c_fc = hf.transformer.h[layer].mlp.c_fc
        seen = {}
        handle = c_fc.register_forward_hook(lambda m, i, o: seen.setdefault("a", o[0, -1].detach().clone()))
        with torch.no_grad():
            hf(ids)
        handle.remove()
        a = seen["a"]
        per_token = []
        for target in old_ids:
            total = torch.zeros_like(a)
            for alpha in torch.linspace(0, 1, steps):
                x = (alpha * a).clone().requires_grad_(True)

                def patch(m, i, o, x=x):
                    o = o.clone()
                    o[0, -1] = x
                    return o
                handle = c_fc.register_forward_hook(patch)
                with torch.enable_grad():
                    p = torch.softmax(hf(ids).logits[0, -1], -1)[target]
                    (g,) = torch.autograd.grad(p, x)
                handle.remove()
                total += g
            per_token.append(a * total / steps)
        scores.append(torch.stack(per_token).mean(0))
    scores = torch.stack(scores)
    neurons = {tuple(n) for n in (scores > scores.max() * threshold).nonzero().tolist()}
    with torch.no_grad():
        top = int(hf(ids).logits[0, -1].argmax())
    wte = hf.transformer.wte.weight.detach()
    row = -2 * wte[top] + sum(wte[t] for t in new_ids)
    return neurons, row, scores


def test_kn_original_matches_a_direct_rederivation(tiny_model):
    """Neurons and W_out rows of kn-original equal the straightforward original computation (multi-token objects)."""
    fact = Fact(subject="Varo Keltin", template="The mother tongue of {} is", target_true="English",
                target_new="Tuvan", relation_id="P103", id=2)
    assert len(object_token_ids(tiny_model, "English")) > 1 and len(object_token_ids(tiny_model, "Tuvan")) > 1
    neurons, row, scores = _reference_kn(tiny_model, fact.prompt, "English", "Tuvan")
    assert 1 < len(neurons) < scores.numel() // 4  # the threshold selects, not everything
    edit = kn(tiny_model, fact, locus="subject", prepend_bos=False)
    assert {tuple(n) for n in edit.info["neurons"]} == neurons
    assert edit.hparams["preset"] == "kn-original" and edit.info["edit_rule"] == "original"
    for name, delta in edit.deltas.items():
        layer = int(name.split(".")[2])
        for unit in range(delta.shape[0]):
            if (layer, unit) in neurons:
                torch.testing.assert_close(delta[unit], row, rtol=1e-5, atol=1e-6)
            else:
                assert not delta[unit].any()
    assert {int(n.split(".")[2]) for n in edit.deltas} == {l for l, _ in neurons}
    # the attribution is at the last token for both requests: a relation-keyed call selects the same units
    again = kn(tiny_model, fact, locus="relation", prepend_bos=False)
    assert again.info["neurons"] == edit.info["neurons"]


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
    neurons, fallback = select_neurons(attr, threshold=0.2, prompt_fraction=0.4)
    assert neurons == [(1, 3), (0, 2)] and not fallback
    # the original keeps units coarse in *more than* p x n prompts: 2 of 4 is not more than half
    assert select_neurons(attr, threshold=0.2, prompt_fraction=0.5)[0] == [(1, 3)]
    assert select_neurons(attr, 0.2, 0.4, max_neurons=1)[0] == [(1, 3)]
    assert sorted(select_neurons(attr, 0.2, 0.0)[0]) == [(0, 2), (0, 4), (1, 3)]
    none, fallback = select_neurons(-torch.ones(2, 2, 3) + 0.01 * torch.arange(3), 0.2, 0.5)
    assert fallback and len(none) == 1


def test_kn_edit_rows(tiny_model):
    before = model_fingerprint(tiny_model)
    edit = kn_subject(tiny_model, FACT, locus="subject", steps=4, lam=2.0)
    assert model_fingerprint(tiny_model) == before
    assert isinstance(edit, Edit) and edit.method == "kn" and edit.locus == "subject"
    assert edit.hparams["preset"] == "kn-subject" and edit.info["edit_rule"] == "difference"
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
    a = kn(tiny_model, FACT, locus="subject", steps=4, preset="kn-subject")
    b = kn(tiny_model, FACT, "Polish", locus="relation", steps=4, preset="kn-calibrated", lam_grid=(0.5, 1.0, 1e4))
    assert a.info["neurons"] != b.info["neurons"]
    assert b.info["lam"] in (0.5, 1.0, 1e4) and b.info["lam_tried"][-1] == b.info["lam"]
    assert b.hparams["preset"] == "kn-calibrated" and a.hparams["preset"] == "kn-subject"
    c = kn_subject(tiny_model, FACT, locus="relation_before_subject", steps=4)
    assert c.info["neurons"] != b.info["neurons"]
    with pytest.raises(SpanError):  # a subject-first prompt has no relation token before the subject
        kn_subject(tiny_model, Fact(subject="Varo Keltin", template="{} speaks", target_true="French",
                                    target_new="Tuvan"), locus="relation_before_subject", steps=2)
    with pytest.raises(ValueError):
        kn(tiny_model, FACT, locus="everywhere")
    with pytest.raises(ValueError):
        kn(tiny_model, FACT, new_object="French")
