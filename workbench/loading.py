"""Load a language model as a TransformerLens ``TransformerBridge``.

Three kinds of ``spec`` are accepted:

* ``"toy-facts"`` (or ``"bundled:toy-facts"``) — the bundled model, trained by this
  project on a synthetic world of facts (``assets/toy-facts``); always offline. The bare
  name is reserved: it means the bundled model even where a ``./toy-facts`` folder exists
  (a note says so); write ``./toy-facts`` for that folder.
* a local folder in Hugging Face format (``config.json``, weights, tokenizer files);
  always offline.
* a hub name such as ``"gpt2-xl"``; needs network access to the hub.

The bridge is returned *without* ``enable_compatibility_mode()``: its weights are the
raw Hugging Face tensors (``blocks[l].mlp.W_out`` *is* ``transformer.h[l].mlp.c_proj.weight``
for GPT-2), not the folded/centred copies that compatibility mode makes. Weight edits
(ROME, MEMIT, FT, KN) therefore act on exactly the parameters the original methods
edit, show up in the wrapped model at once, and can be saved back in Hugging Face
format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

BUNDLED = "toy-facts"
"""Name of the bundled model and world."""

BUNDLED_PREFIX = "bundled:"
"""``"bundled:toy-facts"`` names the bundled model explicitly."""

REQUIRED_HOOKS = ("hook_embed", "blocks.{l}.hook_resid_post", "blocks.{l}.hook_mlp_out", "blocks.{l}.hook_attn_out")
"""Hook names tracing and editing rely on; a model whose bridge lacks one is refused at load."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
"""Files of which a model folder needs at least one for its tokenizer."""

