"""MEND: a trained network turns the fine-tuning gradient of a few weights into an edit (reference §6a).

Mitchell et al. 2022, "Fast Model Editing at Scale"; the original code is eric-mitchell/mend.

**Edited weights** (``inner_params``, Hugging Face names): the MLP input and output projections
of the last few blocks (GPT-2 XL: ``c_fc``/``c_proj`` of blocks 45-47, GPT-J: ``fc_in``/``fc_out``
of blocks 25-27, the bundled model: blocks 3-5).

**Rank-one factors.** For a linear map with input x_t and output y_t (per token), the gradient
of the edit loss is ∇W = Σ_t δ_t x_tᵀ, δ_t = ∂L/∂y_t. A forward hook on each edited module
records x_t, and a zero tensor added to its output (so that autograd gives ∂L/∂y_t without
any weight requiring a gradient) records δ_t; both are kept at the *target tokens* only
(the positions whose logits predict the new object's tokens), so ∇W is never formed and
every update has rank at most the number of target tokens.

**Gradient transform.** The factors are normalised by running means and standard deviations
(accumulated while training), concatenated (``combine``) and passed through ``n_hidden + 1``
residual low-rank layers h <- h + max(0, (U V h + b) * s_m + o_m), U initialised to zero so
the network starts as the identity (``init="id"``). One network serves every edited weight of
the same shape (``shared``); s_m, o_m are a learned scale and shift per weight ("mode").

**Edit.** ∇̃W = Σ_t δ̃_t x̃_tᵀ in the weight's own orientation (``Conv1D`` stores [in, out],
``nn.Linear`` [out, in]), and W̃ = W - α_m ∇̃W with α_m a learned step per weight, initialised to
``edit_lr``. (The originals' code adds α·∇̃W and lets α and the network learn the sign; here the
untrained editor takes a gradient-descent step, as methods.md §6a writes it.)

:func:`mend` returns an :class:`~workbench.editing.edit.Edit` like every other method.
Training lives in :mod:`workbench.editing.mend_train` (``workbench.train_mend``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from jaxtyping import Float, Int

from ..facts import Fact
from ..predict import object_token_ids
from ..spans import tokenize
from .common import EditError, _pad_id, normalize_request
from .edit import Edit, _hf, record_outcome

_META_KEY = "workbench_mend"
FORMAT = 1
SHIPPED = "mend-toy"
"""Folder of the editor shipped for the bundled model, under the assets folder."""


class MendModelMismatch(ValueError):
    """A MEND editor was trained for another model (weights, names or shapes differ)."""


# ----------------------------------------------------------------------------- hyperparameters
@dataclass
class MendHyperParams:
    """MEND's hyperparameters, with the originals' names (``config/alg/mend.yaml``, ``config.yaml``).

    Network: ``n_hidden`` (hidden residual layers; the network has n_hidden + 1), ``rank`` (of U V),
    ``init`` (``"id"``: U = 0, residual; ``"xavier"``), ``norm`` (running-mean/std normalisation of
    the factors), ``combine`` (one network over [x, δ] instead of one per factor), ``shared`` (one
    network per weight shape, with per-weight modes), ``act`` (only ``"relu"``).
    Edit: ``inner_params`` (HF names of the edited weights; ``None``: the MLP input and output
    projections of the last ``n_blocks`` blocks), ``edit_lr`` (initial step α), ``prepend_bos`` (the BOS
    convention of training and edits; ``None``: :func:`~workbench.editing.hparams.editing_prepend_bos`).
    Training: ``lr`` (Adam on the network), ``lr_lr`` (Adam on the α's), ``cedit``/``cloc`` (loss
    weights), ``batch_size`` (edits per optimiser step; the originals accumulate 10 batches),
    ``grad_clip``, ``max_steps``, ``val_every`` (steps between validations), ``n_val`` (validation
    edits), ``early_stop_patience`` (validations without improvement), ``checkpoint_every``, ``seed``.
    """

    inner_params: tuple[str, ...] | None = None
    n_blocks: int = 3
    edit_lr: float = 1e-4
    lr: float = 1e-6
    lr_lr: float = 1e-4
    cedit: float = 0.1
    cloc: float = 1.0
    n_hidden: int = 1
    rank: int = 1920
    init: str = "id"
    norm: bool = True
    combine: bool = True
    shared: bool = True
    act: str = "relu"
    batch_size: int = 10
    grad_clip: float = 100.0
    max_steps: int = 100_000
    val_every: int = 500
    n_val: int = 100
    early_stop_patience: int = 4
    checkpoint_every: int = 50
    seed: int = 0
    prepend_bos: bool | None = None  # BOS before every prompt (None: the model's editing convention)

    def __post_init__(self) -> None:
        if self.inner_params is not None:
            self.inner_params = tuple(self.inner_params)
            if not self.inner_params:
                raise ValueError("inner_params is empty; name at least one weight (or None for the default)")
        if self.init not in ("id", "xavier"):
            raise ValueError(f"init must be 'id' or 'xavier', not {self.init!r}")
        if self.act != "relu":
            raise ValueError(f"act must be 'relu', not {self.act!r}")
        for name in ("n_hidden", "rank", "batch_size", "max_steps", "val_every", "n_val", "n_blocks",
                     "checkpoint_every"):
            low = 0 if name == "n_hidden" else 1
            if int(getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "lr_lr", "cedit", "cloc", "grad_clip"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inner_params"] = list(self.inner_params) if self.inner_params is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MendHyperParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MEND hyperparameter(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def with_(self, **changes: Any) -> "MendHyperParams":
        return replace(self, **changes)


def _blocks(prefix: str, names: Sequence[str], layers: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{l}.mlp.{n}.weight" for l in layers for n in names)


MEND_GPT2_XL = MendHyperParams(inner_params=_blocks("transformer.h", ("c_proj", "c_fc"), (45, 46, 47)),
                               prepend_bos=False)
"""The originals' GPT-2 XL setup (``config/model/gpt2xl.yaml`` + ``config/alg/mend.yaml``)."""

