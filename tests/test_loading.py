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


# ------------------------------------------------------------------ bad model folders (issue: inputs at the border)

def _copy_bundled(dst, skip=()):
    import shutil

    from workbench.loading import bundled_path

    dst.mkdir()
    for f in bundled_path().iterdir():
        if f.name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "workbench_manifest.json") and \
                f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_folder_without_tokenizer_is_refused(tmp_path):
    """Problem 3: no tokenizer files used to load a 1-entry tokenizer that maps every prompt to [0]."""
    folder = _copy_bundled(tmp_path / "m", skip=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(folder, device="cpu")


def test_tokenizer_of_another_size_is_refused(tiny_model):
    from types import SimpleNamespace

    from workbench.loading import check_tokenizer

    tok = tiny_model.workbench_hf_tokenizer
    check_tokenizer(tok, SimpleNamespace(vocab_size=len(tok)))
    with pytest.raises(ModelLoadError, match="embeds only"):
        check_tokenizer(tok, SimpleNamespace(vocab_size=len(tok) - 1))
    with pytest.raises(ModelLoadError, match="another model"):
        check_tokenizer(tok, SimpleNamespace(vocab_size=len(tok) * 3))


@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_unreadable_weights_name_the_file(tmp_path, damage):
    """Problem 11: a corrupt safetensors file gave a raw SafetensorError naming no file."""
    import os

    folder = _copy_bundled(tmp_path / "m")
    w = folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(4096))
    with pytest.raises(ModelLoadError, match=f"{w}.*not a readable safetensors file"):
        load_model(folder, device="cpu")


def test_invalid_config_and_wrong_width_name_the_file(tmp_path):
    """Problem 11: invalid config.json (no file named) and a wrong n_embd ("look at the above report")."""
    import json

    folder = _copy_bundled(tmp_path / "a")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"{folder / 'config.json'} is not a readable JSON config"):
        load_model(folder, device="cpu")
    folder = _copy_bundled(tmp_path / "b")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_embd"] *= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"c_attn.weight is \(128, 384\), config gives \(256, 768\)"):
        load_model(folder, device="cpu")


def test_unsupported_architecture_fails_at_load_naming_hooks(tmp_path):
    """Problem 14: a Mamba model loaded and then failed later with a hook-name KeyError."""
    from transformers import MambaConfig, MambaForCausalLM

    tok = load_model("toy-facts", device="cpu").workbench_hf_tokenizer
    MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, state_size=4)
                     ).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not supported.*blocks.0.hook_mlp_out"):
        load_model(tmp_path, device="cpu")


def test_load_model_moves_the_weights_to_the_device(monkeypatch):
    """Problem 8: the bridge does not move a model it is handed; load_model must (spied: no GPU here)."""
    import workbench.loading as loading

    real, moved = loading._load_folder, []

    def spying(path, dtype):
        model, tok = real(path, dtype)
        original = model.to

        def to(*args, **kwargs):
            moved.append(kwargs.get("device", args[0] if args else None))
            return original(*args, **kwargs)

        model.to = to
        return model, tok

    monkeypatch.setattr(loading, "_load_folder", spying)
    monkeypatch.setattr(loading, "resolve_spec", lambda spec: ("folder", loading.bundled_path()))
    model = load_model("toy-facts", device="cpu")
    assert moved and str(moved[0]) == "cpu"
    assert {p.device.type for p in hf_model(model).parameters()} == {"cpu"}


