"""Which model is this? Identity from the model itself (its config, and its weights' fingerprint
where one is known), never from a folder or hub name.

Presets (:mod:`workbench.editing.presets`) are chosen by identity: a GPT-2 XL found in a Hugging
Face cache snapshot folder (``.../snapshots/<hash>``), a renamed copy or a hub name all have the
same config, so they get the same presets. The config's *signature* is the model family
(``model_type``), layers, widths, heads, context length and vocabulary size; each
:class:`KnownModel` lists the signature it has (and, optionally, fingerprints of its published
weights). The signature is read from a loaded bridge, a model folder's ``config.json`` or a
config dict, so a folder is identified without loading its weights.

Known: ``gpt2-xl`` (``gpt2``: 48 layers, d_model 1600, 25 heads, vocabulary 50257, context 1024),
``gpt-j`` (``EleutherAI/gpt-j-6B``: ``gptj``, 28 layers, d_model 4096, 16 heads, vocabulary 50400,
context 2048, rotary dimension 64) and ``toy-facts`` (the bundled model: the signature of
``assets/toy-facts/config.json``, read at run time so a retrained bundle keeps its presets).
A model with another signature is *unknown*; its presets are its family's generic ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SIGNATURE_FIELDS = ("model_type", "n_layers", "d_model", "n_heads", "d_mlp", "vocab_size", "n_ctx")
"""What a config signature holds (normalised across families' config field names)."""

_ALIASES = {
    "n_layers": ("n_layer", "num_hidden_layers", "num_layers"),
    "d_model": ("n_embd", "hidden_size", "d_model"),
    "n_heads": ("n_head", "num_attention_heads", "num_heads"),
    "d_mlp": ("n_inner", "intermediate_size", "ffn_dim"),
    "vocab_size": ("vocab_size",),
    "n_ctx": ("n_positions", "max_position_embeddings", "n_ctx"),
}


@dataclass(frozen=True)
class KnownModel:
    """A model whose presets are known: its identity key, config signature (plus family-specific
    config fields in ``extra``) and, where known, fingerprints of its published weights."""

    key: str
    signature: tuple[tuple[str, Any], ...]
    extra: tuple[tuple[str, Any], ...] = ()
    fingerprints: frozenset[str] = frozenset()
    description: str = ""


@dataclass(frozen=True)
class ModelIdentity:
    """What :func:`model_identity` found: ``key`` (``None`` for an unknown model), the family, the
    signature, and how the weights compare with the known model's fingerprints (``weights``:
    ``"match"``, ``"differ"`` or ``"not checked"`` where none is known)."""

    key: str | None
    family: str
    signature: tuple[tuple[str, Any], ...]
    weights: str = "not checked"
    fingerprint: str | None = None

    @property
    def known(self) -> bool:
        return self.key is not None

    @property
    def shape(self) -> str:
        """The family and signature in words, e.g. ``gpt2 (L48, d_model 1600, ...)``."""
        s = dict(self.signature)
        return (f"{self.family} (L{s.get('n_layers')}, d_model {s.get('d_model')}, heads {s.get('n_heads')}, "
                f"d_mlp {s.get('d_mlp')}, vocab {s.get('vocab_size')}, ctx {s.get('n_ctx')})")

    @property
    def label(self) -> str:
        """The key, or ``unknown <family> (...)`` with the signature: what rows and store keys record."""
        return self.key if self.key is not None else f"unknown {self.shape}"

    def to_dict(self) -> dict:
        return {"key": self.key, "family": self.family, "signature": dict(self.signature), "weights": self.weights}


def _get(cfg: dict, names: tuple[str, ...]):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return None


def config_signature(config: dict) -> tuple[tuple[str, Any], ...]:
    """The normalised signature of a Hugging Face config dict (see :data:`SIGNATURE_FIELDS`)."""
    out: dict[str, Any] = {"model_type": str(config.get("model_type", "?"))}
    for name, aliases in _ALIASES.items():
        value = _get(config, aliases)
        out[name] = int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if out["d_mlp"] is None and isinstance(out["d_model"], int):
        out["d_mlp"] = 4 * out["d_model"]  # GPT-2 / GPT-J: n_inner=None means 4 x d_model
    return tuple((k, out[k]) for k in SIGNATURE_FIELDS)


def _sig(**kw) -> tuple[tuple[str, Any], ...]:
    return tuple((k, kw[k]) for k in SIGNATURE_FIELDS)


_BUILTIN: list[KnownModel] = [
    KnownModel("gpt2-xl", _sig(model_type="gpt2", n_layers=48, d_model=1600, n_heads=25, d_mlp=6400,
                               vocab_size=50257, n_ctx=1024), description="GPT-2 XL (openai-community/gpt2-xl)"),
    KnownModel("gpt-j", _sig(model_type="gptj", n_layers=28, d_model=4096, n_heads=16, d_mlp=16384,
                             vocab_size=50400, n_ctx=2048), extra=(("rotary_dim", 64),),
               description="GPT-J 6B (EleutherAI/gpt-j-6B)"),
]
_REGISTERED: list[KnownModel] = []


@lru_cache(maxsize=1)
def _bundled_known() -> KnownModel | None:
    from .loading import BUNDLED, assets_dir

    path = assets_dir() / BUNDLED / "config.json"
    if not path.exists():
        return None
    return KnownModel("toy-facts", config_signature(json.loads(path.read_text())), description="the bundled model")


def known_models() -> list[KnownModel]:
    """Every known model: the built-in ones, the bundled model, and any :func:`register_known_model` added."""
    bundled = _bundled_known()
    return [*_REGISTERED, *_BUILTIN, *([bundled] if bundled else [])]


def register_known_model(key: str, config: dict, *, fingerprints: tuple[str, ...] = (), extra: dict | None = None,
                         description: str = "") -> KnownModel:
    """Make a model known (its presets are then looked up under ``key``): ``config`` is its Hugging Face
    config dict (only the signature fields count), ``fingerprints`` the
    :func:`workbench.loading.model_fingerprint` of its published weights, if known. Registered models
    are matched before the built-in ones."""
    km = KnownModel(key, config_signature(config), tuple(sorted((extra or {}).items())), frozenset(fingerprints),
                    description)
    _REGISTERED.insert(0, km)
    return km


class ConfigModel:
    """A model known by its config alone (a folder's ``config.json`` or a config dict), for preset
    resolution without loading weights: ``cfg.n_layers`` / ``d_model`` / ``d_mlp`` / ``d_vocab``."""

    def __init__(self, config: dict, source: str = "config") -> None:
        from types import SimpleNamespace

        self.config = dict(config)
        self.source = source
        sig = dict(config_signature(self.config))
        self.cfg = SimpleNamespace(n_layers=sig["n_layers"], d_model=sig["d_model"], d_mlp=sig["d_mlp"],
                                   d_vocab=sig["vocab_size"], n_ctx=sig["n_ctx"], n_heads=sig["n_heads"])

    def __repr__(self) -> str:
        return f"ConfigModel({self.source})"


def as_model(target):
    """``target`` as something presets can be resolved for: a loaded bridge as it is, a model folder
    or a config dict as a :class:`ConfigModel`."""
    if isinstance(target, dict):
        return ConfigModel(target)
    if isinstance(target, (str, os.PathLike)):
        config, _ = _config_of(target)
        return ConfigModel(config, str(target))
    return target


def _config_of(target) -> tuple[dict, Any]:
    """``(config dict, bridge or None)`` of a bridge, a model folder, a config dict or a :class:`ConfigModel`."""
    if isinstance(target, ConfigModel):
        return target.config, None
    if isinstance(target, dict):
        return target, None
    if isinstance(target, (str, os.PathLike)):
        from .folders import _read_config
        from .loading import bundled_path, is_bundled_name

        path = bundled_path() if is_bundled_name(target, note=False) else Path(target).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a model folder with a config.json (identity is read from the "
                                    "config, never from a name)")
        return _read_config(path), None
    from .loading import hf_model

    cfg = hf_model(target).config
    return (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))), target


