"""MEMIT: shapes, the residual actually shrinks, transactions (tiny model); 50 facts (bundled model)."""

from __future__ import annotations

import importlib

import pytest
import torch

from workbench.editing import EditError, MEMITHyperParams, layer_stats, memit
from workbench.editing.common import activations_at, fact_row

from .conftest import fail_on_second_call, identical, snapshot

memit_mod = importlib.import_module("workbench.editing.memit")


REQS = [{"prompt": "The capital of {} is", "subject": s, "target_new": {"str": o}}
        for s, o in [("France", "trumpet"), ("Miles Davis", "Paris"), ("Varo Keltin", "Osla")]]
HP = dict(context_templates=[["{}"], ["Paris is loud. {}", "Tuvan. {}"]], v_num_grad_steps=5, clamp_norm_factor=10.0,
          v_weight_decay=0.0, mom2_update_weight=1.0)


def test_memit_moves_outputs_toward_z(tiny_model, tiny_stats, monkeypatch):
    zs = []
    real = memit_mod.compute_target

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        zs.append(res.target)
        return res

    monkeypatch.setattr(memit_mod, "compute_target", spy)
    before = snapshot(tiny_model)
    edit = memit(tiny_model, REQS, layers=[1, 2], hparams=HP, stats=tiny_stats, progress=False)
    assert identical(tiny_model, before)
    assert edit.method == "memit" and len(edit.requests) == 3
    assert sorted(edit.deltas) == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
    assert all(torch.isfinite(d).all() for d in edit.deltas.values())
    rows = [fact_row(tiny_model, r["prompt"], r["subject"], "subject") for r in REQS]
    z = torch.stack(zs)
    err0 = (activations_at(tiny_model, rows, ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"] - z).norm(dim=1)
    with edit.applied(tiny_model):
        err1 = (activations_at(tiny_model, rows, ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"] - z).norm(dim=1)
    assert (err1 < 0.5 * err0).all(), (err0, err1)
    assert identical(tiny_model, before)


def test_update_formula_single_layer(tiny_model, tiny_stats, monkeypatch):
    """With R = [l]: Δ = (z - cur) Kᵀ (λC + K Kᵀ)⁻¹, K the group-averaged keys."""
    zs = []
    real = memit_mod.compute_target
    monkeypatch.setattr(memit_mod, "compute_target", lambda *a, **k: zs.append(real(*a, **k)) or zs[-1])
    lam = 3.0
    edit = memit(tiny_model, REQS, layers=[2], hparams={**HP, "mom2_update_weight": lam}, stats=tiny_stats,
                 progress=False)
    groups = HP["context_templates"]
    K = []
    for r in REQS:
        per_group = []
        for g in groups:
            rows = [fact_row(tiny_model, r["prompt"], r["subject"], "subject", context=t) for t in g]
            per_group.append(activations_at(tiny_model, rows, ["blocks.2.mlp.hook_post"])["blocks.2.mlp.hook_post"].mean(0))
        K.append(torch.stack(per_group).mean(0))
    K = torch.stack(K, dim=1).double()  # [d_mlp, n]
    rows = [fact_row(tiny_model, r["prompt"], r["subject"], "subject") for r in REQS]
    cur = activations_at(tiny_model, rows, ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"].T.double()
    z = torch.stack([res.target for res in zs], dim=1).double()
    C = tiny_stats[2].mom2
    expected = ((z - cur) @ K.T @ torch.linalg.inv(lam * C + K @ K.T)).T
    got = edit.deltas["transformer.h.2.mlp.c_proj.weight"].double()
    assert float((got - expected).norm() / expected.norm()) < 1e-3


@pytest.mark.parametrize("failure", ["error", "interrupt"])
def test_transaction_mid_edit(tiny_model, tiny_stats, monkeypatch, failure):
    """Layer 0 is updated in place before layer 1's keys are read; a failure then must restore it."""
    before = snapshot(tiny_model)
    calls = fail_on_second_call(monkeypatch, memit_mod, "compute_keys", failure)
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else RuntimeError):
        memit(tiny_model, REQS, layers=[0, 1], hparams={**HP, "v_num_grad_steps": 2}, stats=tiny_stats, progress=False)
    assert calls["n"] == 2
    assert identical(tiny_model, before)


def test_bad_requests(tiny_model, tiny_stats):
    before = snapshot(tiny_model)
    with pytest.raises(EditError):
        memit(tiny_model, [], layers=[1], hparams=HP, stats=tiny_stats)
    with pytest.raises(EditError):  # the second request has no new object: nothing is computed
        memit(tiny_model, [REQS[0], {"prompt": "{} is", "subject": "X"}], layers=[1], hparams=HP, stats=tiny_stats)
    assert identical(tiny_model, before)
    assert MEMITHyperParams().clamp_norm_factor == 0.75


# ----------------------------------------------------------------------------- bundled model
from workbench.loading import assets_dir  # noqa: E402
from workbench.predict import next_token_probs, object_token_ids  # noqa: E402


BUNDLED = assets_dir() / "toy-facts" / "model.safetensors"


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled model not built (assets/toy-facts)")
def test_bundled_memit_50_facts(toy_model, tmp_path_factory):
    import random

    from workbench.editing import MEMIT_TOY
    from workbench.facts import load_facts

    def first(objs):
        return torch.tensor([object_token_ids(toy_model, o)[0] for o in objs])

    def argmax(prompts):
        return next_token_probs(toy_model, prompts).argmax(-1).cpu()

    facts = load_facts("toy-facts")
    random.Random(1).shuffle(facts)
    known = [f for f in facts[:400] if bool(argmax([f.prompt])[0] == first([f.target_true])[0])]
    edited = known[:50]
    subjects = {f.subject for f in edited}
    unrelated = [f for f in known[50:] if f.subject not in subjects][:100]
    assert len(edited) == 50 and len(unrelated) >= 50
    cache = tmp_path_factory.getbasetemp() / "editing-stats"
    stats = {l: layer_stats(toy_model, l, n_tokens=30_000, cache_dir=cache, progress=False) for l in MEMIT_TOY.layers}
    before = snapshot(toy_model)
    edit = memit(toy_model, edited, hparams=MEMIT_TOY, stats=stats, progress=False)
    assert identical(toy_model, before)
    new = first([f.target_new for f in edited])
    with edit.applied(toy_model):
        efficacy = (argmax([f.prompt for f in edited]) == new).float().mean().item()
        para = [(argmax(list(f.paraphrases)) == first([f.target_new])[0]).float() for f in edited]
        paraphrase = torch.cat(para).mean().item()
        kept = (argmax([f.prompt for f in unrelated]) == first([f.target_true for f in unrelated])).float().mean().item()
    assert identical(toy_model, before)
    print(f"\nMEMIT bundled, 50 facts: efficacy {efficacy:.3f}, paraphrase {paraphrase:.3f}, "
          f"unrelated kept {kept:.3f} (n={len(unrelated)})")
    assert efficacy > 0.5  # measured 0.64 here, 0.86 on another 50; locality is weak on this model (0.36-0.51)
    assert kept >= 0.3