def test_save_hf_tokenizer_tokenizes_like_the_original(toy_model, tmp_path):
    """Problem 15: the saved tokenizer prepended BOS by itself ([0, 341, 740] instead of [341, 740])."""
    from transformers import AutoTokenizer

    from workbench.loading import bundled_path
    from workbench.spans import tokenize

    save_hf(toy_model, tmp_path)
    text = "Varo Keltin was born in"
    original = AutoTokenizer.from_pretrained(str(bundled_path()))(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"] == original
    again = load_model(tmp_path, device="cpu")
    assert tokenize(again, text).ids == tokenize(toy_model, text).ids


def test_bare_bundled_name_is_reserved_and_says_so(tmp_path, monkeypatch):
    """Problem 14: `--model toy-facts` silently preferred the bundled model over a ./toy-facts folder."""
    from workbench.loading import bundled_path, resolve_spec

    monkeypatch.chdir(tmp_path)
    assert resolve_spec("toy-facts") == ("bundled", bundled_path())
    _copy_bundled(tmp_path / "toy-facts")
    with pytest.warns(UserWarning, match=r"pass './toy-facts'"):
        assert resolve_spec("toy-facts")[0] == "bundled"
    kind, path = resolve_spec("./toy-facts")
    assert kind == "folder" and path.resolve() == (tmp_path / "toy-facts").resolve()
    assert resolve_spec("bundled:toy-facts") == ("bundled", bundled_path())


def _edited_config(tmp_path, name, **changes):
    import json

    folder = _copy_bundled(tmp_path / name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"n_layer": 4}, r"the config has 4 layers but the weights hold 6; .*unexpected tensors in the weights: "
                     r"transformer.h.4"),
    ({"n_layer": 8}, r"the config has 8 layers but the weights hold 6; tensors missing from the weights: "
                     r"transformer.h.6"),
    ({"model_type": "llama"}, r"model_type 'llama'.*tensors missing from the weights: model.embed_tokens.weight"),
])
def test_config_that_disagrees_with_the_weights_is_refused(tmp_path, monkeypatch, changes, match):
    """Issue 21: n_layer 6->4 dropped two layers, 6->8 added two random ones, and model_type llama with GPT-2
    weights built a default-size Llama (killed for memory): all loaded without a word."""
    import transformers

    folder = _edited_config(tmp_path, "m", **changes)
    built = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: built.append(a) or real(*a, **k))
    with pytest.raises(ModelLoadError, match=match):
        load_model(folder, device="cpu")
    assert built == []  # refused before any model was built


def test_head_count_no_shape_shows_is_checked_by_the_manifest(tmp_path, capsys):
    """Issue 21: n_head 4->8 loaded and predicted garbage. No weight shape shows the head count: the sealed
    manifest does, and `workbench info` states which fields only it can check."""
    import json

    from workbench.cli import main
    from workbench.loading import MANIFEST

    folder = _edited_config(tmp_path, "m", n_head=8)
    with pytest.raises(ModelLoadError, match=r"n_head: config.json has 8, saved 4"):
        load_model(folder, device="cpu")
    (folder / MANIFEST).unlink()  # a folder without a manifest: loads, and info says what was not checked
    assert main(["info", "--model", str(folder), "--device", "cpu"]) == 0
    assert "n_head cannot be checked by the weights' shapes" in capsys.readouterr().out
    assert main(["info", "--model", "toy-facts", "--device", "cpu"]) == 0
    assert f"n_head by the folder's sealed {MANIFEST}" in capsys.readouterr().out
    folder = _copy_bundled(tmp_path / "d")  # a damaged manifest
    record = json.loads((folder / MANIFEST).read_text())
    record["config"]["n_head"] = 8
    (folder / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match=f"{folder / MANIFEST} does not match its recorded SHA-256"):
        load_model(folder, device="cpu")


def test_save_hf_refuses_a_non_empty_folder(tiny_model, toy_model, tmp_path):
    """Issue 21: save_hf into a non-empty folder left another model's tokenizer files; the folder then failed
    to load."""
    out = save_hf(toy_model, tmp_path / "m")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="is not empty.*overwrite=True"):
        save_hf(tiny_model, out)
    assert load_model(out, device="cpu").cfg.n_layers == 6  # untouched
    save_hf(tiny_model, out, overwrite=True)
    again = load_model(out, device="cpu")
    assert again.cfg.n_layers == tiny_model.cfg.n_layers and len(again.tokenizer) == len(tiny_model.tokenizer)
    assert (out / "notes.txt").read_text() == "mine"  # only the model's files were cleared
