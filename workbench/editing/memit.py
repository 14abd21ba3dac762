"""MEMIT: many facts at once, spread over the MLPs of several layers R (reference §5).

``memit(model, facts)`` returns one *unapplied* :class:`Edit` with a delta per layer of R.
The layer-by-layer algorithm needs each update in place before the next layer's keys
are read; those temporary changes are undone in a ``finally`` from stored copies, so the
model is bit-identical afterwards even when something fails (or is interrupted) midway.

Following ``memit/memit_main.execute_memit``:

1. z_i = target output of block R[-1] (``hook_resid_post``) at the fact token of fact i,
   optimised like ROME's v* (clamp_norm_factor 0.75 in the presets).
2. For l in R (i-th): K = keys at layer l, averaged per context-template group then over
   groups [d_mlp, n]; cur = ``blocks.{R[-1]}.hook_resid_post`` at the fact token of the bare
   prompts; resid = (z - cur) / (len(R) - i); Δ = resid Kᵀ (λ C + K Kᵀ)⁻¹ in float64
   (``torch.linalg.solve``), λ = ``mom2_update_weight``; ``W_out[l] = W_out[l]₀ + Δᵀ`` before
   the next layer.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..architecture import mlp_weights
from ..facts import Fact
from ..loading import model_fingerprint
from .common import (EditError, activations_at, check_locus, compute_keys, compute_target, fact_row,
                     follows_bos_convention, normalize_request)
from .context import flatten
from .edit import Edit, reports_outcome
from .hparams import HyperParameterError, MEMITHyperParams
from .presets import resolve
from .rome import resolve_cov, resolve_templates
from .stats import LayerStats

log = logging.getLogger(__name__)


@follows_bos_convention
@reports_outcome
def memit(model, facts: Sequence[Fact | dict], *, layers: Sequence[int] | None = None, locus: str = "subject",
          hparams: MEMITHyperParams | dict | None = None, stats: dict | LayerStats | str | None = None,
          prepend_bos: bool | None = None, preset: str | None = None, verbose: bool = False,
          progress: bool = True) -> Edit:
    """Compute one MEMIT edit for all ``facts`` (each needs a ``target_new``).

    ``layers`` overrides ``hparams.layers``; ``locus`` is one of :data:`~workbench.editing.common.LOCI`;
    ``hparams``/``preset`` as in :func:`workbench.editing.rome.rome`;
    ``stats``: ``{layer: LayerStats | tensor}`` (computed with :func:`layer_stats` for
    the missing layers) or the path of the originals' ``.npz`` statistics (a folder, or a file for one layer); ``prepend_bos`` as in :func:`workbench.editing.rome.rome`. Returns an
    unapplied :class:`Edit`.
    """
    check_locus(locus)
    if isinstance(facts, (Fact, dict)):
        facts = [facts]
    if not facts:
        raise EditError("memit needs at least one fact")
    requests = [normalize_request(f) for f in facts]
    if layers is not None and len(list(layers)) == 0:
        raise HyperParameterError("memit(layers=[]) names no layer to edit; give at least one layer index, or "
                                  "leave layers out for the preset's")
    hp = resolve("memit", model, preset=preset, hparams=hparams,
                 overrides={"layers": list(layers) if layers else None}).hparams
    hp.prepend_bos = prepend_bos
    if isinstance(stats, (LayerStats, torch.Tensor)):  # a path (the originals' .npz) serves every layer
        if len(hp.layers) != 1:
            raise EditError("pass stats as {layer: LayerStats} for several layers")
        stats = {hp.layers[0]: stats}
    fingerprint = model_fingerprint(model)
    groups = resolve_templates(model, hp, fingerprint)
    flat = flatten(groups)
    bare = [fact_row(model, r["prompt"], r["subject"], locus) for r in requests]  # validates every request
    for r in requests:
        fact_row(model, "{} is a", r["subject"], "relation" if locus == "relation_before_subject" else locus)
    R = [int(l) for l in hp.layers]
    z_layer = R[-1]
    z_hook = f"blocks.{z_layer}.hook_resid_post"
    covs = {l: resolve_cov(model, l, stats, hp, fingerprint) for l in R}  # before any weight changes

    from ..progress import progress_bar

    zs, z_info = [], []
    for r in progress_bar(requests, desc="MEMIT z", enabled=progress, leave=False):
        res = compute_target(model, r, z_hook, templates=flat, locus=locus, v_num_grad_steps=hp.v_num_grad_steps,
                             v_lr=hp.v_lr, v_weight_decay=hp.v_weight_decay,
                             clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor,
                             kl_direction=hp.kl_direction)
        zs.append(res.target)
        z_info.append(res.summary())
    zs_t = torch.stack(zs, dim=1)  # [d, n]

    deltas: dict[str, torch.Tensor] = {}
    per_layer: list[dict[str, Any]] = []
    touched: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for i, layer in enumerate(R):
            keys = compute_keys(model, layer, requests, groups, locus, average="groups").T  # [d_mlp, n]
            cur = activations_at(model, bare, [z_hook])[z_hook].T  # [d, n]
            targets = zs_t - cur
            cov, cov_info = covs[layer]
            K, T = keys.double(), targets.double()
            adj_k = torch.linalg.solve(hp.mom2_update_weight * cov.to(K.device) + K @ K.T, K)
            resid = T / (len(R) - i)
            upd = resid @ adj_k.T  # [d, d_mlp]
            mlp = mlp_weights(model, layer)
            weight, name = mlp.out_weight, mlp.out_name
            upd = mlp.to_stored(upd.T).to(weight.dtype)
            if not torch.isfinite(upd).all():
                raise EditError(f"non-finite MEMIT update at layer {layer}")
            with torch.no_grad():
                if name not in touched:
                    touched[name] = (weight, weight.detach().clone())
                weight.copy_(touched[name][1] + upd)
            deltas[name] = upd.detach().clone()
            per_layer.append({"layer": layer, "weight": name, "z_error": float(targets.norm(dim=0).mean()),
                              "update_norm": float(upd.float().norm()), "cov": cov_info})
            if verbose:
                log.info("MEMIT layer %d: z error %.3f, update norm %.3f", layer, per_layer[-1]["z_error"],
                         per_layer[-1]["update_norm"])
    finally:
        with torch.no_grad():
            for weight, original in touched.values():
                weight.copy_(original)

    return Edit(deltas=deltas, method="memit", locus=locus, requests=requests, hparams=hp.to_dict(),
                info={"layers": per_layer, "z": z_info, "context_templates": flat}, model_fingerprint=fingerprint)
