"""MEND edits (reference §6a): the fine-tuning gradient of an edit, transformed by a trained editor.

Mitchell et al. 2022, "Fast Model Editing at Scale"; the original code is eric-mitchell/mend.

**Edited weights** (``inner_params``, Hugging Face names): the MLP input and output projections
of the last few blocks (GPT-2 XL: ``c_fc``/``c_proj`` of blocks 45-47, GPT-J: ``fc_in``/``fc_out``
of blocks 25-27, the bundled model: blocks 3-5).

**Rank-one factors.** For a linear map with input x_t and output y_t (per token), the gradient
of the edit loss is ∇W = Σ_t δ_t x_tᵀ, δ_t = ∂L/∂y_t. A forward hook on each edited module
records x_t, and a zero tensor added to its output (so that autograd gives ∂L/∂y_t without
any weight requiring a gradient) records δ_t. As in the originals (``algs/mend.py``), the
factors are kept at **every position whose input and output gradient are both nonzero**
(``factor_positions="all"``): the prompt's positions too, wherever attention carries them into
the loss, so Σ_t δ_t x_tᵀ is the weight's full fine-tuning gradient. ``factor_positions="target"``
keeps only the positions whose logits predict the new object's tokens (an earlier workbench's
choice, kept as a named ablation). ∇W is never formed, and each update has rank at most the
number of positions kept.

The editor network that transforms the factors, and its persistence, are in
:mod:`workbench.editing.mend_net`; the hyperparameters and presets in
:mod:`workbench.editing.mend_hparams`. :func:`mend` returns an
:class:`~workbench.editing.edit.Edit` like every other method. Training lives in
:mod:`workbench.editing.mend_train` (``workbench.train_mend``).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from jaxtyping import Float, Int

from ..facts import Fact
from ..predict import object_token_ids
from ..spans import tokenize
from .common import EditError, _pad_id, normalize_request
from .edit import Edit, _hf, record_outcome
from .mend_hparams import MEND_GPT2_XL, MEND_GPT_J, MEND_PRESETS, MEND_TOY, MendHyperParams, mend_hparams_for
from .mend_net import (EditedWeight, Factors, GradientTransform, LowRankResidual, MendEditor, MendModelMismatch,
                       default_inner_params, edited_weights)

__all__ = ["mend", "MendEditor", "MendHyperParams", "MendModelMismatch", "MEND_GPT2_XL", "MEND_GPT_J", "MEND_TOY",
           "MEND_PRESETS", "mend_hparams_for", "EditedWeight", "Factors", "GradientTransform", "LowRankResidual",
           "default_inner_params", "edited_weights", "EditRows", "edit_rows", "target_nll", "target_correct",
           "logits_of", "collect_factors", "resolve_editor", "shipped_editor_path"]

SHIPPED = "mend-toy"
"""Folder of the editor shipped for the bundled model, under the assets folder."""


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


def collect_factors(model, weights: Sequence[EditedWeight], modules: Sequence[nn.Module], rows: EditRows,
                    positions: str = "all") -> tuple[Factors, Float[torch.Tensor, "rows"]]:
    """Forward and backward the edit loss (each row's mean target NLL, summed over rows, so every
    row gets its own gradient) and keep x_t, δ_t of every edited weight.

    ``positions="all"`` (the originals): every position of each row's tokens where x_t and δ_t
    are both nonzero, per weight; ``"target"``: the target-predicting positions only. The
    model's weights stay frozen: a zero tensor that requires a gradient is added to each edited
    module's output, and its gradient is δ. Returns the factors and each row's NLL.
    """
    if positions not in ("all", "target"):
        raise ValueError(f"positions must be 'all' or 'target', not {positions!r}")
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
    x, d, row = {}, {}, {}
    n_rows, width = rows.ids.shape
    inside = torch.arange(width, device=rows.ids.device)[None, :] < rows.lengths[:, None]
    for w, g in zip(weights, grads):
        xs, ds = inputs[w.name].float(), (torch.zeros_like(probes[w.name]) if g is None else g).float()
        if positions == "target":
            r, t = rows.tgt_row, rows.tgt_pos
        else:  # the originals' nz_mask, within each row's own tokens (row-major: rows ascending)
            r, t = torch.nonzero(inside & (xs != 0).any(-1) & (ds != 0).any(-1), as_tuple=True)
        x[w.name], d[w.name], row[w.name] = xs[r, t], ds[r, t], r
    return Factors(x, d, row, int(n_rows)), nll.detach()


# ----------------------------------------------------------------------------- the editor to use
@lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int) -> MendEditor:
    return MendEditor.load(path)


def shipped_editor_path() -> Path:
    """Where the editor for the bundled model lives (``assets/mend-toy/editor.safetensors``)."""
    from ..loading import assets_dir

    return assets_dir() / SHIPPED / "editor.safetensors"


ORIGINAL_SUFFIXES = (".pt", ".pth", ".ckpt")
"""File endings read as a checkpoint of the originals' code (:func:`~workbench.editing.mend_original.load_original`)."""

