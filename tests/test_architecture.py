"""The per-family MLP weight description: names, layout, and hooks that carry the key."""

from __future__ import annotations

import pytest
import torch

from workbench.architecture import FAMILY_NAMES as FAMILIES
from workbench.architecture import ArchitectureError, check_key_hook, family, mlp_weights
from workbench.loading import hf_parameter


OUT = {"gpt2": "transformer.h.1.mlp.c_proj.weight", "gptj": "transformer.h.1.mlp.fc_out.weight",
       "gpt_neox": "gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "gpt_neo": "transformer.h.1.mlp.c_proj.weight",
       "llama": "model.layers.1.mlp.down_proj.weight", "mistral": "model.layers.1.mlp.down_proj.weight",
       "qwen2": "model.layers.1.mlp.down_proj.weight"}


def test_gpt2_description_is_the_bridge_w_out(tiny_model):
    w = mlp_weights(tiny_model, 1)
    assert family(tiny_model).name == "gpt2"
    assert w.out_name == "transformer.h.1.mlp.c_proj.weight" and w.orientation == "key_major"
    assert w.out_weight is tiny_model.blocks[1].mlp.W_out
    assert w.in_names == ("transformer.h.1.mlp.c_fc.weight",)
    assert w.out_bias_name == "transformer.h.1.mlp.c_proj.bias"
    assert (w.key_hook, w.out_hook) == ("blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_description(family_models, model_type):
    model = family_models(model_type)
    w = mlp_weights(model, 1)
    assert w.out_name == OUT[model_type]
    assert w.out_weight is hf_parameter(model, w.out_name)
    assert (w.d_mlp, w.d_model) == (256, 64)
    assert w.key_major(w.out_weight).shape == (256, 64)
    assert len(w.in_names) == (2 if model_type in ("llama", "mistral", "qwen2") else 1)
    # the key hook is exactly the output projection's input (act(gate)*up for gated MLPs),
    # and the out hook its output
    ids = model.tokenizer("Miles Davis plays the trumpet")["input_ids"]
    assert check_key_hook(model, 1, ids) == {"key": 0.0, "out": 0.0}
    # project() reproduces the projection: key @ W (+ bias) == hook_mlp_out
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in (w.key_hook, w.out_hook))
    bias = hf_parameter(model, w.out_bias_name) if w.out_bias_name else 0.0
    assert torch.allclose(w.project(cache[w.key_hook], w.out_weight) + bias, cache[w.out_hook], atol=1e-5)
    upd = torch.randn(256, 64)
    assert torch.equal(w.key_major(w.to_stored(upd)), upd)


def test_unknown_family_and_layer(tiny_model, monkeypatch):
    with pytest.raises(ArchitectureError, match="out of range"):
        mlp_weights(tiny_model, 7)
    monkeypatch.setattr(tiny_model.original_model.config, "model_type", "bloom")
    with pytest.raises(ArchitectureError, match="bloom"):
        family(tiny_model)
