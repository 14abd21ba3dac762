"""KN: knowledge neurons (Dai et al. 2022) as an editing baseline (reference §6), as the original.

1. **Attribution.** On the request prompt ``fact.prompt`` only (the original baseline's
   ``refine=False``; :func:`workbench.evaluation.evaluate` passes a request that carries no other
   prompt), integrated gradients over the MLP hidden units ``blocks.{l}.mlp.hook_post`` at the
   *locus token* (:func:`~workbench.editing.common.key_position`: the subject's last token, the
   relation's last token, or the last relation token before the subject): the unit's
   activation a is replaced by alpha * a for alpha on the grid ``linspace(0, 1, m)`` (m =
   ``steps`` = 20, both ends included, as the ``knowledge_neurons`` package), and attribution =
   a * mean over alpha of d P(o | prompt) / d(alpha a), where o is the *old* object's first token,
   predicted at the prompt's last token. Each layer is scaled on its own (the others run
   normally); all (prompt, alpha) rows of a layer form one batch that starts from the clean
   residual stream entering that layer (``start_at_layer``), so all layers take L batched passes.
2. **Selection.** The units with attribution > ``threshold`` (0.4) x the maximum (over all
   layers) are the knowledge neurons (at most ``max_neurons`` if set, largest first). With
   ``refine=True`` (Dai et al.'s refining, not the baseline) the paraphrases are attributed too
   and a unit must pass in at least ``prompt_fraction`` of the prompts. If none qualifies, the
   single unit with the largest mean attribution is used (``info["fallback"]``).
3. **Edit.** For each selected unit (layer l, unit i): ``W_out[l][i, :] += lam * (E[o*] - E[o])``
   (unit i's value vector: a row of GPT-2's Conv1D weight, a column of an ``nn.Linear`` one)
   with E the token embedding (``W_E``) rows of the objects' first tokens (GPT-2 ties embedding
   and unembedding; for families with untied embeddings E is the unembedding ``W_U``, see
   :func:`object_direction`), lam = 2 (the ``knowledge_neurons`` package's fixed value, which
   EasyEdit's KN uses).

``lam="auto"`` is an optional *calibrated* variant: the smallest lam of ``lam_grid`` that makes
the request prompt predict o* (teacher-forced, all tokens). It is tuned on the request prompt
itself, and when no lam of the grid flips it the edit fails with :class:`KNCalibrationError`
(an evaluation records it as a failed edit); it is never applied at the largest lam.

Presets (:data:`KN_PRESETS`): ``"kn-original"`` (the defaults) and ``"kn-calibrated"`` (``lam="auto"``).
The edit is an :class:`Edit` (method ``"kn"``) with one delta per touched layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
from jaxtyping import Float

from ..architecture import key_hook, mlp_weights
from ..facts import Fact
from ..loading import hf_model, model_fingerprint
from ..predict import object_token_ids
from ..spans import SpanError, subject_span, tokenize
from .common import check_locus, follows_bos_convention, key_position
from .edit import Edit, reports_outcome


class KNCalibrationError(RuntimeError):
    """``lam="auto"`` found no lam of the grid that makes the request prompt predict the new object."""


@dataclass
class KNHyperParams:
    """Hyperparameters of :func:`kn` (defaults: the original baseline, see the module docstring)."""

    steps: int = 20
    threshold: float = 0.4
    refine: bool = False  # True: attribute the paraphrases too and keep units shared by prompt_fraction of them
    prompt_fraction: float = 0.5
    max_neurons: int | None = None  # None: every unit above the threshold
    max_prompts: int = 8
    lam: float | str = 2.0
    lam_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    layers: tuple[int, ...] | None = None  # None: every layer
    batch_size: int = 256
    prepend_bos: bool | None = None  # BOS before every prompt (None: the model's convention)
    preset: str = "kn-original"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lam_grid"] = list(self.lam_grid)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


KN_PRESETS: dict[str, KNHyperParams] = {
    "kn-original": KNHyperParams(),
    "kn-calibrated": KNHyperParams(lam="auto", preset="kn-calibrated"),
}
"""Named KN settings: the original baseline, and the calibrated-lam variant."""


def kn_prompts(fact: Fact, max_prompts: int = 8, refine: bool = False) -> list[str]:
    """The prompts KN attributes over: the request prompt; with ``refine`` also its paraphrases."""
    if not refine:
        return [fact.prompt]
    return list(dict.fromkeys((fact.prompt, *fact.paraphrases)))[:max_prompts]


def integrated_gradients(model, prompts: Sequence[str], subject: str, target_token: int, locus: str = "subject",
                         steps: int = 20, layers: Sequence[int] | None = None, batch_size: int = 256
                         ) -> tuple[Float[torch.Tensor, "prompt layer d_mlp"], list[str]]:
    """IG attributions of ``P(target_token)`` to every MLP hidden unit at the locus token.

    Returns the attributions (prompts in which the locus could not be found are dropped)
    and the prompts kept. Layers outside ``layers`` get zero attribution.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else sorted(set(layers))
    kept, ids_list, locus_pos = [], [], []
    for p in prompts:
        tok = tokenize(model, p)
        try:
            pos = key_position(tok, subject_span(tok, subject), locus)
        except SpanError:
            continue
        if pos is None:
            continue
        kept.append(p)
        ids_list.append(list(tok.ids))
        locus_pos.append(pos)
    if not kept:
        raise SpanError(f"the subject {subject!r} (or its {locus} token) was found in none of the KN prompts "
                        f"{list(prompts)!r}")
    device = model.cfg.device
    n_layers, d_mlp = model.cfg.n_layers, mlp_weights(model, 0).d_mlp
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else (model.tokenizer.eos_token_id or 0)
    width = max(len(r) for r in ids_list)
    ids = torch.full((len(kept), width), pad, dtype=torch.long)
    for i, r in enumerate(ids_list):
        ids[i, : len(r)] = torch.tensor(r)
    ids = ids.to(device)
    last = torch.tensor([len(r) - 1 for r in ids_list], device=device)
    pos_t = torch.tensor(locus_pos, device=device)

    # clean run: activations at the locus token and the residual stream entering each layer
    acts = torch.zeros(len(kept), n_layers, d_mlp, device=device)
    resid: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(x, hook):
            acts[:, layer] = x[torch.arange(len(kept), device=device), pos_t].detach().float()
            return x
        return hook

    def grab_resid(layer: int):
        def hook(x, hook):
            resid[layer] = x.detach()
            return x
        return hook

    with torch.no_grad():
        model.run_with_hooks(ids, fwd_hooks=[(key_hook(l), grab(l)) for l in layers]
                             + [(f"blocks.{l}.hook_resid_pre", grab_resid(l)) for l in layers], return_type=None)

    # rows (prompt, alpha) per layer; a row that scales layer l starts from the clean residual
    # stream entering l (start_at_layer), since nothing before l differs from the clean run
    alphas = torch.linspace(0.0, 1.0, steps, device=device, dtype=torch.float32)  # both ends, as the original
    rows = [(p, k) for p in range(len(kept)) for k in range(steps)]
    grads = torch.zeros(len(kept), n_layers, steps, d_mlp, device=device)
    with torch.enable_grad():
        for layer in layers:
            for b in range(0, len(rows), batch_size):
                chunk = rows[b : b + batch_size]
                p_idx = torch.tensor([r[0] for r in chunk], device=device)
                k_idx = torch.tensor([r[1] for r in chunk], device=device)
                scaled = (alphas[k_idx, None] * acts[p_idx, layer]).requires_grad_(True)  # [rows, d_mlp]
                at = pos_t[p_idx]

                def patch(x, hook):
                    x = x.clone()
                    x[torch.arange(len(chunk), device=device), at] = scaled.to(x.dtype)
                    return x

                logits = model.run_with_hooks(resid[layer][p_idx], start_at_layer=layer,
                                              fwd_hooks=[(key_hook(layer), patch)],
                                              return_type="logits")
                probs = torch.softmax(logits[torch.arange(len(chunk), device=device), last[p_idx]].float(), dim=-1)
                (grad,) = torch.autograd.grad(probs[:, target_token].sum(), scaled)
                grads[p_idx, layer, k_idx] = grad.detach().float()
    return acts * grads.mean(dim=2), kept


