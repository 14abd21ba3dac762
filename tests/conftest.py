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