_ORIGINALS: dict[tuple, tuple[weakref.ref, MendEditor]] = {}


def _original_for(model, path: Path) -> MendEditor:
    """The originals' checkpoint at ``path`` converted for ``model`` (once per file version and model)."""
    from .mend_original import load_original

    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, id(model))
    hit = _ORIGINALS.get(key)
    if hit is not None and hit[0]() is model:
        return hit[1]
    editor = load_original(path, model)
    _ORIGINALS.clear()  # one converted editor at a time (they can be large)
    _ORIGINALS[key] = (weakref.ref(model), editor)
    return editor


def resolve_editor(model, editor: "MendEditor | str | os.PathLike | None") -> MendEditor:
    """``editor`` itself, the editor saved at a path (a workbench editor file or folder, or a
    checkpoint of the originals' code ending in ``.pt``/``.pth``/``.ckpt``, converted for ``model``
    with its MEND preset), or (``None``) the shipped editor, which is for the bundled model only."""
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
        if path.suffix in ORIGINAL_SUFFIXES:
            return _original_for(model, path)
    stat = path.stat()
    loaded = _load_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
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

    The delta of each weight is -α Σ_t δ̃_t x̃_tᵀ over the positions the editor was trained with
    (``factor_positions``: every position with nonzero input and gradient, or the target tokens),
    so its rank is at most the number of those positions.
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
        factors, nll = collect_factors(model, ed.weights, modules, rows, ed.hparams.factor_positions)
        with torch.no_grad():
            tf = ed.transform(factors)
            deltas = {w.name: ed.weight_delta(w, tf.x[w.name], tf.d[w.name]) for w in ed.weights}
    finally:
        ed.train(was_training)
    for name, delta in deltas.items():
        if not torch.isfinite(delta).all():
            raise EditError(f"MEND produced a non-finite update for {name} on {text!r}")
    n_tokens = int(rows.tgt_id.numel())
    n_factors = {w.name: int(factors.row[w.name].numel()) for w in ed.weights}
    edit = Edit(
        deltas=deltas, method="mend", locus=locus, requests=[request],
        hparams={**ed.hparams.to_dict(), "prepend_bos": bos, "editor_fingerprint": ed.model_fingerprint,
                 "editor": ed.source or ed.label, "editor_sha256": ed.content_hash, "edit_prompt": text},
        info={"n_target_tokens": n_tokens, "n_factor_positions": max(n_factors.values()),
              "factor_positions": ed.hparams.factor_positions, "editor": ed.label[:79],
              "editor_sha256": ed.content_hash, "edit_nll_before": float(nll[0]),
              "alphas": [float(a) for a in ed.alphas.detach()],
              "delta_norms": {n: float(d.norm()) for n, d in deltas.items()}},
        model_fingerprint=model_fingerprint(model),
    )
    with bos_convention(model, bos):
        return record_outcome(model, edit)  # info: reached, p_new; warns when the edit misses
