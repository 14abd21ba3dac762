"""Shared fixtures: tiny random GPT-2-shaped models built offline, and the bundled model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The models under test are tiny: one thread avoids thread-pool overhead that dominates
# their forward passes (and contention when the machine is shared).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    """A 3-layer, 64-wide random GPT-2 (float32, CPU)."""
    from workbench.loading import random_model

    return random_model(n_layers=3, d_model=64, n_heads=4, seed=0, device="cpu")


@pytest.fixture(scope="session")
def toy_model():
    """The bundled toy-facts model (CPU)."""
    from workbench.loading import load_model

    return load_model("toy-facts", device="cpu")



@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """``{model_type: loader}``: tiny random models of every family, saved as HF folders with the
    bundled tokenizer and loaded with ``load_model`` (built on first use, cached per session).

    3 layers, width 64; ``initializer_range=0.3`` makes next-token distributions peaked enough
    that edits can be checked to reach a new object.
    """
    from workbench.architecture import save_random_model
    from workbench.loading import load_model

    root = tmp_path_factory.mktemp("families")
    built: dict[str, object] = {}

    def get(model_type: str):
        if model_type not in built:
            folder = save_random_model(model_type, root / model_type, n_layers=3, d_model=64, n_heads=4,
                                       initializer_range=0.3, seed=0)
            built[model_type] = load_model(folder, device="cpu")
        return built[model_type]

    return get