MEND_GPT_J = MendHyperParams(inner_params=_blocks("transformer.h", ("fc_in", "fc_out"), (25, 26, 27)),
                             prepend_bos=False)
"""The originals' GPT-J setup (``config/model/gptj.yaml`` + ``config/alg/mend.yaml``). Both originals
tokenize without BOS (the Hugging Face tokenizers' default)."""

MEND_TOY = MendHyperParams(
    inner_params=_blocks("transformer.h", ("c_proj", "c_fc"), (3, 4, 5)),
    edit_lr=1e-4, lr=1e-4, lr_lr=1e-3, rank=128, batch_size=16, max_steps=400, val_every=50, n_val=96,
    early_stop_patience=3, checkpoint_every=25,
)
"""The bundled model (6 blocks of width 128): the last three blocks as in the originals' GPT-2 small
setup; rank 128 keeps the shipped editor small (two networks of width 640, ~2.6 MB); the
network and step learning rates are larger than GPT-2 XL's (a small model's factors are few and
its edits need steps ~100x edit_lr), chosen on training runs of the bundled model."""

MEND_PRESETS: dict[str, MendHyperParams] = {"gpt2-xl": MEND_GPT2_XL, "gpt-j": MEND_GPT_J, "toy-facts": MEND_TOY}


def mend_hparams_for(model) -> MendHyperParams:
    """The preset for ``model``: by its spec/name, else the defaults (last three blocks)."""
    spec = str(getattr(model, "workbench_spec", "") or "").lower()
    name = str(getattr(getattr(_hf(model), "config", None), "_name_or_path", "") or "").lower()
    for key, preset in MEND_PRESETS.items():
        if key in spec or key in name:
            return preset
    if "gpt-j" in spec or "gptj" in spec:
        return MEND_GPT_J
    return MendHyperParams()


