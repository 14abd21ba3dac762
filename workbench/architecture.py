"""Where each model family keeps the weights that editing methods change.

ROME, MEMIT, FT, KN (and MEND) all edit the MLP's *output projection* of a layer and
read its *key*, the input of that projection. Families name and store it differently:

=========  =====================  ===========================  ======================  ==========
family     layers                 output projection            input projection(s)     stored as
=========  =====================  ===========================  ======================  ==========
gpt2       ``transformer.h``      ``mlp.c_proj`` (Conv1D)      ``mlp.c_fc``            [d_mlp, d_model]
gptj       ``transformer.h``      ``mlp.fc_out``               ``mlp.fc_in``           [d_model, d_mlp]
gpt_neox   ``gpt_neox.layers``    ``mlp.dense_4h_to_h``        ``mlp.dense_h_to_4h``   [d_model, d_mlp]
gpt_neo    ``transformer.h``      ``mlp.c_proj`` (Linear)      ``mlp.c_fc``            [d_model, d_mlp]
llama      ``model.layers``       ``mlp.down_proj``            ``mlp.gate_proj``,      [d_model, d_mlp]
(mistral,                                                      ``mlp.up_proj``
qwen2)
=========  =====================  ===========================  ======================  ==========

The description is the one place that knows this; methods ask it for the parameter's
Hugging Face name and live tensor (:func:`workbench.loading.hf_parameter`), and compute
updates in the *key-major* layout ``[d_mlp, d_model]`` (``out = key @ W``), converting
with :meth:`MLPWeights.to_stored` / :meth:`MLPWeights.key_major`.

Hooks are the bridge's and the same for every family: the key is
``blocks.{l}.mlp.hook_post`` (for gated MLPs the product act(gate)·up, which is exactly
what ``down_proj`` receives; :func:`check_key_hook` verifies this numerically), and ROME's
δ is added at ``blocks.{l}.hook_mlp_out`` (the projection's output, bias included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float

from .loading import hf_model, hf_state_dict


class ArchitectureError(ValueError):
    """The model's family is not one whose MLP weights this package knows."""


