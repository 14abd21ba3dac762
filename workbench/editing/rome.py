"""ROME: a rank-one update of one layer's MLP output matrix (reference §4).

``rome(model, fact, "Paris")`` returns an *unapplied* :class:`Edit`; apply it with
``edit.apply(model)`` or ``with edit.applied(model): ...``. Computing it never leaves the
model changed: with several layers the intermediate updates are undone in a ``finally``
(from stored copies, so bit-identically) even on errors or interrupts.

Per layer l (original ``rome_main.execute_rome``):

The edited weight, its layout and the key hook come from :mod:`workbench.architecture`
(any supported family); updates are formed key-major [d_mlp, d_model] and stored in the
weight's own layout.

1. k* = the key (``blocks.{l}.mlp.hook_post``) at the fact token of the prompt, averaged
   over the context templates (flat mean, as ``compute_u``).
2. u = C⁻¹ k* if ``mom2_adjustment`` (C from :func:`layer_stats`; solved in float64, the
   originals multiply by ``torch.inverse(C)``), then u /= ‖u‖.
3. v* = v₀ + δ optimised at ``blocks.{l}.hook_mlp_out`` (:func:`common.compute_target`).
4. k, v = key and MLP output at the fact token of the bare prompt;
   ``W_out += u[:, None] * ((v* - v) / (k · u))[None, :]``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from jaxtyping import Float

from ..architecture import mlp_weights
from ..facts import Fact
from ..loading import model_fingerprint
from .common import (EditError, activations_at, check_locus, compute_keys, compute_target, fact_row,
                     follows_bos_convention, normalize_request, request_summary)
from .context import as_groups, context_templates, flatten
from .edit import Edit, reports_outcome
from .hparams import ROMEHyperParams
from .presets import resolve
from .stats import LayerStats, layer_stats, npz_layer_stats

log = logging.getLogger(__name__)


def resolve_templates(model, hp, fingerprint: str) -> list[list[str]]:
    if hp.context_templates is not None:
        return as_groups(hp.context_templates)
    return context_templates(model, hp.context_template_length_params, seed=hp.seed, fingerprint=fingerprint,
                             scheme=hp.context_template_scheme, prepend_bos=hp.prepend_bos)


def resolve_cov(model, layer: int, stats, hp, fingerprint: str) -> tuple[torch.Tensor, dict]:
    """C (float64) for ``layer`` from ``stats`` (LayerStats, tensor, the path of the originals' ``.npz``
    statistics, {layer: ...}) or :func:`layer_stats`."""
    if isinstance(stats, dict):
        stats = stats.get(layer)
    if isinstance(stats, (str, os.PathLike)):
        stats = npz_layer_stats(stats, layer, model)
    if stats is None:
        stats = layer_stats(model, layer, corpus=hp.mom2_dataset, n_tokens=hp.mom2_n_tokens,
                            n_samples=hp.mom2_n_samples, fingerprint=fingerprint)
    if isinstance(stats, LayerStats):
        if stats.layer != layer:
            raise EditError(f"stats are for layer {stats.layer}, the edit is at layer {layer}")
        return stats.mom2.double(), {"corpus": stats.corpus, "n_tokens": stats.n_tokens,
                                     "path": str(stats.path) if stats.path else None}
    if isinstance(stats, torch.Tensor):
        return stats.double(), {"corpus": "given", "n_tokens": None}
    raise TypeError(f"stats must be LayerStats, a tensor or {{layer: ...}}, not {type(stats).__name__}")


def compute_u(model, request: dict, layer: int, templates: list[str], locus: str,
              cov: torch.Tensor | None) -> tuple[Float[torch.Tensor, "d_mlp"], Float[torch.Tensor, "d_mlp"]]:
    """(u, k*): k* the template-averaged key, u = C⁻¹k* (or k*) normalised."""
    k_star = compute_keys(model, layer, [request], [templates], locus, average="flat")[0]
    u = k_star
    if cov is not None:
        u = torch.linalg.solve(cov.to(u.device, torch.float64), u.double()).float()
    return u / u.norm(), k_star


@follows_bos_convention
@reports_outcome
def rome(model, fact: Fact | dict, new_object: str | None = None, *, layer: int | None = None,
         locus: str = "subject", hparams: ROMEHyperParams | dict | None = None,
         stats: LayerStats | torch.Tensor | dict | str | None = None, prepend_bos: bool | None = None,
         preset: str | None = None, verbose: bool = False) -> Edit:
    """Compute a ROME edit making ``fact``'s prompt predict ``new_object`` (default ``fact.target_new``).

    ``fact``: a :class:`Fact` or a CounterFact ``requested_rewrite`` dict. ``layer``
    overrides ``hparams.layers``. ``locus``: ``"subject"`` (the original) or
    ``"relation"`` (keys and δ at the relation's last token). ``hparams``: a
    :class:`ROMEHyperParams` or a dict of fields over the preset (``preset``: a name such as
    ``"rome:gpt2-xl"``; default: the model's, by its identity, :func:`workbench.editing.presets.resolve`).
    ``stats``: covariance to use (a :class:`LayerStats`, a [d_mlp, d_mlp] tensor, the path of an
    original ``.npz`` statistics file or folder, or ``{layer: ...}``); computed and cached with
    :func:`layer_stats` when omitted. ``prepend_bos``: BOS before every prompt
    (default: ``hparams.prepend_bos``, else the model's preset's, else TransformerLens's default;
    recorded in ``edit.hparams``). Returns an unapplied :class:`Edit`.
    """
    check_locus(locus)
    request = normalize_request(fact, new_object)
    hp = resolve("rome", model, preset=preset, hparams=hparams, overrides={"layer": layer}).hparams
    hp.prepend_bos = prepend_bos
    fingerprint = model_fingerprint(model)
    groups = resolve_templates(model, hp, fingerprint)
    flat = flatten(groups)
    fact_row(model, request["prompt"], request["subject"], locus)  # validate the fact token before any work
    fact_row(model, "{} is a", request["subject"], "relation" if locus == "relation_before_subject" else locus)
    if verbose:
        log.info("ROME (%s): %s", locus, request_summary(request))

    deltas: dict[str, torch.Tensor] = {}
    per_layer: list[dict[str, Any]] = []
    layers = sorted(int(l) for l in hp.layers)
    touched: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (param, original copy)
    # every layer's covariance on the unedited model, before any update (a cold cache would
    # otherwise store statistics of the partly edited model under the unedited fingerprint)
    covs = {l: resolve_cov(model, l, stats, hp, fingerprint) if hp.mom2_adjustment else (None, {})
            for l in layers}
    try:
        for layer_ in layers:
            cov, cov_info = covs[layer_]
            u, k_star = compute_u(model, request, layer_, flat, locus, cov)
            mlp = mlp_weights(model, layer_)
            res = compute_target(model, request, mlp.out_hook, templates=flat, locus=locus,
                                 v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr,
                                 v_weight_decay=hp.v_weight_decay, clamp_norm_factor=hp.clamp_norm_factor,
                                 kl_factor=hp.kl_factor, kl_direction=hp.kl_direction)
            bare = fact_row(model, request["prompt"], request["subject"], locus)
            acts = activations_at(model, [bare], [mlp.key_hook, mlp.out_hook])
            k, v = acts[mlp.key_hook][0], acts[mlp.out_hook][0]
            k_dot_u = torch.dot(k, u)
            right = (res.target - v) / k_dot_u
            weight, name = mlp.out_weight, mlp.out_name
            upd = mlp.to_stored(u[:, None] * right[None, :]).to(weight.dtype)
            if not torch.isfinite(upd).all():
                raise EditError(f"non-finite ROME update at layer {layer_} (k·u = {float(k_dot_u):.3g})")
            deltas[name] = deltas[name] + upd if name in deltas else upd
            if layer_ != layers[-1]:  # later layers see this update, as in the originals
                with torch.no_grad():
                    if name not in touched:
                        touched[name] = (weight, weight.detach().clone())
                    weight.add_(upd)
            per_layer.append({"layer": layer_, "weight": name, "fact_token": bare.pos,
                              "fact_token_str": model.tokenizer.decode([bare.ids[bare.pos]]),
                              "k_dot_u": float(k_dot_u), "k_star_norm": float(k_star.norm()),
                              "right_norm": float(right.norm()), "update_norm": float(upd.float().norm()),
                              "v_star": res.summary(), "losses": res.losses, "cov": cov_info})
    finally:
        with torch.no_grad():
            for weight, original in touched.values():
                weight.copy_(original)

    hparams_dict = hp.to_dict()
    return Edit(deltas=deltas, method="rome", locus=locus, requests=[request], hparams=hparams_dict,
                info={"layers": per_layer, "context_templates": flat}, model_fingerprint=fingerprint)
