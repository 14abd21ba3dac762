"""Multi-token new objects through every editing method, on the bundled model.

The bundled world's objects are one token each; CounterFact's are often several. The model is not
retrained for this: it knows its one-token true objects, and each method edits a fact to a two-token
(" Lima", " Peru") and a three-token (" Cairo", " in", " Egypt") new object. Every token of both is one
the model saw in training (a token it never saw, such as " C" of "Cairo City", has an untrained
unembedding row that no edit can raise far above uniform, and would test the model, not the method).

Each method's loss is checked against a direct teacher-forced re-derivation over *all* of the object's
tokens (the reference definitions: ROME's and MEMIT's target loss, FT's loss, MEND's edit loss), and
each edit must raise the log-probability of every one of the object's tokens, not only the first.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import workbench as wb
from workbench.editing.hparams import MEMIT_TOY, ROME_TOY
from workbench.perspective import request_fact
from workbench.predict import object_token_ids, score_objects
from workbench.spans import tokenize

pytestmark = pytest.mark.filterwarnings("ignore::workbench.editing.edit.EditNotReachedWarning")

TWO, THREE = "Lima Peru", "Cairo in Egypt"


@pytest.fixture(scope="module")
def fact():
    """The first birthplace fact of the bundled world (o = " Rome"), asked subject-first."""
    f = next(f for f in wb.load_facts("toy-facts") if f.relation_id == "P19")
    return request_fact(f, "entity")


def token_logprobs(model, prompt: str, obj: str) -> list[float]:
    """Teacher-forced log P of each of ``obj``'s tokens after ``prompt`` (one plain forward pass)."""
    ids = list(tokenize(model, prompt).ids)
    o = object_token_ids(model, obj)
    with torch.no_grad():
        logits = model(torch.tensor([ids + o[:-1]], device=model.cfg.device), return_type="logits")[0]
    lp = torch.log_softmax(logits[len(ids) - 1:].float(), dim=-1)
    return [float(lp[j, t]) for j, t in enumerate(o)]


def direct_nll(model, prompt: str, obj: str) -> float:
    """Mean NLL over all of ``obj``'s tokens: the loss every method's multi-token path must use."""
    lps = token_logprobs(model, prompt, obj)
    return -sum(lps) / len(lps)


def rises(model, edit, prompt: str, obj: str) -> list[float]:
    """How much the edit raises each of ``obj``'s token log-probs (nats)."""
    before = token_logprobs(model, prompt, obj)
    with edit.applied(model):
        after = token_logprobs(model, prompt, obj)
    return [a - b for a, b in zip(after, before)]


def test_objects_are_two_and_three_tokens(toy_model, fact):
    assert len(object_token_ids(toy_model, TWO)) == 2 and len(object_token_ids(toy_model, THREE)) == 3
    assert len(object_token_ids(toy_model, fact.target_true)) == 1


@pytest.mark.parametrize("obj", [TWO, THREE])
def test_rome_and_memit_target_loss_covers_every_object_token(toy_model, fact, obj):
    """The first value-optimisation loss, before any step, is the mean NLL of all of o*'s tokens."""
    one = dict(v_num_grad_steps=1, context_templates=["{}"], kl_factor=0.0)
    rome = wb.rome(toy_model, fact, obj, hparams={**ROME_TOY.to_dict(), **one})
    memit = wb.memit(toy_model, [fact.with_new(obj)], hparams={**MEMIT_TOY.to_dict(), **one})
    expected = direct_nll(toy_model, fact.prompt, obj)
    assert rome.info["layers"][0]["losses"][0]["nll"] == pytest.approx(expected, rel=1e-4)
    assert memit.info["z"][0]["nll"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("obj", [TWO, THREE])
def test_rome_raises_every_object_token(toy_model, fact, obj):
    edit = wb.rome(toy_model, fact, obj)
    assert min(rises(toy_model, edit, fact.prompt, obj)) > 5
    if obj == TWO:  # the two-token object is reached: all tokens are the argmax (the `_acc` criterion)
        with edit.applied(toy_model):
            assert score_objects(toy_model, [(fact.prompt, obj)])[0].correct


@pytest.mark.parametrize("obj", [TWO, THREE])
def test_memit_raises_every_object_token(toy_model, fact, obj):
    edit = wb.memit(toy_model, [fact.with_new(obj)])
    assert min(rises(toy_model, edit, fact.prompt, obj)) > 5


@pytest.mark.parametrize("obj", [TWO, THREE])
def test_ft_loss_covers_every_object_token(toy_model, fact, obj):
    edit = wb.ft(toy_model, fact, obj)
    assert edit.info["loss"][0] == pytest.approx(direct_nll(toy_model, fact.prompt, obj), rel=1e-4)
    assert min(rises(toy_model, edit, fact.prompt, obj)) > 5


@pytest.mark.parametrize("obj", [TWO, THREE])
def test_mend_edit_loss_covers_every_object_token(toy_model, fact, obj):
    edit = wb.mend(toy_model, fact, obj)
    assert edit.info["n_target_tokens"] == len(object_token_ids(toy_model, obj))
    assert edit.info["edit_nll_before"] == pytest.approx(direct_nll(toy_model, fact.prompt, obj), rel=1e-4)
    up = rises(toy_model, edit, fact.prompt, obj)
    assert sum(up) / len(up) > 2 and up[0] > 5


@pytest.mark.parametrize("obj", [TWO, THREE])
def test_kn_original_adds_every_new_token_and_raises_each(toy_model, fact, obj):
    """kn-original's edit (the original ``modify_weights``): each selected unit's value vector gets
    -2 E[top prediction] + the sum of E over *every* token of o*; it raises each of o*'s tokens."""
    from workbench.predict import next_token_probs

    edit = wb.kn(toy_model, fact, obj)
    assert edit.hparams["preset"] == "kn-original"
    top = int(next_token_probs(toy_model, [fact.prompt])[0].argmax())
    W_E = toy_model.W_E.detach().float()
    row = -2 * W_E[top] + sum(W_E[t] for t in object_token_ids(toy_model, obj))
    neurons = {tuple(n) for n in edit.info["neurons"]}
    assert neurons
    for name, delta in edit.deltas.items():
        layer = int(name.split(".")[2])
        for unit in {u for l, u in neurons if l == layer}:
            torch.testing.assert_close(delta[unit].float(), row, rtol=1e-5, atol=1e-6)
    assert min(rises(toy_model, edit, fact.prompt, obj)) > 5


def test_kn_attribution_averages_every_object_token(toy_model, fact):
    """Attribution to an object of several tokens is the mean of the attributions to each of them
    (the original scores each object token at the prompt's last position)."""
    from workbench.editing.kn import integrated_gradients

    ids = object_token_ids(toy_model, THREE)
    kw = dict(locus="subject", steps=4, at="last", activation="pre")
    joint, _ = integrated_gradients(toy_model, [fact.prompt], fact.subject, ids, **kw)
    each = [integrated_gradients(toy_model, [fact.prompt], fact.subject, [t], **kw)[0] for t in ids]
    torch.testing.assert_close(joint, torch.stack(each).mean(0), rtol=1e-4, atol=1e-7)