@dataclass(frozen=True)
class Family:
    """Names of one family's MLP weights, relative to a layer (``{layers}.{l}.``)."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    mlp_out: str
    mlp_in: tuple[str, ...]
    conv1d: bool  # True: GPT-2's Conv1D, weight stored [d_in, d_out]; False: nn.Linear, [d_out, d_in]
    gated: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), "transformer.h", "mlp.c_proj", ("mlp.c_fc",), conv1d=True),
    Family("gptj", ("gptj",), "transformer.h", "mlp.fc_out", ("mlp.fc_in",), conv1d=False),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",), conv1d=False),
    Family("gpt_neo", ("gpt_neo",), "transformer.h", "mlp.c_proj", ("mlp.c_fc",), conv1d=False),
    Family("llama", ("llama", "mistral", "qwen2"), "model.layers", "mlp.down_proj",
           ("mlp.gate_proj", "mlp.up_proj"), conv1d=False, gated=True),
)


def family(model) -> Family:
    """The :class:`Family` of a bridge, from its Hugging Face config's ``model_type``."""
    model_type = getattr(hf_model(model).config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ArchitectureError(f"model_type {model_type!r} is not a supported family for editing; known: {known}")


@dataclass(frozen=True)
class MLPWeights:
    """One layer's MLP weights as the editing methods see them.

    ``out_weight`` is the live parameter (editing it in place changes the model).
    ``in_names``/``in_weights`` are the input projection(s): one, or (gate, up) for gated MLPs.
    """

    family: str
    layer: int
    out_name: str
    out_weight: torch.Tensor
    out_bias_name: str | None
    in_names: tuple[str, ...]
    in_weights: tuple[torch.Tensor, ...]
    in_bias_names: tuple[str | None, ...]
    conv1d: bool
    gated: bool
    key_hook: str
    out_hook: str

    @property
    def orientation(self) -> str:
        """``"key_major"`` ([d_mlp, d_model], GPT-2's Conv1D) or ``"out_major"`` ([d_model, d_mlp], nn.Linear)."""
        return "key_major" if self.conv1d else "out_major"

    @property
    def d_mlp(self) -> int:
        return int(self.out_weight.shape[0 if self.conv1d else 1])

    @property
    def d_model(self) -> int:
        return int(self.out_weight.shape[1 if self.conv1d else 0])

    def key_major(self, tensor: torch.Tensor) -> torch.Tensor:
        """A view of a weight-shaped tensor in the [d_mlp, d_model] layout (row i = unit i's value vector)."""
        return tensor if self.conv1d else tensor.T

    def to_stored(self, update: Float[torch.Tensor, "d_mlp d_model"]) -> torch.Tensor:
        """A key-major update [d_mlp, d_model] in the stored layout of ``out_weight``."""
        expected = (self.d_mlp, self.d_model)
        if tuple(update.shape) != expected:
            raise ValueError(f"update of shape {tuple(update.shape)} is not [d_mlp, d_model] = {list(expected)}")
        return update if self.conv1d else update.T.contiguous()

    def project(self, keys: Float[torch.Tensor, "... d_mlp"], weight: torch.Tensor) -> Float[torch.Tensor, "... d_model"]:
        """``keys`` through a weight-shaped matrix (no bias): what the projection adds for a weight delta."""
        return keys @ weight if self.conv1d else keys @ weight.T


def mlp_weights(model, layer: int) -> MLPWeights:
    """The :class:`MLPWeights` of ``layer`` of a bridge."""
    fam = family(model)
    n_layers = int(model.cfg.n_layers)
    if not 0 <= int(layer) < n_layers:
        raise ArchitectureError(f"layer {layer} is out of range for a {n_layers}-layer model")
    params = hf_state_dict(model)
    prefix = f"{fam.layers}.{int(layer)}."

    def get(name: str) -> torch.Tensor:
        if name not in params:
            raise ArchitectureError(f"{name!r} is missing from this {fam.name} model's parameters")
        return params[name]

    def bias(stem: str) -> str | None:
        return prefix + stem + ".bias" if prefix + stem + ".bias" in params else None

    out_name = prefix + fam.mlp_out + ".weight"
    in_names = tuple(prefix + s + ".weight" for s in fam.mlp_in)
    return MLPWeights(family=fam.name, layer=int(layer), out_name=out_name, out_weight=get(out_name),
                      out_bias_name=bias(fam.mlp_out), in_names=in_names, in_weights=tuple(get(n) for n in in_names),
                      in_bias_names=tuple(bias(s) for s in fam.mlp_in), conv1d=fam.conv1d, gated=fam.gated,
                      key_hook=key_hook(layer), out_hook=out_hook(layer))


def key_hook(layer: int) -> str:
    """The hook carrying the key (the output projection's input) of ``layer``, every family."""
    return f"blocks.{int(layer)}.mlp.hook_post"


def out_hook(layer: int) -> str:
    """The hook carrying the MLP output of ``layer`` (where ROME's δ is added), every family."""
    return f"blocks.{int(layer)}.hook_mlp_out"


def _module_of(model, weight: torch.Tensor) -> torch.nn.Module:
    """The innermost module whose ``weight`` is ``weight`` (the HF projection itself)."""
    found = None
    for module in hf_model(model).modules():
        if module.__dict__.get("_parameters", {}).get("weight") is weight:
            found = module
    if found is None:
        raise ArchitectureError("no module owns this weight")
    return found


@torch.no_grad()
def check_key_hook(model, layer: int, ids: torch.Tensor | Sequence[int]) -> dict[str, float]:
    """Max |difference| between the description's hooks and what the HF projection sees on ``ids``.

    ``key``: ``key_hook`` vs the actual input of the output projection; ``out``: ``out_hook``
    vs the projection's output. Both are 0 when the description is right for this model.
    """
    w = mlp_weights(model, layer)
    ids = torch.as_tensor(ids, device=model.cfg.device)
    ids = ids[None] if ids.dim() == 1 else ids
    seen: dict[str, torch.Tensor] = {}
    handle = _module_of(model, w.out_weight).register_forward_hook(
        lambda mod, args, out: seen.update(key=args[0].detach(), out=out.detach()))
    try:
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n in (w.key_hook, w.out_hook))
    finally:
        handle.remove()
    return {"key": float((cache[w.key_hook] - seen["key"]).abs().max()),
            "out": float((cache[w.out_hook] - seen["out"]).abs().max())}