# ----------------------------------------------------------------------------- edited weights
@dataclass(frozen=True)
class EditedWeight:
    """An edited weight: its HF name, (in, out) features and orientation (``"in_out"``: Conv1D)."""

    name: str
    d_in: int
    d_out: int
    orientation: str  # "in_out" (weight is [in, out], y = x W) or "out_in" (nn.Linear, y = x Wᵀ)

    @property
    def shape_key(self) -> str:
        return f"{self.d_in}x{self.d_out}"


def default_inner_params(model, n_blocks: int = 3) -> tuple[str, ...]:
    """HF names of the MLP output and input projections of the last ``n_blocks`` blocks, from the
    family description (:mod:`workbench.architecture`): GPT-2 ``c_proj``, ``c_fc``; GPT-J ``fc_out``,
    ``fc_in``; GPT-NeoX ``dense_4h_to_h``, ``dense_h_to_4h``; Llama-likes ``down_proj``, ``gate_proj``,
    ``up_proj``."""
    from ..architecture import mlp_weights

    n_layers = int(model.cfg.n_layers)
    if not 1 <= n_blocks <= n_layers:
        raise ValueError(f"n_blocks={n_blocks} but the model has {n_layers} blocks")
    names: list[str] = []
    for l in range(n_layers - n_blocks, n_layers):
        w = mlp_weights(model, l)
        names += [w.out_name, *w.in_names]
    return tuple(names)


def _owning_modules(model) -> dict[str, nn.Module]:
    """``{hf_weight_name: module}`` for every module that owns a ``weight`` parameter directly."""
    from ..loading import canonical_hf_name

    out: dict[str, nn.Module] = {}
    for mod_name, module in _hf(model).named_modules():
        if isinstance(module._parameters.get("weight"), torch.Tensor):
            out.setdefault(canonical_hf_name(f"{mod_name}.weight"), module)
    return out


def _orientation(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style
        return "in_out"
    raise EditError(f"MEND edits linear maps (nn.Linear or Conv1D); {type(module).__name__} is neither")


def edited_weights(model, names: Sequence[str]) -> tuple[list[EditedWeight], list[nn.Module]]:
    """The :class:`EditedWeight` descriptions and the modules of ``names`` in ``model``."""
    owners = _owning_modules(model)
    missing = [n for n in names if n not in owners]
    if missing:
        raise MendModelMismatch(f"model has no linear weight(s) {missing}; MEND edits {list(names)}")
    weights, modules = [], []
    for n in names:
        module = owners[n]
        orient = _orientation(module)
        rows, cols = module.weight.shape
        d_in, d_out = (rows, cols) if orient == "in_out" else (cols, rows)
        weights.append(EditedWeight(n, int(d_in), int(d_out), orient))
        modules.append(module)
    return weights, modules


# ----------------------------------------------------------------------------- the network
class LowRankResidual(nn.Module):
    """h -> h + max(0, (U V h + b) * s_m + o_m) (``init="id"``), or without the residual (``"xavier"``)."""

    def __init__(self, width: int, rank: int, n_modes: int | None, init: str) -> None:
        super().__init__()
        mid = min(rank, width)
        self.init = init
        if init == "id":
            self.u = nn.Parameter(torch.zeros(width, mid))
            self.v = nn.Parameter(torch.randn(mid, width))
        else:
            self.u = nn.Parameter(torch.empty(width, mid))
            self.v = nn.Parameter(torch.empty(mid, width))
            nn.init.xavier_uniform_(self.u, gain=nn.init.calculate_gain("relu"))
            nn.init.xavier_uniform_(self.v, gain=1.0)
        self.bias = nn.Parameter(torch.zeros(width))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, width)) if n_modes else None
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, width)) if n_modes else None

    def forward(self, h: Float[torch.Tensor, "n w"], mode: int | None = None) -> Float[torch.Tensor, "n w"]:
        pre = (h @ self.v.T) @ self.u.T + self.bias
        if mode is not None and self.mode_scale is not None:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        act = pre.clamp(min=0)  # clamp, not relu: the originals' choice (gradient at 0)
        return h + act if self.init == "id" else act


