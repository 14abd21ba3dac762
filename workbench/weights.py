"""A bridge's weights under their Hugging Face names, and the fingerprint of their values.

Edits are keyed by Hugging Face parameter name (:func:`hf_state_dict`, :func:`hf_parameter`); the
fingerprint (:func:`model_fingerprint`) says which weights an edit, a cache or a result was computed
on. It is hashed once per weight state and cached on the model, keyed on each tensor's identity,
storage and version counter, so any in-place change (an edit's apply or revert, or a change made
outside the workbench) is seen.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch

_CACHE_ATTR = "_workbench_weights_cache"
"""Attribute of the HF module holding :func:`hf_state_dict`'s and :func:`model_fingerprint`'s cache."""


def hf_model(model):
    """The wrapped Hugging Face model of a bridge (shares its parameters).

    Its module tree has been rewired by the bridge, so use :func:`hf_state_dict` for
    the parameters under their Hugging Face names.
    """
    return model.original_model


def _hf_names(model) -> list[str]:
    cached = getattr(model, "_workbench_hf_names", None)
    if cached is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(hf_model(model).config)
        cached = list(fresh.state_dict().keys())
        model._workbench_hf_names = cached
    return cached


def canonical_hf_name(name: str) -> str:
    """A parameter name as Hugging Face writes it (the bridge inserts ``_original_component``)."""
    return name.replace("._original_component", "").replace("_original_component.", "")


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's live tensors under their Hugging Face names (no copies).

    The bridge wraps each HF module in a component whose state-dict keys contain
    ``_original_component`` and adds aliases (``mlp.in``, ``attn.q``...); stripping the
    wrappers and keeping the names a fresh HF model would have gives e.g.
    ``transformer.h.5.mlp.c_proj.weight`` -> the tensor that ``blocks[5].mlp.W_out`` is.
    Where each name lives (module and attribute) is found once and read live on every call,
    so a parameter replaced on its module is seen; the walk is redone when any module,
    parameter or buffer is registered anywhere (:func:`_structure_generation`).
    """
    cache = _weights_cache(model)
    if cache.slots is None or cache.generation != _structure_generation():
        cache.slots, cache.generation = _find_slots(model), _structure_generation()
    try:
        return {name: getattr(owner, store)[key] for name, owner, store, key in cache.slots}
    except KeyError:  # an entry was deleted without registering anything: walk again
        cache.slots = None
        return hf_state_dict(model)


def _find_slots(model) -> list[tuple[str, torch.nn.Module, str, str]]:
    """``(hf_name, module, "_parameters" | "_buffers", attribute)`` of every HF name, in the
    order and with the first-seen-wins choice of ``hf_model(model).state_dict()``."""
    wanted = _hf_names(model)
    found: dict[str, tuple[torch.nn.Module, str, str]] = {}
    for prefix, module in hf_model(model).named_modules(remove_duplicate=False):
        entries = [("_parameters", k, t) for k, t in module._parameters.items()]
        entries += [("_buffers", k, t) for k, t in module._buffers.items()
                    if k not in module._non_persistent_buffers_set]
        for store, key, tensor in entries:
            if tensor is not None:
                found.setdefault(canonical_hf_name(f"{prefix}.{key}" if prefix else key), (module, store, key))
    missing = [n for n in wanted if n not in found]
    if missing:
        raise RuntimeError(f"cannot map bridge parameters to Hugging Face names; missing {missing[:5]}")
    return [(n, *found[n]) for n in wanted]


def hf_parameter(model, name: str) -> torch.Tensor:
    """The live tensor of one Hugging Face parameter, e.g. ``transformer.h.5.mlp.c_proj.weight``."""
    params = hf_state_dict(model)
    if name not in params:
        raise KeyError(f"{name!r} is not a parameter of this model")
    return params[name]


def model_fingerprint(model, refresh: bool = False) -> str:
    """A short hash of the model's current weights (identity for on-disk caches and edits).

    Computed once per weight state and cached on the model until a weight changes: the cache
    is keyed on every tensor's identity, storage, shape, dtype, device and autograd version
    counter, which every in-place change through the parameter or a view of it advances
    (``p.add_``, ``p[i] = x`` or ``p.copy_`` under ``no_grad``, ``load_state_dict``, optimizer
    steps, :meth:`~workbench.editing.Edit.apply`); replacing a parameter, or its ``.data``,
    changes its identity or storage. In-place writes *into* ``p.data`` (``p.data.add_(x)``) are
    the one change PyTorch hides from version counters: after one, pass ``refresh=True``.
    :meth:`~workbench.editing.Edit.revert` restores the pre-edit value without hashing again
    (:func:`remember_fingerprint`).
    """
    cache = _weights_cache(model)
    tensors = hf_state_dict(model)
    key = _weights_key(tensors)
    if not refresh and _cache_valid(cache, tensors, key):
        return cache.fingerprint
    fingerprint = _compute_fingerprint(tensors)
    cache.key, cache.fingerprint = key, fingerprint
    cache.refs = _refs(tensors) if key is not None else None
    return fingerprint


