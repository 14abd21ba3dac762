"""Model folders on disk: what a Hugging Face folder must hold, and its config checked against its weights.

:func:`check_model_folder` refuses a folder without a readable config, tokenizer files or weight
files; :func:`check_weights_match_config` compares every tensor the config implies (built on the
meta device, so nothing is allocated) with the weight files' headers, before any model is built;
the sealed manifest (:data:`MANIFEST`, written by :func:`workbench.loading.save_hf`) checks the
config fields no shape can confirm (``n_head``, ...).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

class ModelLoadError(RuntimeError):
    """A model spec could not be resolved to a usable model; the message names the file and the fix."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
"""Files of which a model folder needs at least one for its tokenizer."""


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{cfg_path} is not a readable JSON config ({err}); restore it from the model's source "
                             f"or re-save the folder with save_pretrained") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{cfg_path} has no 'model_type'; it is not a Hugging Face model config")
    return config


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))


def check_model_folder(path: str | os.PathLike) -> dict:
    """Check a Hugging Face model folder before loading it; returns its parsed ``config.json``.

    Raises :class:`ModelLoadError` naming the file at fault when the config does not parse,
    no tokenizer file is present, or no weight file (or a weight file whose safetensors
    header is unreadable) is found.
    """
    path = Path(path)
    config = _read_config(path)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); without them every prompt would "
            f"be tokenized wrongly. Copy the tokenizer files of the model's source into {path}, or save the folder "
            f"with save_hf / tokenizer.save_pretrained")
    weights = _weight_files(path)
    if not weights:
        raise ModelLoadError(f"{path} has no weight files (*.safetensors or pytorch_model*.bin)")
    from safetensors import safe_open

    for file in weights:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
            raise ModelLoadError(f"{file} is not a readable safetensors file ({type(err).__name__}: {err}); "
                                 f"the download or copy is probably incomplete: fetch the file again") from None
    return config


MANIFEST = "workbench_manifest.json"
"""A sealed copy of ``config.json`` that :func:`save_hf` (and ``train-toy``) write next to the weights, so that
config fields the weights' shapes cannot confirm (``n_head``, ...) are checked too."""

_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "architectures")

_SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings", "head_dim", "rotary_dim", "n_inner")
"""Config sizes :func:`unchecked_config_fields` tries (under each family's own names via ``attribute_map``)."""


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` over every weight file of a folder, read from headers (no weights loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in _weight_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
        else:
            try:
                try:
                    state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped: read it
                    state = torch.load(str(file), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001
                raise ModelLoadError(f"{file} is not a readable PyTorch weight file ({type(err).__name__}: {err}); "
                                     f"fetch the file again") from None
            shapes.update({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return shapes


def _meta_model(config):
    """The model class ``config`` describes, built on the meta device (no memory, whatever its size)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


def check_weights_match_config(path: str | os.PathLike, limit: int = 4) -> None:
    """Refuse a folder whose ``config.json`` disagrees with its weight files, before building the model.

    The model the config describes is built on the meta device (no memory) and compared with the
    weight files' headers: every parameter present with its shape, no unexpected tensor. A sealed
    :data:`MANIFEST` (written by :func:`save_hf`) also checks the fields no shape shows (``n_head``).
    Raises :class:`ModelLoadError` naming the folder, what differs and the fix.
    """
    import re

    from transformers import AutoConfig

    path = Path(path)
    fix = (f"make {path / 'config.json'} match the weight files (model_type, n_layer, n_head, n_embd, vocab_size, "
           f"...), e.g. restore it from the model's source")
    try:
        config = AutoConfig.from_pretrained(str(path))
        meta = _meta_model(config)
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise ModelLoadError(f"{path / 'config.json'} does not describe a model transformers can build "
                             f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); {fix}") from None
    rename, exact = _checkpoint_renames(meta)
    params = {k: tuple(v.shape) for k, v in meta.named_parameters()}  # tied weights once
    allowed = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    allowed.update(params)
    prefix = getattr(meta, "base_model_prefix", "") or ""
    found: dict[str, tuple[int, ...]] = {}
    for name, shape in _file_shapes(path).items():
        name = rename(name)
        if name not in allowed and prefix:
            if f"{prefix}.{name}" in allowed:
                name = f"{prefix}.{name}"
            elif name.startswith(prefix + ".") and name[len(prefix) + 1:] in allowed:
                name = name[len(prefix) + 1:]
        found[name] = shape
    ignore_unexpected = [re.compile(p) for p in (getattr(meta, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignore_missing = [re.compile(p) for p in (getattr(meta, "_keys_to_ignore_on_load_missing", None) or [])]
    missing = [n for n in params if n not in found and not any(p.search(n) for p in ignore_missing)]
    unexpected = [n for n in found if n not in allowed and not any(p.search(n) for p in ignore_unexpected)]
    if not exact:  # the family converts tensors on load (fuses, splits): only shapes of matching names are checked
        missing, unexpected = [], []
    wrong = [f"{n} is {found[n]}, config gives {allowed[n]}" for n in found if n in allowed and found[n] != allowed[n]]
    if not (missing or unexpected or wrong):
        _check_manifest(path)  # the fields no shape shows
        return
    problems = []
    n_layers = getattr(config, "num_hidden_layers", None)
    layer_ids = {int(m.group(1)) for n in found for m in [re.search(r"\.(?:h|layers|layer|blocks)\.(\d+)\.", n)] if m}
    if n_layers is not None and layer_ids and max(layer_ids) + 1 != n_layers:
        problems.append(f"the config has {n_layers} layers but the weights hold {max(layer_ids) + 1}")
    for label, items in (("shapes differ", wrong), ("tensors missing from the weights", missing),
                         ("unexpected tensors in the weights", unexpected)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            problems.append(f"{label}: {', '.join(items[:limit])}{more}")
    raise ModelLoadError(f"{path / 'config.json'} (model_type {config.model_type!r}) does not match the weight files "
                         f"in {path}: {'; '.join(problems)}. {fix[0].upper() + fix[1:]}")


def _checkpoint_renames(meta) -> tuple[Any, bool]:
    """``(rename, exact)``: the key renames transformers applies when loading ``meta``'s family (e.g. GPT-NeoX's
    ``embed_out`` -> ``lm_head``), and whether renames are all it applies (other conversions fuse tensors)."""
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(meta)
    except Exception:  # noqa: BLE001 - an older transformers without conversions: names are as saved
        return (lambda name: name), True
    pairs, exact = [], True
    for t in transforms:
        if type(t) is not WeightRenaming:
            exact = False
            continue
        targets = list(t.target_patterns)
        for i, source in enumerate(t.source_patterns):
            pairs.append((re.compile(source), targets[i] if i < len(targets) else targets[-1]))

    def rename(name: str) -> str:
        for pattern, target in pairs:
            name = pattern.sub(target, name, count=1)
        return name

    return rename, exact


def unchecked_config_fields(config) -> list[str]:
    """Config size fields whose value the weights' shapes do not determine (e.g. GPT-2's ``n_head``: the
    attention weights have the same shape for any head count), found by changing each on a meta model."""
    import copy

    config = _fewer_layers(config)  # every layer has the same shapes: two are enough, and fast on any size
    base = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
    out = []
    names = dict(getattr(config, "attribute_map", {}) or {})
    for field in _SIZE_FIELDS:
        if field == "num_hidden_layers":  # the layer count shows in the tensor names
            continue
        value = getattr(config, field, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            continue
        shown = names.get(field, field)
        for trial in (value * 2, value // 2):
            if trial < 1:
                continue
            other = copy.deepcopy(config)
            try:
                setattr(other, field, trial)
                shapes = {k: tuple(v.shape) for k, v in _meta_model(other).state_dict().items()}
            except Exception:  # noqa: BLE001 - an inconsistent size (e.g. not a divisor): try the other
                continue
            if shapes == base:
                out.append(shown)
            break
    return out


def _fewer_layers(config, n: int = 2):
    """A copy of ``config`` with at most ``n`` layers (``config`` itself when that cannot be built)."""
    import copy

    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= n:
        return config
    small = copy.deepcopy(config)
    try:
        small.num_hidden_layers = n
        if isinstance(getattr(small, "layer_types", None), list):
            small.layer_types = small.layer_types[:n]
        _meta_model(small)
    except Exception:  # noqa: BLE001 - a family whose config ties other fields to the depth
        return config
    return small


def _manifest_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def write_manifest(folder: str | os.PathLike) -> Path:
    """Seal the folder's ``config.json`` into :data:`MANIFEST` (what :func:`check_weights_match_config` reads)."""
    from .integrity import atomic_write, seal

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    record = seal({"format": 1, "config": _manifest_config(config)})
    return atomic_write(folder / MANIFEST, json.dumps(record, indent=1, sort_keys=True).encode(), what="manifest")


def _check_manifest(path: Path) -> bool:
    """Check ``config.json`` against a sealed :data:`MANIFEST`, if there is one; whether there was."""
    from .integrity import IntegrityError, verify

    file = path / MANIFEST
    if not file.exists():
        return False
    try:
        record = json.loads(file.read_text())
        verify(record, where=str(file), error=ModelLoadError,
               fix=f"restore it, or delete it if {path / 'config.json'} is known to be right")
    except ValueError as err:
        raise ModelLoadError(f"{file} is not readable JSON ({err}); restore it, or delete it if "
                             f"{path / 'config.json'} is known to be right") from None
    except IntegrityError as err:
        raise ModelLoadError(str(err)) from None
    saved = record.get("config", {})
    now = _manifest_config(_read_config(path))
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
    if differ:
        detail = "; ".join(f"{k}: config.json has {now.get(k, '<absent>')!r}, saved {saved.get(k, '<absent>')!r}"
                           for k in differ[:5])
        raise ModelLoadError(f"{path / 'config.json'} differs from the config the weights were saved with ({detail}; "
                             f"recorded in {file}); restore config.json, or delete {file} if the change is intended")
    return True
