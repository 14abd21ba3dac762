"""trace(method="attribution"): first-order estimates of every cell, in the exact trace's result class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.architecture import FAMILY_NAMES
from workbench.tracing import TraceResult, trace, trace_dataset, window_layers
from workbench.tracing.api import TraceParameterError

PROMPT, SUBJECT = "Miles Davis plays the", "Miles Davis"


@pytest.fixture(scope="module")
def model64():
    """A tiny random GPT-2 in float64: exact and estimated effects compared far below float32 rounding."""
    from workbench.loading import random_model

    return random_model(n_layers=3, d_model=64, n_heads=4, seed=0, device="cpu", dtype=torch.float64)


def relative_error(model, nu: float, window: int = 1, samples: int = 3) -> dict[str, float]:
    kw = dict(subject=SUBJECT, samples=samples, noise=nu, window=window)
    exact = trace(model, PROMPT, engine="batched", **kw)
    approx = trace(model, PROMPT, method="attribution", **kw)
    return {k: float(np.abs(exact.ie(k) - approx.ie(k)).max() / np.abs(exact.ie(k)).max()) for k in exact.kinds}


def test_equals_the_exact_effect_to_first_order(model64):
    """With window 1 every estimate is the first-order Taylor term of its exact effect: the error
    relative to the effect shrinks in proportion to the noise (the corrupted-clean distance).
    (Both score probabilities in float32, which floors the error near 0.5% below nu = 1e-3.)"""
    coarse, fine = relative_error(model64, 1e-2), relative_error(model64, 1e-3)
    for kind in coarse:
        assert fine[kind] < 0.05, (kind, fine)
        assert fine[kind] < coarse[kind] / 5, (kind, coarse, fine)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_first_order_on_every_family(model_type):
    """The hook points' gradients are the right ones in every family (parallel blocks, rotary, GQA)."""
    from workbench.architecture import random_bridge

    model = random_bridge(model_type, n_layers=2, d_model=64, n_heads=4, initializer_range=0.3,
                          dtype=torch.float64, device="cpu")
    coarse, fine = relative_error(model, 1e-2, samples=2), relative_error(model, 1e-3, samples=2)
    for kind in coarse:
        assert fine[kind] < 0.1 and fine[kind] < coarse[kind] / 3, (model_type, kind, coarse, fine)


def test_windows_sum_their_layers(model64):
    """An mlp/attn cell with a window is the sum of its layers' single-layer estimates."""
    kw = dict(subject=SUBJECT, samples=3, noise=0.1, method="attribution")
    one = trace(model64, PROMPT, window=1, **kw)
    two = trace(model64, PROMPT, window=2, **kw)
    L = model64.cfg.n_layers
    for kind in ("mlp", "attn"):
        for layer in range(L):
            summed = sum(one.ie(kind)[:, j] for j in window_layers(layer, L, 2))
            np.testing.assert_allclose(two.ie(kind)[:, layer], summed, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(two.ie("hidden"), one.ie("hidden"), rtol=0, atol=0)


def test_shapes_metadata_and_round_trip(toy_model, tmp_path):
    from workbench.facts import load_facts
    from workbench.plots import plot_trace

    fact = load_facts("toy-facts")[0]
    kw = dict(subject=fact.subject, samples=4)
    exact = trace(toy_model, fact.prompt, **kw)
    approx = trace(toy_model, fact.prompt, method="attribution", **kw)
    assert (exact.method, approx.method, approx.engine) == ("exact", "attribution", "attribution")
    assert approx.kinds == exact.kinds and approx.tokens == exact.tokens and approx.window == exact.window
    assert approx.answer_id == exact.answer_id
    assert approx.p_clean == pytest.approx(exact.p_clean, abs=1e-6)
    assert approx.p_corrupt == pytest.approx(exact.p_corrupt, abs=1e-6)
    for kind in exact.kinds:
        assert approx.scores[kind].shape == exact.scores[kind].shape == (len(exact.tokens), toy_model.cfg.n_layers)
        before = np.arange(len(exact.tokens)) < min(exact.corrupted_span.positions)
        assert (approx.scores[kind][before] == approx.p_corrupt).all()
        assert np.abs(approx.ie(kind)).max() > 1e-3  # an estimate, not zeros
    again = TraceResult.load_json(approx.save_json(tmp_path / "a.json"))
    assert again.method == "attribution"
    assert TraceResult.from_dict({k: v for k, v in exact.to_dict().items() if k != "method"}).method == "exact"
    title = plot_trace(approx).layout.title.text
    assert "first-order estimates" in title and "first-order" not in plot_trace(exact).layout.title.text


def test_bad_method_or_engine(model64):
    with pytest.raises(TraceParameterError, match="method must be one of"):
        trace(model64, PROMPT, subject=SUBJECT, method="gradient")
    with pytest.raises(TraceParameterError, match="its own engine"):
        trace(model64, PROMPT, subject=SUBJECT, method="attribution", engine="loop")


def test_command_line_switch(toy_model, tmp_path, capsys):
    from workbench.cli import main
    from workbench.facts import load_facts

    fact = load_facts("toy-facts")[0]
    out = tmp_path / "t.json"
    rc = main(["trace", "--model", "toy-facts", "--device", "cpu", "--prompt", fact.prompt, "--subject", fact.subject,
               "--samples", "2", "--method", "attribution", "--json", str(out)])
    assert rc == 0
    assert "method:    attribution" in capsys.readouterr().out
    assert TraceResult.load_json(out).method == "attribution"


def test_dataset_sweep_records_the_method(toy_model, tmp_path):
    from workbench.facts import load_facts
    from workbench.store import StoreError

    facts = load_facts("toy-facts")[:3]
    kw = dict(samples=2, kinds=("hidden",), progress=False)
    res = trace_dataset(toy_model, facts, method="attribution", out=tmp_path / "a", **kw)
    assert res.method == "attribution" and res.n_facts == 3 and res.n_skipped < 3
    assert trace_dataset(toy_model, facts, **kw).method == "exact"
    with pytest.raises(StoreError):  # an attribution folder refuses an exact sweep (and the other way)
        trace_dataset(toy_model, facts, out=tmp_path / "a", **kw)


def test_agreement_ranks_cells_from_the_corruption_on(model64):
    from dataclasses import replace

    from workbench.tracing.attribution import agreement

    kw = dict(subject=SUBJECT, samples=2, noise=0.5)
    exact = trace(model64, PROMPT, **kw)
    first = min(exact.corrupted_span.positions)
    same = agreement(exact, exact)
    assert set(same) == set(exact.kinds)
    assert all(a.spearman == pytest.approx(1.0) and a.top_cell_same for a in same.values())
    assert same["hidden"].cells == (len(exact.tokens) - first) * model64.cfg.n_layers
    flipped = replace(exact, scores={k: 2 * exact.p_corrupt - v for k, v in exact.scores.items()})
    assert all(a.spearman == pytest.approx(-1.0) and not a.top_cell_same for a in agreement(exact, flipped).values())
    with pytest.raises(ValueError, match="different prompts"):
        agreement(exact, trace(model64, "Miles Davis plays the trumpet", **kw))