class GradientTransform(nn.Module):
    """Normalise the factors (running statistics) and transform them: (x, δ) -> (x̃, δ̃)."""

    def __init__(self, d_in: int, d_out: int, hp: MendHyperParams, n_modes: int | None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.norm, self.combine = d_in, d_out, hp.norm, hp.combine

        def net(width: int) -> nn.ModuleList:
            return nn.ModuleList(LowRankResidual(width, hp.rank, n_modes, hp.init) for _ in range(hp.n_hidden + 1))

        if hp.combine:
            self.net = net(d_in + d_out)
        else:
            self.net_x, self.net_d = net(d_in), net(d_out)
        for side, width in (("x", d_in), ("d", d_out)):
            self.register_buffer(f"mean_{side}", torch.zeros(width, dtype=torch.float64))
            self.register_buffer(f"m2_{side}", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update_stats(self, x: torch.Tensor, d: torch.Tensor) -> None:
        """Add rows to the running mean and variance (Chan et al.'s parallel update, float64)."""
        n_b = x.shape[0]
        if n_b == 0:
            return
        n_a = self.count.clone()
        total = n_a + n_b
        for side, rows in (("x", x), ("d", d)):
            rows = rows.double()
            mean_b = rows.mean(0)
            m2_b = ((rows - mean_b) ** 2).sum(0)
            mean_a, m2_a = getattr(self, f"mean_{side}"), getattr(self, f"m2_{side}")
            delta = mean_b - mean_a
            mean_a += delta * (n_b / total)
            m2_a += m2_b + delta ** 2 * (n_a * n_b / total)
        self.count += n_b

    def _normalise(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        if not self.norm:
            return rows
        if self.count < 2:
            raise RuntimeError("the MEND editor has no normalisation statistics yet (train it first)")
        mean = getattr(self, f"mean_{side}")
        std = (getattr(self, f"m2_{side}") / (self.count - 1)).sqrt()
        return ((rows - mean.float()) / (std.float() + 1e-7))

    def forward(self, x: Float[torch.Tensor, "n d_in"], d: Float[torch.Tensor, "n d_out"], mode: int | None = None
                ) -> tuple[Float[torch.Tensor, "n d_in"], Float[torch.Tensor, "n d_out"]]:
        x, d = x.float(), d.float()
        if self.training and self.norm:
            self.update_stats(x, d)
        x, d = self._normalise(x, "x"), self._normalise(d, "d")
        if self.combine:
            h = torch.cat([x, d], dim=-1)
            for layer in self.net:
                h = layer(h, mode)
            return h[:, : self.d_in], h[:, self.d_in:]
        for layer in self.net_x:
            x = layer(x, mode)
        for layer in self.net_d:
            d = layer(d, mode)
        return x, d


# ----------------------------------------------------------------------------- factors
@dataclass
class EditRows:
    """Token rows of edit prompts followed by their targets, and where the targets are.

    ``ids`` [rows, T] right-padded; ``tgt_row``/``tgt_pos``/``tgt_id`` list every target token:
    the logits at (tgt_row, tgt_pos) should predict tgt_id.
    """

    ids: Int[torch.Tensor, "rows T"]
    tgt_row: Int[torch.Tensor, "n"]
    tgt_pos: Int[torch.Tensor, "n"]
    tgt_id: Int[torch.Tensor, "n"]
    lengths: Int[torch.Tensor, "rows"]


def edit_rows(model, pairs: Sequence[tuple[str, str]], device: torch.device | str | None = None) -> EditRows:
    """Rows of ``(prompt, object)`` pairs: the prompt's tokens then the object's tokens but the last."""
    seqs, rows, pos, tgt = [], [], [], []
    for r, (prompt, obj) in enumerate(pairs):
        p_ids = list(tokenize(model, prompt).ids)
        o_ids = object_token_ids(model, obj)
        seqs.append(p_ids + o_ids[:-1])
        for j, t in enumerate(o_ids):
            rows.append(r)
            pos.append(len(p_ids) - 1 + j)
            tgt.append(t)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), _pad_id(model), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    dev = device if device is not None else model.cfg.device
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
    return EditRows(ids.to(dev), as_t(rows), as_t(pos), as_t(tgt), as_t([len(s) for s in seqs]))


def target_nll(logits: torch.Tensor, rows: EditRows) -> Float[torch.Tensor, "rows"]:
    """Mean NLL of each row's target tokens (teacher-forced)."""
    logp = torch.log_softmax(logits[rows.tgt_row, rows.tgt_pos].float(), dim=-1)
    tok = -logp.gather(1, rows.tgt_id[:, None])[:, 0]
    n_rows = rows.ids.shape[0]
    total = torch.zeros(n_rows, device=tok.device).index_add(0, rows.tgt_row, tok)
    count = torch.zeros(n_rows, device=tok.device).index_add(0, rows.tgt_row, torch.ones_like(tok))
    return total / count


def target_correct(logits: torch.Tensor, rows: EditRows) -> torch.Tensor:
    """Whether every target token of each row is the argmax (bool [rows])."""
    hit = (logits[rows.tgt_row, rows.tgt_pos].argmax(-1) == rows.tgt_id).float()
    n_rows = rows.ids.shape[0]
    misses = torch.zeros(n_rows, device=hit.device).index_add(0, rows.tgt_row, 1 - hit)
    return misses == 0


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the wrapped HF model (the bridge's own weights, without TransformerLens hook overhead)."""
    return _hf(model)(input_ids=ids).logits


@dataclass
class Factors:
    """Per edited weight, the inputs x_t and output gradients δ_t at the target tokens, and each
    token's row (edit) index."""

    x: dict[str, Float[torch.Tensor, "n d_in"]]
    d: dict[str, Float[torch.Tensor, "n d_out"]]
    row: Int[torch.Tensor, "n"]
    n_rows: int


def collect_factors(model, weights: Sequence[EditedWeight], modules: Sequence[nn.Module], rows: EditRows
                    ) -> tuple[Factors, Float[torch.Tensor, "rows"]]:
    """Forward and backward the edit loss (each row's mean target NLL, summed over rows, so every
    row gets its own gradient) and keep x_t, δ_t of every edited weight at the target tokens.

    The model's weights stay frozen: a zero tensor that requires a gradient is added to each
    edited module's output, and its gradient is δ. Returns the factors and each row's NLL.
    """
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable:
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            probe = torch.zeros_like(output, requires_grad=True)
            probes[name] = probe
            return output + probe
        return hook

    handles = [m.register_forward_hook(make(w.name)) for w, m in zip(weights, modules)]
    try:
        with torch.enable_grad():
            logits = logits_of(model, rows.ids)
            nll = target_nll(logits, rows)
            grads = torch.autograd.grad(nll.sum(), [probes[w.name] for w in weights], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    x, d = {}, {}
    for w, g in zip(weights, grads):
        x[w.name] = inputs[w.name][rows.tgt_row, rows.tgt_pos].float()
        d[w.name] = (torch.zeros_like(probes[w.name]) if g is None else g)[rows.tgt_row, rows.tgt_pos].float()
    return Factors(x, d, rows.tgt_row, int(rows.ids.shape[0])), nll.detach()


# ----------------------------------------------------------------------------- the editor
class MendEditor(nn.Module):
    """The trained MEND editor of one model: gradient transforms, per-weight modes and steps.

    ``weights`` lists the edited weights (HF names, shapes, orientation); ``model_fingerprint``
    is :func:`workbench.loading.model_fingerprint` of the model it was trained for. Build one
    for a model with :meth:`for_model`, train it with :func:`workbench.train_mend`, save and
    load it with :meth:`save` / :meth:`load`.
    """

    def __init__(self, hparams: MendHyperParams, weights: Sequence[EditedWeight], model_fingerprint: str | None,
                 model_spec: str | None = None, info: dict | None = None) -> None:
        super().__init__()
        self.hparams = hparams
        self.weights = list(weights)
        self.model_fingerprint = model_fingerprint
        self.model_spec = model_spec
        self.info = dict(info or {})
        self.names = [w.name for w in self.weights]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"inner_params has duplicates: {self.names}")
        # one network per shape (modes = index among the weights of that shape), or per weight
        self.net_key: dict[str, str] = {}
        self.mode: dict[str, int | None] = {}
        groups: dict[str, list[EditedWeight]] = {}
        for w in self.weights:
            key = w.shape_key if hparams.shared else w.name.replace(".", "#")
            groups.setdefault(key, []).append(w)
            self.net_key[w.name] = key
            self.mode[w.name] = len(groups[key]) - 1 if hparams.shared else None
        self.nets = nn.ModuleDict({key: GradientTransform(ws[0].d_in, ws[0].d_out, hparams,
                                                          len(ws) if hparams.shared else None)
                                   for key, ws in groups.items()})
        self.alphas = nn.Parameter(torch.full((len(self.weights),), float(hparams.edit_lr)))

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_model(cls, model, hparams: MendHyperParams | None = None, seed: int | None = None) -> "MendEditor":
        """A fresh (untrained) editor for ``model``; the network's random init is seeded."""
        from ..loading import model_fingerprint

        hp = hparams or mend_hparams_for(model)
        names = hp.inner_params or default_inner_params(model, hp.n_blocks)
        weights, _ = edited_weights(model, names)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(hp.seed if seed is None else seed)
        try:
            editor = cls(replace(hp, inner_params=tuple(names)), weights, model_fingerprint(model),
                         getattr(model, "workbench_spec", None))
        finally:
            torch.random.set_rng_state(gen_state)
        return editor.to(model.cfg.device)

    # ---------------------------------------------------------------- checks
    def check_model(self, model, fingerprint: bool = True) -> list[nn.Module]:
        """The edited modules of ``model``; raises :class:`MendModelMismatch` if the editor was
        trained for another model (different weight names, shapes, or fingerprint)."""
        try:
            weights, modules = edited_weights(model, self.names)
        except MendModelMismatch as err:
            raise MendModelMismatch(f"this MEND editor was trained for another model ({self._origin()}): {err}") from None
        if weights != self.weights:
            bad = [(a.name, (a.d_in, a.d_out), (b.d_in, b.d_out)) for a, b in zip(self.weights, weights) if a != b]
            raise MendModelMismatch(f"this MEND editor was trained for another model ({self._origin()}): "
                                    f"weight shapes differ (name, editor, model): {bad}")
        if fingerprint and self.model_fingerprint is not None:
            from ..loading import model_fingerprint

            found = model_fingerprint(model)
            if found != self.model_fingerprint:
                raise MendModelMismatch(
                    f"this MEND editor was trained for another model ({self._origin()}); the model given has "
                    f"fingerprint {found}. Train an editor for it: `workbench train-mend --model "
                    f"{getattr(model, 'workbench_spec', None) or 'M'} --out DIR`")
        return modules

    def _origin(self) -> str:
        return f"spec {self.model_spec!r}, fingerprint {self.model_fingerprint}"

    # ---------------------------------------------------------------- the transform
    def transform(self, factors: Factors) -> Factors:
        """(x̃, δ̃) for every edited weight (normalisation statistics update in training mode)."""
        x, d = {}, {}
        for w in self.weights:
            x[w.name], d[w.name] = self.nets[self.net_key[w.name]](factors.x[w.name], factors.d[w.name],
                                                                   self.mode[w.name])
        return Factors(x, d, factors.row, factors.n_rows)

    def alpha(self, name: str) -> torch.Tensor:
        return self.alphas[self.names.index(name)]

    def weight_delta(self, w: EditedWeight, tx: torch.Tensor, td: torch.Tensor) -> torch.Tensor:
        """-α ∇̃W for one edit, ∇̃W = Σ_t δ̃_t x̃_tᵀ in the weight's own orientation."""
        grad = tx.T @ td if w.orientation == "in_out" else td.T @ tx
        return -self.alpha(w.name) * grad

    @contextlib.contextmanager
    def edited(self, modules: Sequence[nn.Module], transformed: Factors, row_edit: torch.Tensor) -> Iterator[None]:
        """Within the block, each edited module acts as W - α ∇̃W of the edit ``row_edit[r]`` on row r.

        The change is applied to the module's output in low-rank form, y += -α (x X̃ᵀ) D̃, which
        equals running with the edited weight and keeps the autograd path to the editor.
        """
        n_edits = transformed.n_rows
        counts = torch.bincount(transformed.row, minlength=n_edits)
        width = int(counts.max()) if len(counts) else 0
        slot = torch.zeros_like(transformed.row)
        seen = torch.zeros(n_edits, dtype=torch.long, device=slot.device)
        for i, r in enumerate(transformed.row.tolist()):  # position of each token within its edit
            slot[i] = seen[r]
            seen[r] += 1
        padded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for w in self.weights:
            tx, td = transformed.x[w.name], transformed.d[w.name]
            px = tx.new_zeros(n_edits, width, w.d_in).index_put((transformed.row, slot), tx)
            pd = td.new_zeros(n_edits, width, w.d_out).index_put((transformed.row, slot), td)
            padded[w.name] = (px[row_edit], pd[row_edit])

        def make(w: EditedWeight) -> Callable:
            def hook(module, args, output):
                px, pd = padded[w.name]
                inp = args[0].to(px.dtype)
                change = torch.einsum("rti,rni->rtn", inp, px)
                change = torch.einsum("rtn,rno->rto", change, pd)
                return output - (self.alpha(w.name) * change).to(output.dtype)
            return hook

        handles = [m.register_forward_hook(make(w)) for w, m in zip(self.weights, modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------- persistence
    def metadata(self) -> dict:
        return {"format": FORMAT, "hparams": self.hparams.to_dict(), "weights": [asdict(w) for w in self.weights],
                "model_fingerprint": self.model_fingerprint, "model_spec": self.model_spec, "info": self.info}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the editor as safetensors (tensors) with its hyperparameters, weights and model
        fingerprint as JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(self.metadata())})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, device: str | torch.device | None = None) -> "MendEditor":
        """Read an editor written by :meth:`save`; with ``model``, check it was trained for it."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / "editor.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no MEND editor there (build one with `workbench train-mend`)")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _META_KEY not in header:
            raise ValueError(f"{path} is a safetensors file but not a MEND editor (no {_META_KEY!r} metadata)")
        meta = json.loads(header[_META_KEY])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: MEND editor format {meta.get('format')} is not {FORMAT}")
        hp = MendHyperParams.from_dict(meta["hparams"])
        editor = cls(hp, [EditedWeight(**w) for w in meta["weights"]], meta.get("model_fingerprint"),
                     meta.get("model_spec"), meta.get("info"))
        editor.load_state_dict(tensors, strict=True)
        editor.eval()
        if model is not None:
            editor.check_model(model)
            device = device or model.cfg.device
        return editor.to(device or "cpu")

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> MendEditor:
    return MendEditor.load(path)


def shipped_editor_path() -> Path:
    """Where the editor for the bundled model lives (``assets/mend-toy/editor.safetensors``)."""
    from ..loading import assets_dir

    return assets_dir() / SHIPPED / "editor.safetensors"


def resolve_editor(model, editor: "MendEditor | str | os.PathLike | None") -> MendEditor:
    """``editor`` itself, the editor saved at a path, or (``None``) the shipped editor, which is
    for the bundled model only."""
    if isinstance(editor, MendEditor):
        return editor
    if editor is None:
        path = shipped_editor_path()
        if not path.exists():
            raise FileNotFoundError(f"no MEND editor given and none shipped at {path}; build one with "
                                    "`workbench train-mend --out DIR` and pass editor=DIR")
    else:
        path = Path(editor)
        if path.is_dir():
            path = path / "editor.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no MEND editor there (build one with `workbench train-mend`)")
    loaded = _load_cached(str(path.resolve()), path.stat().st_mtime)
    return loaded.to(model.cfg.device)


def _checked(model, editor: MendEditor) -> list[nn.Module]:
    """The editor's modules in ``model``, the fingerprint checked once per (model, editor) while the
    model carries no applied workbench edit (MEND may then edit an edited model)."""
    hf = _hf(model)
    seen = hf.__dict__.setdefault("_workbench_mend_checked", set())
    applied = bool(hf.__dict__.get("_workbench_applied_edits"))
    key = (id(editor), editor.model_fingerprint)
    modules = editor.check_model(model, fingerprint=key not in seen and not applied)
    if not applied:
        seen.add(key)
    return modules


# ----------------------------------------------------------------------------- the method
def mend(model, fact: Fact | dict, new_object: str | None = None, *, editor: MendEditor | str | os.PathLike | None = None,
         locus: str = "subject", prompt: str | None = None, prepend_bos: bool | None = None) -> Edit:
    """Edit ``fact`` to ``new_object`` with a trained MEND editor; returns an unapplied :class:`Edit`.

    Args:
        fact: a :class:`Fact` (or CounterFact ``requested_rewrite`` dict); the edit prompt is its
            prompt (``prompt=`` overrides it, e.g. the relation-first phrasing), the target its
            ``target_new`` unless ``new_object`` is given.
        editor: a :class:`MendEditor`, a path to a saved one (file or folder), or ``None`` for the
            editor shipped for the bundled model. An editor trained for another model is refused
            (:class:`MendModelMismatch`).
        locus: recorded only: MEND, like FT, has no token locus (its gradient comes from the whole
            prompt).
        prepend_bos: BOS before the prompt (default: the convention the editor was trained with).

    The delta of each weight is -α Σ_t δ̃_t x̃_tᵀ over the target tokens, so its rank is at most the
    number of the new object's tokens.
    """
    from ..loading import model_fingerprint
    from ..spans import bos_convention
    from .hparams import editing_prepend_bos

    request = normalize_request(fact, new_object)
    text = prompt if prompt is not None else request["prompt"].format(request["subject"])
    if request["subject"] not in text:
        raise EditError(f"edit prompt {text!r} does not contain the subject {request['subject']!r}")
    ed = resolve_editor(model, editor)
    modules = _checked(model, ed)
    target = request["target_new"]["str"]
    bos = editing_prepend_bos(model, prepend_bos, ed.hparams.prepend_bos)
    with bos_convention(model, bos):
        rows = edit_rows(model, [(text, target)])
    was_training = ed.training
    ed.eval()
    try:
        factors, nll = collect_factors(model, ed.weights, modules, rows)
        with torch.no_grad():
            tf = ed.transform(factors)
            deltas = {w.name: ed.weight_delta(w, tf.x[w.name], tf.d[w.name]) for w in ed.weights}
    finally:
        ed.train(was_training)
    for name, delta in deltas.items():
        if not torch.isfinite(delta).all():
            raise EditError(f"MEND produced a non-finite update for {name} on {text!r}")
    n_tokens = int(rows.tgt_id.numel())
    edit = Edit(
        deltas=deltas, method="mend", locus=locus, requests=[request],
        hparams={**ed.hparams.to_dict(), "prepend_bos": bos, "editor_fingerprint": ed.model_fingerprint,
                 "edit_prompt": text},
        info={"n_target_tokens": n_tokens, "edit_nll_before": float(nll[0]),
              "alphas": [float(a) for a in ed.alphas.detach()],
              "delta_norms": {n: float(d.norm()) for n, d in deltas.items()}},
        model_fingerprint=model_fingerprint(model),
    )
    with bos_convention(model, bos):
        return record_outcome(model, edit)  # info: reached, p_new; warns when the edit misses