_CACHE_ATTR = "_workbench_weights_cache"
"""Attribute of the HF module holding :func:`hf_state_dict`'s and :func:`model_fingerprint`'s cache."""

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved to a usable model; the message names the file and the fix."""


def is_bundled_name(spec: str | os.PathLike, *, note: bool = True) -> bool:
    """Whether ``spec`` names the bundled model/world (``"toy-facts"`` or ``"bundled:toy-facts"``).

    The bare name is reserved for the bundled assets; when a ``./toy-facts`` folder also
    exists, a note (a ``UserWarning``) says which one is used and how to pick the folder.
    """
    text = str(spec)
    if text == BUNDLED_PREFIX + BUNDLED:
        return True
    if text != BUNDLED:
        return False
    if note and Path(text).is_dir():
        msg = (f"'{BUNDLED}' names the bundled model/world; a ./{BUNDLED} folder exists here too and is NOT used "
               f"(pass './{BUNDLED}' to use that folder)")
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return True


def assets_dir() -> Path:
    """Folder holding the bundled model and MEND editor; every lookup of bundled files goes through it.

    In order: the ``WORKBENCH_ASSETS`` environment variable; ``workbench/assets`` inside an
    installed package (a wheel or ``pip install .`` copies the repository's ``assets/`` there),
    found with :mod:`importlib.resources`; else the ``assets/`` folder at the top of the
    source checkout (editable installs, running from a clone).
    """
    env = os.environ.get("WORKBENCH_ASSETS")
    if env:
        return Path(env)
    from importlib.resources import files

    packaged = files("workbench") / "assets"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "assets"


def bundled_path(name: str = BUNDLED) -> Path:
    """Path of a bundled model folder, with a clear error if it is missing."""
    path = assets_dir() / name
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"The bundled model folder {path} is missing or incomplete. Reinstall workbench (its wheel carries "
            "the folder), set WORKBENCH_ASSETS to a folder that holds toy-facts/, or, in a source checkout, "
            "rebuild it with `workbench train-toy --out assets/toy-facts`."
        )
    return path


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device) -> str:
    """``device`` as a string, refused with a clear :class:`ModelLoadError` when this machine lacks it (``cuda``
    on a CPU-only build of torch or without a visible GPU, ``cuda:3`` with two GPUs, ``mps`` off Apple)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"device {str(device)!r} is not a torch device ({' '.join(str(err).split())}); use "
                             f"'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support (a CPU build)" if torch.version.cuda is None
                   else "no NVIDIA GPU is visible")
            raise ModelLoadError(f"device {str(device)!r} is not available: {why}; use --device cpu (or leave "
                                 f"--device out: cuda where available, else cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {str(device)!r} does not exist: this machine has "
                                 f"{torch.cuda.device_count()} GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        if not getattr(getattr(torch, dev.type, None), "is_available", lambda: False)():
            raise ModelLoadError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    return str(device)


def resolve_spec(spec: str | os.PathLike) -> tuple[str, Path | None]:
    """Classify a spec: ``("bundled"|"folder"|"hub", local_path_or_None)``."""
    text = str(spec)
    if is_bundled_name(text):
        return "bundled", bundled_path()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder.")
        return "folder", path
    if path.is_file():
        raise ModelLoadError(f"{path} is a file; a model is a folder (config.json, *.safetensors, tokenizer files), "
                             f"'{BUNDLED}', or a hub name")
    if text.startswith((".", "/", "~")) or os.sep in text and not _looks_like_hub_id(text):
        raise ModelLoadError(f"No model folder at {path}.")
    return "hub", None


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(parts[0]).exists()


def _hub_offline_message(name: str, reason: str) -> str:
    return (
        f"Cannot load {name!r} from the Hugging Face hub ({reason}). Two ways work offline: "
        f"load_model('{BUNDLED}') for the bundled model, or load_model('/path/to/folder') for a "
        "local Hugging Face folder (config.json, *.safetensors, tokenizer files), e.g. one saved "
        "with `AutoModelForCausalLM.save_pretrained` on a machine with network access."
    )


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the hub endpoint (``HF_ENDPOINT``) answers a TCP connection within ``timeout``.

    One cheap probe lets an offline machine fail in seconds instead of waiting for
    ``transformers``' retries (about 30 s).
    """
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, "reachable"
    except OSError as err:
        return False, f"{host} is unreachable: {err}"


def load_model(
    spec: str | os.PathLike = BUNDLED,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load ``spec`` as a ``TransformerBridge`` in eval mode, gradients off for weights.

    ``device`` defaults to CUDA when available; ``dtype`` to float32. The returned
    bridge gets a ``workbench_spec`` attribute (the spec as given) used in cache keys
    and reports.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every load are noise in notebooks
    device = check_device(device) if device is not None else default_device()
    kind, path = resolve_spec(spec)
    dtype = dtype or torch.float32
    if kind == "hub":
        name = str(spec)
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
            raise ModelLoadError(_hub_offline_message(name, "HF_HUB_OFFLINE is set"))
        reachable, reason = hub_reachable()
        if not reachable:
            raise ModelLoadError(_hub_offline_message(name, reason))
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:  # no network, or no such repository
            raise ModelLoadError(_hub_offline_message(name, f"{type(err).__name__}: {str(err).splitlines()[0]}")) from err
        source = name
    else:
        assert path is not None
        hf_model, tokenizer = _load_folder(path, dtype)
        source = str(path)
    check_tokenizer(tokenizer, hf_model.config, source)
    # The bridge does not move a model it is handed: put the weights where they are asked for.
    hf_model.to(device=device).eval()
    original_tokenizer = tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    check_hooks(bridge, source)
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    # The bridge's own tokenizer prepends BOS; save_hf writes this unmodified one.
    bridge.workbench_hf_tokenizer = original_tokenizer
    bridge.workbench_spec = str(spec)
    bridge.workbench_manifest = path is not None and (path / MANIFEST).exists()
    return bridge


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


def _load_folder(path: Path, dtype: torch.dtype):
    """Model and tokenizer of a local folder, every failure as a ModelLoadError naming the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(path)
    check_weights_match_config(path)  # before building: a wrong config could describe a huge model
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype)
    except Exception as err:  # noqa: BLE001 - transformers raises many types; the path is what the user needs
        text = " ".join(str(err).split())
        raise ModelLoadError(f"cannot load the weights in {path}: {type(err).__name__}: {text[:600]}. Check that "
                             f"{path / 'config.json'} matches the weight files (n_embd, n_layer, n_head, vocab_size, "
                             f"...)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(err).__name__}: {err}") from None
    return model, tokenizer


def check_tokenizer(tokenizer, config, source: str = "the model") -> None:
    """Refuse a tokenizer that cannot belong to a model with ``config.vocab_size`` embeddings.

    More tokens than embeddings would index past the table; fewer than half of them means
    another model's (or a placeholder) tokenizer. Models pad their vocabulary by a few
    percent at most, so real pairs pass.
    """
    vocab = getattr(config, "vocab_size", None)
    n = len(tokenizer)
    if vocab is None:
        return
    if n > vocab:
        raise ModelLoadError(f"the tokenizer of {source} has {n} tokens but the model embeds only {vocab} "
                             f"(config vocab_size); the tokenizer files belong to another model")
    if n < vocab // 2:
        raise ModelLoadError(f"the tokenizer of {source} has {n} tokens for a model with {vocab} embeddings; "
                             f"the tokenizer files are missing, a placeholder, or belong to another model")


def check_hooks(bridge, source: str = "the model") -> None:
    """Refuse a bridge that lacks the hook points tracing and editing use (e.g. state-space models)."""
    names = set(bridge.hook_dict)
    missing = [h.format(l=0) for h in REQUIRED_HOOKS if h.format(l=0) not in names]
    if missing:
        arch = getattr(getattr(bridge, "cfg", None), "architecture", None) or "this architecture"
        raise ModelLoadError(
            f"{source} ({arch}) is not supported: its bridge has no hook points {', '.join(missing)}, which causal "
            f"tracing and editing need (transformer blocks with attention and MLP outputs)")


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