def select_neurons(attr: Float[torch.Tensor, "prompt layer d_mlp"], threshold: float = 0.4,
                   prompt_fraction: float = 0.5, max_neurons: int | None = None
                   ) -> tuple[list[tuple[int, int]], bool]:
    """Knowledge neurons from per-prompt attributions: ``([(layer, unit), ...], fallback_used)``.

    Coarse neurons of a prompt: attribution > ``threshold`` x the prompt's maximum. Kept:
    coarse in at least ``prompt_fraction`` of the prompts; at most ``max_neurons`` (largest
    mean attribution first; ``None``: no cap). None qualifying gives the top unit by mean attribution.
    """
    n_prompts = attr.shape[0]
    peak = attr.flatten(1).max(dim=1).values.clamp_min(0)  # [prompt]
    coarse = attr > threshold * peak[:, None, None]
    coarse &= attr > 0
    counts = coarse.sum(dim=0)  # [layer, d_mlp]
    need = prompt_fraction * n_prompts
    mean = attr.mean(dim=0)
    chosen = (counts >= need) & (counts > 0)
    if not chosen.any():
        flat = int(mean.flatten().argmax())
        return [(flat // attr.shape[2], flat % attr.shape[2])], True
    idx = chosen.nonzero().tolist()
    idx.sort(key=lambda li: -float(mean[li[0], li[1]]))
    return [(int(l), int(i)) for l, i in (idx if max_neurons is None else idx[:max_neurons])], False


def _kn_deltas(model, neurons: list[tuple[int, int]], direction: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    deltas: dict[str, torch.Tensor] = {}
    for layer, unit in neurons:
        mlp = mlp_weights(model, layer)
        name, w = mlp.out_name, mlp.out_weight
        if name not in deltas:
            deltas[name] = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
        mlp.key_major(deltas[name])[unit] += (lam * direction).to(deltas[name].dtype)
    return deltas


def object_direction(model, new_tok: int, old_tok: int) -> tuple[Float[torch.Tensor, "d_model"], str]:
    """E[o*] - E[o] and which matrix E is: the token embedding ``W_E`` where the model ties it to
    the unembedding (GPT-2, as the original), else the unembedding ``W_U`` (GPT-J, GPT-NeoX,
    Llama...), whose columns are the directions that raise a token's logit."""
    if getattr(hf_model(model).config, "tie_word_embeddings", False):
        W_E = model.W_E.detach()
        return (W_E[new_tok] - W_E[old_tok]).float(), "W_E (token embedding)"
    W_U = model.W_U.detach()
    return (W_U[:, new_tok] - W_U[:, old_tok]).float(), "W_U (unembedding; embeddings untied)"


@follows_bos_convention
@reports_outcome
def kn(model, fact: Fact, new_object: str | None = None, *, locus: str = "subject",
       prompts: Sequence[str] | None = None, hparams: KNHyperParams | dict | None = None,
       preset: str | None = None, prepend_bos: bool | None = None, **overrides: Any) -> Edit:
    """Edit ``fact`` by moving its knowledge neurons' value vectors from o to o*.

    Args:
        fact: the fact (``target_true`` is o, ``new_object``/``target_new`` is o*).
        locus: one of :data:`~workbench.editing.common.LOCI`: the token whose hidden units are attributed.
        prompts: prompts to attribute over (default :func:`kn_prompts`: the request prompt).
        hparams: :class:`KNHyperParams` or a dict of its fields; ``overrides`` change single fields.
        preset: a name of :data:`KN_PRESETS` to start from (default ``"kn-original"``).

    Raises:
        KNCalibrationError: ``lam="auto"`` and no lam of the grid makes the request predict o*.
        prepend_bos: BOS before every prompt (default: ``hparams.prepend_bos``, else the model's
            convention, :func:`workbench.editing.hparams.editing_prepend_bos`); recorded in ``hparams``.

    Returns:
        An :class:`Edit` (method ``"kn"``); ``info`` lists the neurons, their attributions and lam.
    """
    if preset is not None and preset not in KN_PRESETS:
        raise ValueError(f"unknown KN preset {preset!r}; choose from {sorted(KN_PRESETS)}")
    base = KN_PRESETS[preset or "kn-original"]
    hp = hparams if isinstance(hparams, KNHyperParams) else replace(base, **(hparams or {}))
    hp = replace(hp, **overrides)
    hp = replace(hp, prepend_bos=prepend_bos)
    check_locus(locus)
    new = new_object if new_object is not None else fact.target_new
    if not new:
        raise ValueError(f"fact {fact.id} ({fact.prompt!r}) has no new object")
    old_tok = object_token_ids(model, fact.target_true)[0]
    new_tok = object_token_ids(model, new)[0]
    if old_tok == new_tok:
        raise ValueError(f"KN needs different first tokens for {fact.target_true!r} and {new!r}")
    prompt_list = list(prompts) if prompts is not None else kn_prompts(fact, hp.max_prompts, hp.refine)
    attr, kept = integrated_gradients(model, prompt_list, fact.subject, old_tok, locus, hp.steps, hp.layers,
                                      hp.batch_size)
    neurons, fallback = select_neurons(attr, hp.threshold, hp.prompt_fraction if hp.refine else 0.0,
                                       hp.max_neurons)
    direction, embedding = object_direction(model, new_tok, old_tok)

    lam = hp.lam
    tried: list[float] = []
    if lam == "auto":
        from ..predict import score_objects

        lam = None
        for candidate in hp.lam_grid:
            tried.append(float(candidate))
            trial = Edit(deltas=_kn_deltas(model, neurons, direction, float(candidate)), method="kn")
            with trial.applied(model):
                if score_objects(model, [(fact.prompt, new)])[0].correct:
                    lam = float(candidate)
                    break
        if lam is None:
            raise KNCalibrationError(f"no lam of {list(hp.lam_grid)} makes {fact.prompt!r} predict {new!r} "
                                     f"({len(neurons)} neurons); the edit is not applied")
    elif not isinstance(lam, (int, float)):
        raise ValueError(f"lam must be a number or 'auto', not {lam!r}")
    mean_attr = attr.mean(dim=0)
    return Edit(
        deltas=_kn_deltas(model, neurons, direction, float(lam)),
        method="kn", locus=locus, requests=[fact.with_new(new).to_request()],
        hparams=hp.to_dict(),
        info={"neurons": [list(n) for n in neurons], "n_neurons": len(neurons), "fallback": fallback,
              "attribution": [float(mean_attr[l, i]) for l, i in neurons], "lam": float(lam),
              "lam_tried": tried, "prompts": kept, "embedding": embedding},
        model_fingerprint=model_fingerprint(model),
    )
