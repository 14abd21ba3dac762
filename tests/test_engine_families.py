"""The incremental tracing engine on every family: equal to one forward per cell, through the model's own blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.architecture import FAMILY_NAMES
from workbench.tracing import severed_trace, trace
from workbench.tracing.incremental import IncrementalEngine

PROMPT, SUBJECT = "Miles Davis plays the", "Miles Davis"
KW = dict(subject=SUBJECT, samples=3, window=2, noise=0.5)


def max_diff(a, b) -> float:
    return max(float(np.abs(a.scores[k] - b.scores[k]).max()) for k in a.scores)


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_incremental_equals_one_forward_per_cell(family_models, model_type):
    model = family_models(model_type)
    assert IncrementalEngine.supports(model)
    for corrupt in ("subject", "relation"):
        fast = trace(model, PROMPT, corrupt=corrupt, engine="incremental", **KW)
        slow = trace(model, PROMPT, corrupt=corrupt, engine="loop", **KW)
        assert fast.engine == "incremental" and slow.engine == "loop"
        assert fast.p_clean - fast.p_corrupt != 0
        assert max_diff(fast, slow) < 1e-6, (model_type, corrupt)
        # the maps are not trivial: restoring changes the answer's probability somewhere
        assert max(np.abs(fast.scores[k] - fast.p_corrupt).max() for k in fast.scores) > 1e-3


@pytest.mark.parametrize("model_type", FAMILY_NAMES)
def test_incremental_severing_equals_batched(family_models, model_type):
    model = family_models(model_type)
    kw = {k: v for k, v in KW.items() if k != "window"}
    for token in ("last_subject", "last"):
        fast = severed_trace(model, PROMPT, engine="incremental", token=token, **kw)
        ref = severed_trace(model, PROMPT, engine="batched", token=token, **kw)
        assert fast.engine == "incremental"
        for curve in ("none", "mlp_severed", "attn_severed"):
            assert np.abs(getattr(fast, curve) - getattr(ref, curve)).max() < 1e-6, (model_type, token, curve)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_user_hooks_fall_back_to_the_batched_engine(family_models, model_type):
    model = family_models(model_type)
    seen = []

    def spy(x, hook):
        seen.append(tuple(x.shape))
        return x

    model.add_hook("blocks.1.hook_mlp_out", spy)
    try:
        with pytest.warns(UserWarning, match="batched engine"):
            res = trace(model, PROMPT, kinds=("hidden",), **KW)
    finally:
        model.reset_hooks()
    assert res.engine == "batched" and seen  # the user's hook ran, on full sequences
    assert trace(model, PROMPT, kinds=("hidden",), **KW).engine == "incremental"


@pytest.mark.parametrize("model_type", ["gpt_neox", "qwen2"])
def test_fast_precision_every_family(family_models, model_type):
    model = family_models(model_type)
    exact = trace(model, PROMPT, engine="incremental", **KW)
    assert max_diff(trace(model, PROMPT, engine="incremental", precision="fast", **KW), exact) == 0.0  # CPU: exact
    assert max_diff(trace(model, PROMPT, engine="incremental", precision="bf16", **KW), exact) < 0.1