def _compute_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """The fingerprint of :func:`model_fingerprint`, hashed from the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)
        # A strided sample keeps hashing fast on multi-GB models while any real edit,
        # which moves whole rows/columns, still changes the digest.
        step = max(1, flat.numel() // 65536)
        digest.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
        digest.update(flat.to(torch.float64).sum().item().hex().encode())
    return digest.hexdigest()[:16]


@dataclass
class _WeightsCache:
    """Per-model state of :func:`hf_state_dict` and :func:`model_fingerprint` (on the HF module)."""

    slots: list | None = None
    generation: int = -1
    key: tuple | None = None
    refs: list | None = None           # _refs of the tensors the key was taken from
    fingerprint: str | None = None
    remembered: dict = field(default_factory=dict)   # token -> (key, refs, fingerprint): remember_fingerprint


def _weights_cache(model) -> _WeightsCache:
    hf = hf_model(model)
    cache = hf.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = _WeightsCache()
        object.__setattr__(hf, _CACHE_ATTR, cache)  # not a submodule, not in the state dict
    return cache


def _weights_key(tensors: dict[str, torch.Tensor]) -> tuple | None:
    """What identifies the weights' current values short of reading them (``None``: no version counters)."""
    try:
        return tuple((n, t.data_ptr(), t._version, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                      t.device) for n, t in tensors.items())
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def _refs(tensors: dict[str, torch.Tensor]) -> list[tuple[weakref.ref, weakref.ref]]:
    """Weak references to each tensor and its storage: a key taken from other tensors or storages
    (a replaced parameter, a ``p.data = ...`` at a reused address) never matches."""
    return [(weakref.ref(t), weakref.ref(t.untyped_storage())) for t in tensors.values()]


def _same_objects(refs: list | None, tensors: dict[str, torch.Tensor]) -> bool:
    return refs is not None and len(refs) == len(tensors) and all(
        tr() is t and sr() is t.untyped_storage() for (tr, sr), t in zip(refs, tensors.values()))


def _cache_valid(cache: _WeightsCache, tensors: dict[str, torch.Tensor], key: tuple | None) -> bool:
    return key is not None and cache.key == key and _same_objects(cache.refs, tensors)


_generation = [0]
_watching = [False]


def _bump_generation(*_args) -> None:
    _generation[0] += 1


def _structure_generation() -> int:
    """A counter that any registration of a module, parameter or buffer on any module advances
    (PyTorch's global registration hooks, installed on first use)."""
    if not _watching[0]:
        from torch.nn.modules import module as torch_module

        torch_module.register_module_module_registration_hook(_bump_generation)
        torch_module.register_module_parameter_registration_hook(_bump_generation)
        torch_module.register_module_buffer_registration_hook(_bump_generation)
        _watching[0] = True
    return _generation[0]


def remember_fingerprint(model, token: str) -> None:
    """Before changing weights that will be restored bit-identically (an edit's apply), keep the
    current cached fingerprint under ``token``; nothing is hashed (no-op if none is cached)."""
    if not hasattr(model, "original_model"):
        return
    cache = _weights_cache(model)
    tensors = hf_state_dict(model)
    key = _weights_key(tensors)
    if _cache_valid(cache, tensors, key):
        cache.remembered[token] = (key, cache.refs, cache.fingerprint)


def restore_fingerprint(model, token: str, restored: Iterable[str]) -> None:
    """After the tensors named ``restored`` were copied back bit-identically to their values at
    :func:`remember_fingerprint` (an edit's revert), cache that fingerprint again for the new
    state, provided no other tensor changed in between (else the next call hashes)."""
    if not hasattr(model, "original_model"):
        return
    cache = _weights_cache(model)
    memo = cache.remembered.pop(token, None)
    if memo is None:
        return
    old_key, refs, fingerprint = memo
    tensors = hf_state_dict(model)
    key = _weights_key(tensors)
    if key is None or len(key) != len(old_key) or not _same_objects(refs, tensors):
        return
    restored = set(restored)
    for now, then in zip(key, old_key):
        if now != then if now[0] not in restored else now[:2] + now[3:] != then[:2] + then[3:]:
            return
    cache.key, cache.refs, cache.fingerprint = key, refs, fingerprint
