"""Model loading: bundled, local folder, hub name (offline error), random models."""

from __future__ import annotations

import time

import pytest
import torch

from workbench.loading import ModelLoadError, hf_model, load_model, model_fingerprint, model_info, random_model, save_hf


def test_bundled_model_loads_offline(toy_model):
    info = model_info(toy_model)
    assert info["n_layers"] >= 6 and info["spec"] == "toy-facts"
    # Raw weights: the bridge's W_out is the HF tensor itself, not a processed copy.
    assert toy_model.blocks[0].mlp.W_out.data_ptr() == hf_model(toy_model).transformer.h[0].mlp.c_proj.weight.data_ptr()


def test_local_folder_round_trip(tiny_model, tmp_path):
    folder = save_hf(tiny_model, tmp_path / "m")
    loaded = load_model(folder, device="cpu")
    tokens = tiny_model.to_tokens("The capital of France is")
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), tiny_model(tokens), atol=1e-6)
    assert model_fingerprint(loaded) == model_fingerprint(tiny_model)


def test_hub_name_offline_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(ModelLoadError) as err:
        load_model("gpt2-xl")
    assert time.time() - start < 5
    msg = str(err.value)
    assert "gpt2-xl" in msg and "toy-facts" in msg and "folder" in msg


def test_hub_unreachable_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.time()
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model("EleutherAI/gpt-j-6B")
    assert time.time() - start < 5


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="No model folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_fingerprint_tracks_weights(tiny_model):
    model = random_model(n_layers=2, d_model=32, n_heads=2, seed=3, device="cpu")
    before = model_fingerprint(model)
    assert model_fingerprint(random_model(n_layers=2, d_model=32, n_heads=2, seed=3, device="cpu")) == before
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, :] += 1e-3
    assert model_fingerprint(model) != before
