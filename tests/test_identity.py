"""Model identity from the config (never a folder name) and the presets it resolves to."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from transformers import GPT2Config, GPTJConfig

from workbench import identity
from workbench.cli import main
from workbench.editing.ft import FT_GPT2_XL, FT_GPT_J
from workbench.editing.hparams import MEMIT_GPT2_XL, MEMIT_GPT_J, ROME_GPT2_XL, ROME_GPT_J
from workbench.editing.presets import (UnknownModelError, UnknownModelWarning, register_presets, resolve,
                                       resolve_call, strict_presets)
from workbench.identity import model_identity
from workbench.loading import assets_dir, hf_model


def snapshot_folder(tmp_path, config) -> str:
    """A Hugging Face cache-style folder (``models--x/snapshots/<hash>``) holding only ``config.json``:
    identity and presets need nothing else (no 1.5 B random weights)."""
    folder = tmp_path / "models--someone--model" / "snapshots" / "0f3a9c2e1b7d4a6c8e5f"
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    return str(folder)


GPT2_XL = GPT2Config(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)
GPT_J = GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)


def test_gpt2_xl_snapshot_folder_resolves_to_the_originals(tmp_path):
    folder = snapshot_folder(tmp_path, GPT2_XL)
    ident = model_identity(folder)
    assert ident.key == "gpt2-xl" and ident.family == "gpt2"
    with strict_presets():  # known: no warning, no error
        rome, memit, ft, kn = (resolve(m, folder) for m in ("rome", "memit", "ft", "kn"))
    assert rome.preset == "rome:gpt2-xl" and rome.hparams == ROME_GPT2_XL and rome.hparams.prepend_bos is False
    assert rome.hparams.layers == [17] and rome.hparams.v_loss_layer == 47
    assert memit.hparams == MEMIT_GPT2_XL and memit.hparams.layers == [13, 14, 15, 16, 17]
    assert ft.preset == "ft-gpt2-xl" and ft.hparams == FT_GPT2_XL
    assert (ft.hparams.layer, ft.hparams.lr, ft.hparams.norm_constraint, ft.hparams.train_bias,
            ft.hparams.steps, ft.hparams.prepend_bos) == (0, 5e-4, 5e-4, True, 25, False)
    assert kn.preset == "kn-original" and kn.hparams.threshold == 0.2


def test_gpt_j_snapshot_folder_resolves_to_the_originals(tmp_path):
    folder = snapshot_folder(tmp_path, GPT_J)
    assert model_identity(folder).key == "gpt-j"
    with strict_presets():
        rome, memit, ft = (resolve(m, folder) for m in ("rome", "memit", "ft"))
    assert rome.hparams == ROME_GPT_J and rome.hparams.layers == [5] and rome.hparams.prepend_bos is False
    assert memit.hparams == MEMIT_GPT_J and memit.hparams.mom2_update_weight == 15_000
    # kmeng01/rome hparams/FT/EleutherAI_gpt-j-6B_constr.json: layer 0, weight + bias, lr 5e-4, bound 5e-5
    assert ft.preset == "ft-gpt-j" and ft.hparams == FT_GPT_J
    assert (ft.hparams.layer, ft.hparams.lr, ft.hparams.norm_constraint, ft.hparams.train_bias) == (0, 5e-4, 5e-5, True)
    # a folder *named* gpt2-xl with GPT-J's config is GPT-J
    named = tmp_path / "gpt2-xl"
    shutil.copytree(folder, named)
    assert model_identity(str(named)).key == "gpt-j"


def test_a_changed_size_is_unknown_and_warns_or_errors_under_strict(tmp_path):
    folder = snapshot_folder(tmp_path, GPT2Config(n_layer=47, n_embd=1600, n_head=25))
    assert model_identity(folder).key is None
    with pytest.warns(UnknownModelWarning, match=r"gpt2 \(L47, d_model 1600.*rome:generic"):
        hp = resolve("rome", folder)
    assert hp.generic and hp.preset == "rome:generic" and hp.hparams.prepend_bos is None
    with strict_presets(), pytest.raises(UnknownModelError, match="L47"):
        resolve("ft", folder)
    with pytest.raises(UnknownModelError):
        resolve("memit", folder, strict=True)
    with warnings.catch_warnings():  # KN's original settings do not depend on the model: no warning
        warnings.simplefilter("error")
        assert resolve("kn", folder).preset == "kn-original"


def test_bundled_model_keeps_its_toy_presets(tmp_path, toy_model):
    assert model_identity(toy_model).key == "toy-facts" and model_identity("toy-facts").key == "toy-facts"
    renamed = tmp_path / "snapshots" / "abc123"
    renamed.mkdir(parents=True)
    shutil.copy(assets_dir() / "toy-facts" / "config.json", renamed / "config.json")
    assert model_identity(str(renamed)).key == "toy-facts"
    with strict_presets():
        assert {m: resolve(m, toy_model).preset for m in ("rome", "memit", "ft", "kn")} == {
            "rome": "rome:toy-facts", "memit": "memit:toy-facts", "ft": "ft-toy", "kn": "kn-original"}


def test_loaded_model_and_its_folder_agree_and_registration_is_by_config(tmp_path, tiny_model, monkeypatch):
    from workbench.loading import load_model, save_hf

    folder = tmp_path / "models--x" / "snapshots" / "123"
    save_hf(tiny_model, folder)
    loaded = load_model(str(folder), device="cpu")
    assert model_identity(loaded) == model_identity(str(folder)) and model_identity(loaded).key is None
    monkeypatch.setattr(identity, "_REGISTERED", [])
    identity.register_known_model("my-model", json.loads((folder / "config.json").read_text()))
    assert model_identity(loaded).key == "my-model"  # the cached identity sees the registration
    assert resolve("rome", loaded, quiet=True).generic  # no rome preset registered for it: generic


def test_register_presets_for_a_method(tmp_path):
    """The hook another method (MEND) uses: presets per identity, a generic one, lookup by name."""
    from dataclasses import dataclass

    @dataclass
    class HP:
        lr: float = 1.0

    register_presets("_test_method", by_model={"gpt2-xl": ("_test:gpt2-xl", HP(lr=0.5))},
                     generic=lambda model: ("_test:generic", HP()), sources={"_test:gpt2-xl": "somewhere.json"})
    folder = snapshot_folder(tmp_path, GPT2_XL)
    assert resolve("_test_method", folder).hparams == HP(lr=0.5)
    assert resolve("_test_method", folder, preset="_test:gpt2-xl", overrides={"lr": 2.0}).preset == "_test:gpt2-xl+custom"
    assert resolve_call("_test_method", folder, {"lr": 3.0, "progress": False}).hparams == HP(lr=3.0)
    assert resolve_call("no_such_method", folder, {}) is None


def test_cli_strict_presets(tmp_path, tiny_model, capsys):
    from workbench.loading import save_hf

    folder = save_hf(tiny_model, tmp_path / "snapshots" / "x")
    args = ["edit", "--model", str(folder), "--subject", "Varo Keltin", "--prompt", "The mother tongue of {} is",
            "--new-object", "Tuvan", "--device", "cpu", "--strict-presets"]
    assert main(args) == 1
    assert "strict presets refuse rome's generic preset" in capsys.readouterr().err
    assert "identity" in (main(["info", "--model", str(folder), "--device", "cpu"]) == 0
                          and capsys.readouterr().out)
