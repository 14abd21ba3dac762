"""Load a language model as a TransformerLens ``TransformerBridge``.

Three kinds of ``spec`` are accepted:

* ``"toy-facts"`` — the bundled model, trained by this project on a synthetic world
  of facts (``assets/toy-facts``); always offline.
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
import os
import warnings
from pathlib import Path

import torch

BUNDLED = "toy-facts"
"""Name of the bundled model and world."""


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved to weights on this machine."""


def assets_dir() -> Path:
    """Folder holding the bundled assets (``WORKBENCH_ASSETS`` overrides it)."""
    env = os.environ.get("WORKBENCH_ASSETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "assets"


def bundled_path(name: str = BUNDLED) -> Path:
    """Path of a bundled model folder, with a clear error if it is missing."""
    path = assets_dir() / name
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"The bundled model folder {path} is missing or incomplete. "
            "Rebuild it with `workbench train-toy --out assets/toy-facts`."
        )
    return path


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_spec(spec: str | os.PathLike) -> tuple[str, Path | None]:
    """Classify a spec: ``("bundled"|"folder"|"hub", local_path_or_None)``."""
    text = str(spec)
    if text == BUNDLED:
        return "bundled", bundled_path()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder.")
        return "folder", path
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
    kind, path = resolve_spec(spec)
    device = str(device or default_device())
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
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        source = str(path)
    hf_model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    bridge.workbench_spec = str(spec)
    return bridge


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
    """
    wanted = _hf_names(model)
    found: dict[str, torch.Tensor] = {}
    for name, tensor in hf_model(model).state_dict(keep_vars=True).items():
        clean = canonical_hf_name(name)
        if clean not in found:
            found[clean] = tensor
    missing = [n for n in wanted if n not in found]
    if missing:
        raise RuntimeError(f"cannot map bridge parameters to Hugging Face names; missing {missing[:5]}")
    return {n: found[n] for n in wanted}


def hf_parameter(model, name: str) -> torch.Tensor:
    """The live tensor of one Hugging Face parameter, e.g. ``transformer.h.5.mlp.c_proj.weight``."""
    params = hf_state_dict(model)
    if name not in params:
        raise KeyError(f"{name!r} is not a parameter of this model")
    return params[name]


def model_fingerprint(model) -> str:
    """A short hash of the model's current weights (identity for on-disk caches)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(hf_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)
        # A strided sample keeps hashing fast on multi-GB models while any real edit,
        # which moves whole rows/columns, still changes the digest.
        step = max(1, flat.numel() // 65536)
        digest.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
        digest.update(flat.to(torch.float64).sum().item().hex().encode())
    return digest.hexdigest()[:16]


def model_info(model) -> dict:
    """Size facts of a loaded model, for ``workbench info`` and reports."""
    cfg = model.cfg
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
    }


def save_hf(model, out_dir: str | os.PathLike) -> Path:
    """Write the model's current (possibly edited) weights and tokenizer as a HF folder."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_model(model).config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict({k: v.detach().to("cpu").contiguous() for k, v in hf_state_dict(model).items()})
    fresh.save_pretrained(str(out), safe_serialization=True)
    model.tokenizer.save_pretrained(str(out))
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
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    bridge.workbench_spec = f"random-gpt2-L{n_layers}-d{d_model}-seed{seed}"
    return bridge
