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

Folder checks live in :mod:`workbench.folders`, the weights' Hugging Face names and fingerprint in
:mod:`workbench.weights`; their public names are importable from here too.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from .folders import (MANIFEST, TOKENIZER_FILES, ModelLoadError, check_model_folder, check_weights_match_config,
                      unchecked_config_fields, write_manifest)
from .weights import (canonical_hf_name, hf_model, hf_parameter, hf_state_dict, model_fingerprint, remember_fingerprint,
                      restore_fingerprint)

__all__ = ["BUNDLED", "BUNDLED_PREFIX", "MANIFEST", "REQUIRED_HOOKS", "TOKENIZER_FILES", "ModelLoadError", "assets_dir",
           "bundled_path", "canonical_hf_name", "check_device", "check_hooks", "check_model_folder", "check_tokenizer",
           "check_weights_match_config", "default_device", "hf_model", "hf_parameter", "hf_state_dict",
           "is_bundled_name", "load_model", "model_fingerprint", "model_info", "random_model", "remember_fingerprint",
           "resolve_spec", "restore_fingerprint", "save_hf", "unchecked_config_fields", "write_manifest"]

BUNDLED = "toy-facts"
"""Name of the bundled model and world."""

BUNDLED_PREFIX = "bundled:"
"""``"bundled:toy-facts"`` names the bundled model explicitly."""

REQUIRED_HOOKS = ("hook_embed", "blocks.{l}.hook_resid_post", "blocks.{l}.hook_mlp_out", "blocks.{l}.hook_attn_out")
"""Hook names tracing and editing rely on; a model whose bridge lacks one is refused at load."""

log = logging.getLogger(__name__)


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