def model_info(model, config_check: bool = True) -> dict:
    """Size facts of a loaded model, for ``workbench info`` and reports, and (``config_check``) how far its
    config was checked: the config fields the weights' shapes cannot confirm, and whether a sealed manifest did."""
    cfg = model.cfg
    unchecked = unchecked_config_fields(hf_model(model).config) if config_check else []
    if not unchecked:
        check = "every size field confirmed by the weights' shapes"
    elif getattr(model, "workbench_manifest", False):
        check = f"shapes, and {', '.join(unchecked)} by the folder's sealed {MANIFEST}"
    else:
        check = (f"{', '.join(unchecked)} cannot be checked by the weights' shapes (no {MANIFEST}); a wrong value "
                 f"loads and gives wrong predictions")
    return {
        "spec": getattr(model, "workbench_spec", None),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "n_heads": cfg.n_heads,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "params": sum(p.numel() for name, p in hf_state_dict(model).items()
                      if name != "lm_head.weight" or not hf_model(model).config.tie_word_embeddings),
        "device": str(next(hf_model(model).parameters()).device),
        "dtype": str(next(hf_model(model).parameters()).dtype).replace("torch.", ""),
        **({"config_check": check} if config_check else {}),
    }


_MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                        "pytorch_model*.bin", "pytorch_model*.bin.index.json", "tokenizer*.json", "tokenizer.model",
                        "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                        "chat_template.*", "spiece.model", MANIFEST)
"""Files of a Hugging Face model folder: what ``save_hf(..., overwrite=True)`` clears first."""


def save_hf(model, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the model's current (possibly edited) weights and tokenizer as a HF folder, with a sealed
    :data:`MANIFEST` of its config.

    The tokenizer written is the one the model was loaded with, not the bridge's copy
    (which prepends BOS by itself), so the saved folder tokenizes exactly like the source.
    A folder that is not empty is refused (another model's tokenizer or weight shards left
    in it would be read with this model) unless ``overwrite=True``, which first deletes the
    model files there (config, weights, tokenizer files, manifest) and leaves other files.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"{out} is a file; save_hf writes a folder: give a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ModelLoadError(f"{out} is not empty; files of another model left there would be loaded with this "
                                 f"one. Give an empty or new folder, or pass overwrite=True (CLI: --overwrite) to "
                                 f"replace the model files in it")
        for pattern in _MODEL_FILE_PATTERNS:
            for file in out.glob(pattern):
                if file.is_file():
                    file.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config = hf_model(model).config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict({k: v.detach().to("cpu").contiguous() for k, v in hf_state_dict(model).items()})
    fresh.save_pretrained(str(out), safe_serialization=True)
    tokenizer = getattr(model, "workbench_hf_tokenizer", None)
    if tokenizer is None:
        msg = ("save_hf: this bridge was not built by workbench, so its own tokenizer (which may prepend BOS by "
               "itself) is saved")
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
        tokenizer = model.tokenizer
    tokenizer.save_pretrained(str(out))
    write_manifest(out)
    return out


_FALLBACK_TEXT = (
    "The capital of France is Paris. The mother tongue of Danielle Darrieux is French. "
    "Varo Keltin was born in Osla and speaks Tuvan. Miles Davis plays the trumpet. "
    "The Eiffel Tower is located in Paris. Toko Yasuda plays the guitar. "
)


def _tokenizer_for_random_model(tokenizer):
    """The given tokenizer, else the bundled one, else a small BPE trained on a fixed text."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer is not None:
        return tokenizer
    bundled = assets_dir() / BUNDLED
    if (bundled / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(bundled))
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_FALLBACK_TEXT] * 20, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    folder = tempfile.mkdtemp(prefix="workbench-tok-")
    wrapped.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def random_model(n_layers: int = 2, d_model: int = 64, n_heads: int = 4, *, n_ctx: int = 64,
                 d_mlp: int | None = None, tokenizer=None, seed: int = 0,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A randomly initialised GPT-2-shaped bridge, built offline (tests, benchmarks).

    GPT-2 small is ``random_model(12, 768, 12, n_ctx=1024)``; GPT-2 XL is
    ``random_model(48, 1600, 25, n_ctx=1024)``. The tokenizer defaults to the bundled one.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = _tokenizer_for_random_model(tokenizer)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                        n_head=n_heads, n_inner=d_mlp, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    device = str(device or default_device())
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(tokenizer.name_or_path, hf_model=hf, tokenizer=tokenizer,
                                                     device=device, dtype=dtype)
    bridge.workbench_hf_tokenizer = tokenizer
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    bridge.workbench_spec = f"random-gpt2-L{n_layers}-d{d_model}-seed{seed}"
    return bridge