# ----------------------------------------------------------------------------- tiny models
FAMILY_NAMES = ("gpt2", "gptj", "gpt_neox", "gpt_neo", "llama", "mistral", "qwen2")
"""Model types :func:`tiny_config` builds (every family above; Llama, Mistral and Qwen2 with GQA)."""


def tiny_config(model_type: str, *, vocab_size: int, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                n_kv_heads: int | None = None, d_mlp: int | None = None, n_ctx: int = 64,
                bos_token_id: int | None = None, eos_token_id: int | None = None, initializer_range: float = 0.02):
    """A Hugging Face config of ``model_type`` at the given (small) size.

    Rotary families rotate a quarter (GPT-J, GPT-NeoX) or all (Llama-likes) of each head;
    GPT-NeoX uses its parallel residual, as Pythia does; Llama/Mistral/Qwen2 default to
    grouped-query attention with ``n_heads // 2`` key/value heads; GPT-Neo alternates
    global and local attention with a window of ``n_ctx``. A larger ``initializer_range``
    than the families' 0.02 gives a random model peaked next-token distributions.
    """
    from transformers import (GPT2Config, GPTJConfig, GPTNeoConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              Qwen2Config)

    d_mlp = d_mlp or 4 * d_model
    head = d_model // n_heads
    kv = n_kv_heads or max(1, n_heads // 2)
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "initializer_range": initializer_range}
    if model_type == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                          n_head=n_heads, n_inner=d_mlp, **ids)
    if model_type == "gptj":
        return GPTJConfig(vocab_size=vocab_size, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                          n_head=n_heads, n_inner=d_mlp, rotary_dim=max(2, head // 4 // 2 * 2), **ids)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=n_ctx, hidden_size=d_model,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads, intermediate_size=d_mlp,
                             rotary_pct=0.25, use_parallel_residual=True, **ids)
    if model_type == "gpt_neo":
        types = [[["global", "local"], n_layers // 2]] if n_layers % 2 == 0 else [[["global"], n_layers]]
        return GPTNeoConfig(vocab_size=vocab_size, max_position_embeddings=n_ctx, hidden_size=d_model,
                            num_layers=n_layers, num_heads=n_heads, intermediate_size=d_mlp,
                            attention_types=types, window_size=n_ctx, **ids)
    gqa = {"vocab_size": vocab_size, "max_position_embeddings": n_ctx, "hidden_size": d_model,
           "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": kv,
           "intermediate_size": d_mlp, **ids}
    if model_type == "llama":
        return LlamaConfig(**gqa)
    if model_type == "mistral":
        return MistralConfig(**gqa)
    if model_type == "qwen2":
        return Qwen2Config(**gqa)
    raise ArchitectureError(f"no tiny config for {model_type!r}; known: {FAMILY_NAMES}")


def save_random_model(model_type: str, folder, *, seed: int = 0, tokenizer=None, **sizes) -> "Path":
    """Write a randomly initialised ``model_type`` model and the tokenizer as a HF folder (offline).

    The tokenizer defaults to the bundled one. ``sizes`` go to :func:`tiny_config`. Load the
    folder with :func:`workbench.loading.load_model`.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from .loading import _tokenizer_for_random_model

    tok = _tokenizer_for_random_model(tokenizer)
    config = tiny_config(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def random_bridge(model_type: str, *, seed: int = 0, tokenizer=None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, **sizes):
    """A randomly initialised ``model_type`` bridge built in memory (benchmarks; nothing written).

    Like :func:`workbench.loading.random_model` for any family of :func:`tiny_config`, e.g. a
    Llama-shaped model: ``random_bridge("llama", n_layers=12, d_model=768, n_heads=12,
    n_kv_heads=4, d_mlp=2048, n_ctx=1024)``.
    """
    import warnings

    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    from .loading import _tokenizer_for_random_model, default_device

    tok = _tokenizer_for_random_model(tokenizer)
    config = tiny_config(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **sizes)
    device = str(device or default_device())
    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(tok.name_or_path, hf_model=hf, tokenizer=tok, device=device,
                                                     dtype=dtype)
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    bridge.workbench_spec = f"random-{model_type}-L{config.num_hidden_layers}-d{config.hidden_size}-seed{seed}"
    return bridge