def model_identity(target, *, check_weights: bool = True) -> ModelIdentity:
    """The identity of ``target`` (a loaded bridge, a model folder, a config dict or a :class:`ConfigModel`).

    Matched by config signature (and ``extra`` fields); where the known model lists fingerprints
    and ``target`` is a loaded model, its weights' fingerprint is compared (``weights``). A bridge's
    identity is cached on it (its config does not change when its weights are edited).
    """
    registry = (id(_REGISTERED), len(_REGISTERED))  # a registration after the first look is seen
    cached = target.__dict__.get("_workbench_identity") if hasattr(target, "original_model") else None
    if cached is not None and cached[0] == registry:
        return cached[1]
    config, bridge = _config_of(target)
    sig = config_signature(config)
    found = next((km for km in known_models() if km.signature == sig
                  and all(config.get(k) == v for k, v in km.extra)), None)
    weights, fp = "not checked", None
    if found is not None and found.fingerprints and bridge is not None:
        from .loading import model_fingerprint

        fp = model_fingerprint(bridge)
        weights = "match" if fp in found.fingerprints else "differ"
    ident = ModelIdentity(key=found.key if found else None, family=dict(sig)["model_type"], signature=sig,
                          weights=weights, fingerprint=fp)
    if bridge is not None and weights == "not checked":
        bridge.__dict__["_workbench_identity"] = (registry, ident)
    return ident
