"""KN: knowledge neurons (Dai et al. 2022) as an editing baseline (reference §6).

``kn-original`` (the default) is the ROME authors' KN baseline (kmeng01/rome ``baselines/kn/kn_main.py``
with ``hparams/KN/gpt2-xl.json``, which runs the ``knowledge_neurons`` package's
``get_refined_neurons`` and ``edit_knowledge``):

1. **Attribution.** On the request prompt ``fact.prompt`` only (``refine=False``), integrated
   gradients over the MLP's hidden units *before* its nonlinearity (the original patches the output
   of ``mlp.c_fc``; here ``blocks.{l}.mlp.hook_pre``, ``activation="pre"``) at the prompt's *last*
   token, whatever the request's phrasing (``attribution_at="last"``): the unit's activation a is
   replaced by alpha * a for alpha on ``linspace(0, 1, steps)`` (20 steps, both ends included) and
   attribution = a * mean over alpha of d P(o_j | prompt) / d(alpha a), with P read at the prompt's last
   position, averaged over every token o_j of the *old* object (``object_tokens="all"``: the original
   scores each object token at that same position, without feeding the earlier ones). Each layer is
   scaled on its own; all (prompt, alpha) rows of a layer form one batch that starts from the clean
   residual stream entering that layer (``start_at_layer``).
2. **Selection.** Units with attribution > ``threshold`` (the original's ``adaptive_threshold``, 0.2)
   x the maximum over all layers and units. The original's ``p`` (0.4) is the *prompt-sharing*
   fraction of Dai et al.'s refining (``refine=True``: the paraphrases are attributed too and a unit
   must be coarse in more than ``prompt_fraction`` of the prompts); with ``refine=False`` it is unused.
   If no unit has a positive attribution, the single largest one is used (``info["fallback"]``).
3. **Edit** (``edit_rule="original"``, ``modify_weights``): for each selected unit (layer l, unit i),
   unit i's value vector (a row of GPT-2's Conv1D ``c_proj`` weight, a column of an ``nn.Linear`` one)
   gets ``-2 E[t] + sum_j E[o*_j]``: t is the model's own top prediction at the request prompt's last
   token, o*_j every token of the new object, E the token embedding ``W_E`` (for families with untied
   embeddings the unembedding ``W_U``, see :func:`embedding_rows`).

Variants (presets, :data:`KN_PRESETS`): ``"kn-subject"`` -- this package's earlier KN, kept as a
named ablation (and a registered evaluation method of its own, ``kn-subject``): attribution of the
units *after* the nonlinearity (``hook_post``) at the request's *locus* token (the subject's last token
for entity requests, the relation's last token for relation requests), only the objects' first tokens,
threshold 0.4, and the edit ``lam * (E[o*] - E[o])`` with lam = 2; ``"kn-calibrated"`` -- ``kn-subject``
with ``lam="auto"``: the smallest lam of ``lam_grid`` that makes the request prompt predict o* (tuned on
the request prompt itself; when none does the edit fails with :class:`KNCalibrationError`).

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
from .presets import HyperParameterError, register_presets, resolve


class KNCalibrationError(RuntimeError):
    """``lam="auto"`` found no lam of the grid that makes the request prompt predict the new object."""


ATTRIBUTION_SITES = ("pre", "post")
ATTRIBUTION_POSITIONS = ("last", "locus")
OBJECT_TOKENS = ("all", "first")
EDIT_RULES = ("original", "difference")


@dataclass
class KNHyperParams:
    """Hyperparameters of :func:`kn` (defaults: the original baseline, see the module docstring)."""

    steps: int = 20
    threshold: float = 0.2  # the originals' adaptive_threshold
    refine: bool = False  # True: attribute the paraphrases too and keep units shared by > prompt_fraction of them
    prompt_fraction: float = 0.4  # the originals' p (only used with refine)
    max_neurons: int | None = None  # None: every unit above the threshold
    max_prompts: int = 8
    attribution_at: str = "last"  # "last": the prompt's last token (original); "locus": the request's locus token
    activation: str = "pre"  # "pre": before the MLP's nonlinearity (original, c_fc's output); "post": hook_post
    object_tokens: str = "all"  # "all": IG averaged over every object token (original); "first"
    edit_rule: str = "original"  # "original": -2 E[top prediction] + sum E[o*_j]; "difference": lam (E[o*] - E[o])
    lam: float | str = 2.0  # the "difference" rule's scale, or "auto" (calibrated)
    lam_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    layers: tuple[int, ...] | None = None  # None: every layer
    batch_size: int = 256
    prepend_bos: bool | None = None  # BOS before every prompt (None: the model's convention)
    preset: str = "kn-original"

    def validate(self) -> "KNHyperParams":
        """Check the choice fields; raises :class:`HyperParameterError`."""
        for name, allowed in (("attribution_at", ATTRIBUTION_POSITIONS), ("activation", ATTRIBUTION_SITES),
                              ("object_tokens", OBJECT_TOKENS), ("edit_rule", EDIT_RULES)):
            if getattr(self, name) not in allowed:
                raise HyperParameterError(f"KNHyperParams.{name} = {getattr(self, name)!r}: choose from {allowed}")
        if not 0 < float(self.threshold) < 1:
            raise HyperParameterError(f"KNHyperParams.threshold = {self.threshold!r}: must be in (0, 1) "
                                      "(a fraction of the largest attribution)")
        if not isinstance(self.steps, int) or self.steps < 2:
            raise HyperParameterError(f"KNHyperParams.steps = {self.steps!r}: must be an integer >= 2")
        if self.edit_rule != "difference" and self.lam != 2.0:
            raise HyperParameterError(f"KNHyperParams.lam = {self.lam!r} scales the 'difference' edit rule; the "
                                      "original rule has no scale (use preset='kn-subject' or edit_rule='difference')")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lam_grid"] = list(self.lam_grid)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


# Source: kmeng01/rome hparams/KN/gpt2-xl.json (adaptive_threshold 0.2, p 0.4, refine false, steps 20,
# batch_size 20; lr_scale and n_toks are not read by baselines/kn/kn_main.py) and
# baselines/kn/knowledge_neurons/knowledge_neurons/knowledge_neurons.py (get_scores_for_layer, modify_weights).
KN_ORIGINAL = KNHyperParams()
KN_SUBJECT = KNHyperParams(threshold=0.4, prompt_fraction=0.5, attribution_at="locus", activation="post",
                           object_tokens="first", edit_rule="difference", preset="kn-subject")
KN_CALIBRATED = replace(KN_SUBJECT, lam="auto", preset="kn-calibrated")
KN_PRESETS: dict[str, KNHyperParams] = {"kn-original": KN_ORIGINAL, "kn-subject": KN_SUBJECT,
                                        "kn-calibrated": KN_CALIBRATED}
"""Named KN settings: the original baseline, the subject-locus ablation, and its calibrated-lam variant."""

# KN's settings do not depend on the model (the originals ship GPT-2 XL's only; GPT-J gets the same).
register_presets("kn", by_model={"gpt2-xl": ("kn-original", KN_ORIGINAL), "gpt-j": ("kn-original", KN_ORIGINAL)},
                 named=dict(KN_PRESETS), generic=lambda model: ("kn-original", KN_ORIGINAL), model_independent=True,
                 sources={"kn-original": "kmeng01/rome hparams/KN/gpt2-xl.json"})
register_presets("kn-subject", named=dict(KN_PRESETS), generic=lambda model: ("kn-subject", KN_SUBJECT),
                 model_independent=True)


def kn_prompts(fact: Fact, max_prompts: int = 8, refine: bool = False) -> list[str]:
    """The prompts KN attributes over: the request prompt; with ``refine`` also its paraphrases."""
    if not refine:
        return [fact.prompt]
    return list(dict.fromkeys((fact.prompt, *fact.paraphrases)))[:max_prompts]


def _site_hook(model, layer: int, activation: str) -> str:
    """The hook of the units KN attributes: before (``"pre"``) or after (``"post"``) the nonlinearity."""
    if activation == "post":
        return key_hook(layer)
    if mlp_weights(model, layer).gated:
        raise HyperParameterError("KN activation='pre' (the original's c_fc output) needs a non-gated MLP; for "
                                  "gated MLPs (Llama, Mistral, Qwen2) use activation='post'")
    return f"blocks.{int(layer)}.mlp.hook_pre"


def integrated_gradients(model, prompts: Sequence[str], subject: str, target_token: int | Sequence[int],
                         locus: str = "subject", steps: int = 20, layers: Sequence[int] | None = None,
                         batch_size: int = 256, *, at: str = "locus", activation: str = "post"
                         ) -> tuple[Float[torch.Tensor, "prompt layer d_mlp"], list[str]]:
    """IG attributions of ``P(target_token)`` at each prompt's last position to every MLP hidden unit.

    The units are read at the locus token (``at="locus"``; prompts in which the locus cannot be
    found are dropped) or at the prompt's last token (``at="last"``), after (``activation="post"``)
    or before (``"pre"``) the MLP's nonlinearity. With several target tokens the attribution is the
    mean of their attributions (each token's probability read at the same last position, as the
    original). Returns the attributions and the prompts kept. Layers outside ``layers`` get zero.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else sorted(set(layers))
    targets = [int(target_token)] if isinstance(target_token, int) else [int(t) for t in target_token]
    kept, ids_list, locus_pos = [], [], []
    for p in prompts:
        tok = tokenize(model, p)
        if at == "last":
            pos = len(tok.ids) - 1
        else:
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
    hooks = {l: _site_hook(model, l, activation) for l in layers}
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else (model.tokenizer.eos_token_id or 0)
    width = max(len(r) for r in ids_list)
    ids = torch.full((len(kept), width), pad, dtype=torch.long)
    for i, r in enumerate(ids_list):
        ids[i, : len(r)] = torch.tensor(r)
    ids = ids.to(device)
    last = torch.tensor([len(r) - 1 for r in ids_list], device=device)
    pos_t = torch.tensor(locus_pos, device=device)
    target_t = torch.tensor(targets, device=device)

    # clean run: activations at the attributed token and the residual stream entering each layer
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
        model.run_with_hooks(ids, fwd_hooks=[(hooks[l], grab(l)) for l in layers]
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
                at_pos = pos_t[p_idx]

                def patch(x, hook):
                    x = x.clone()
                    x[torch.arange(len(chunk), device=device), at_pos] = scaled.to(x.dtype)
                    return x

                logits = model.run_with_hooks(resid[layer][p_idx], start_at_layer=layer,
                                              fwd_hooks=[(hooks[layer], patch)], return_type="logits")
                probs = torch.softmax(logits[torch.arange(len(chunk), device=device), last[p_idx]].float(), dim=-1)
                (grad,) = torch.autograd.grad(probs[:, target_t].mean(dim=1).sum(), scaled)
                grads[p_idx, layer, k_idx] = grad.detach().float()
    return acts * grads.mean(dim=2), kept


def select_neurons(attr: Float[torch.Tensor, "prompt layer d_mlp"], threshold: float = 0.2,
                   prompt_fraction: float = 0.0, max_neurons: int | None = None
                   ) -> tuple[list[tuple[int, int]], bool]:
    """Knowledge neurons from per-prompt attributions: ``([(layer, unit), ...], fallback_used)``.

    Coarse neurons of a prompt: attribution > ``threshold`` x the prompt's maximum (over all layers
    and units). Kept: coarse in more than ``prompt_fraction`` of the prompts (the original's
    ``count > n_prompts * p``; 0: in any); at most ``max_neurons`` (largest mean attribution first;
    ``None``: no cap). None qualifying gives the top unit by mean attribution.
    """
    n_prompts = attr.shape[0]
    peak = attr.flatten(1).max(dim=1).values.clamp_min(0)  # [prompt]
    coarse = attr > threshold * peak[:, None, None]
    coarse &= attr > 0
    counts = coarse.sum(dim=0)  # [layer, d_mlp]
    mean = attr.mean(dim=0)
    chosen = (counts > prompt_fraction * n_prompts) & (counts > 0)
    if not chosen.any():
        flat = int(mean.flatten().argmax())
        return [(flat // attr.shape[2], flat % attr.shape[2])], True
    idx = chosen.nonzero().tolist()
    idx.sort(key=lambda li: -float(mean[li[0], li[1]]))
    return [(int(l), int(i)) for l, i in (idx if max_neurons is None else idx[:max_neurons])], False


def _kn_deltas(model, neurons: list[tuple[int, int]], direction: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """Every selected unit's value vector gets ``lam * direction``."""
    deltas: dict[str, torch.Tensor] = {}
    for layer, unit in neurons:
        mlp = mlp_weights(model, layer)
        name, w = mlp.out_name, mlp.out_weight
        if name not in deltas:
            deltas[name] = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
        mlp.key_major(deltas[name])[unit] += (lam * direction).to(deltas[name].dtype)
    return deltas


def embedding_rows(model, ids: Sequence[int]) -> tuple[Float[torch.Tensor, "n d_model"], str]:
    """The rows E[t] of tokens ``ids`` and which matrix E is: the token embedding ``W_E`` where the model
    ties it to the unembedding (GPT-2, as the original's ``transformer.wte``), else the unembedding
    ``W_U`` (GPT-J, GPT-NeoX, Llama...), whose columns are the directions that raise a token's logit."""
    idx = torch.tensor(list(ids), device=model.W_E.device)
    if getattr(hf_model(model).config, "tie_word_embeddings", False):
        return model.W_E.detach()[idx].float(), "W_E (token embedding)"
    return model.W_U.detach()[:, idx].T.float(), "W_U (unembedding; embeddings untied)"


def object_direction(model, new_tok: int, old_tok: int) -> tuple[Float[torch.Tensor, "d_model"], str]:
    """E[o*] - E[o] (the ``"difference"`` rule), E as in :func:`embedding_rows`."""
    rows, which = embedding_rows(model, [new_tok, old_tok])
    return rows[0] - rows[1], which


def original_direction(model, prompt: str, new_ids: Sequence[int]) -> tuple[Float[torch.Tensor, "d_model"], int, str]:
    """The original edit's change of every selected unit's value vector, ``-2 E[t] + sum_j E[o*_j]``
    (``modify_weights``: t is the model's top prediction at the prompt's last token), with t."""
    from ..predict import next_token_probs

    top = int(next_token_probs(model, [prompt])[0].argmax())
    rows, which = embedding_rows(model, [top, *new_ids])
    return -2 * rows[0] + rows[1:].sum(dim=0), top, which


@follows_bos_convention
@reports_outcome
def kn(model, fact: Fact, new_object: str | None = None, *, locus: str = "subject",
       prompts: Sequence[str] | None = None, hparams: KNHyperParams | dict | None = None,
       preset: str | None = None, prepend_bos: bool | None = None, **overrides: Any) -> Edit:
    """Edit ``fact`` by changing its knowledge neurons' value vectors (see the module docstring).

    Args:
        fact: the fact (``target_true`` is o, ``new_object``/``target_new`` is o*).
        locus: one of :data:`~workbench.editing.common.LOCI`: recorded, and the attributed token when
            ``attribution_at="locus"`` (the ``kn-subject`` ablation).
        prompts: prompts to attribute over (default :func:`kn_prompts`: the request prompt).
        hparams: :class:`KNHyperParams` or a dict of its fields; ``overrides`` change single fields.
        preset: a name of :data:`KN_PRESETS` to start from (default ``"kn-original"``).
        prepend_bos: BOS before every prompt (default: ``hparams.prepend_bos``, else the model's
            convention, :func:`workbench.editing.hparams.editing_prepend_bos`); recorded in ``hparams``.

    Raises:
        KNCalibrationError: ``lam="auto"`` and no lam of the grid makes the request predict o*.

    Returns:
        An :class:`Edit` (method ``"kn"``); ``info`` lists the neurons, their attributions and the rule.
    """
    hp = resolve("kn", model, preset=preset, hparams=hparams, overrides=overrides).hparams
    hp = replace(hp, prepend_bos=prepend_bos)
    check_locus(locus)
    new = new_object if new_object is not None else fact.target_new
    if not new:
        raise ValueError(f"fact {fact.id} ({fact.prompt!r}) has no new object")
    old_ids = object_token_ids(model, fact.target_true)
    new_ids = object_token_ids(model, new)
    if old_ids[0] == new_ids[0] and hp.edit_rule == "difference":
        raise ValueError(f"KN needs different first tokens for {fact.target_true!r} and {new!r}")
    if old_ids == new_ids:
        raise ValueError(f"the new object {new!r} is the old one")
    targets = old_ids if hp.object_tokens == "all" else old_ids[:1]
    prompt_list = list(prompts) if prompts is not None else kn_prompts(fact, hp.max_prompts, hp.refine)
    attr, kept = integrated_gradients(model, prompt_list, fact.subject, targets, locus, hp.steps, hp.layers,
                                      hp.batch_size, at=hp.attribution_at, activation=hp.activation)
    neurons, fallback = select_neurons(attr, hp.threshold, hp.prompt_fraction if hp.refine else 0.0,
                                       hp.max_neurons)
    info: dict[str, Any] = {}
    if hp.edit_rule == "original":
        direction, top, embedding = original_direction(model, fact.prompt, new_ids)
        lam: float | None = 1.0
        tried: list[float] = []
        info["top_prediction"] = model.tokenizer.decode([top])
    else:
        direction, embedding = object_direction(model, new_ids[0], old_ids[0])
        lam, tried = _calibrate(model, fact, new, neurons, direction, hp)
    mean_attr = attr.mean(dim=0)
    return Edit(
        deltas=_kn_deltas(model, neurons, direction, float(lam)),
        method="kn", locus=locus, requests=[fact.with_new(new).to_request()],
        hparams=hp.to_dict(),
        info={"neurons": [list(n) for n in neurons], "n_neurons": len(neurons), "fallback": fallback,
              "attribution": [float(mean_attr[l, i]) for l, i in neurons], "lam": float(lam),
              "lam_tried": tried, "prompts": kept, "embedding": embedding, "edit_rule": hp.edit_rule, **info},
        model_fingerprint=model_fingerprint(model),
    )


def _calibrate(model, fact: Fact, new: str, neurons, direction, hp: KNHyperParams) -> tuple[float, list[float]]:
    """The ``difference`` rule's lam: ``hp.lam``, or with ``"auto"`` the smallest of ``hp.lam_grid`` that
    makes the request prompt predict ``new``."""
    lam = hp.lam
    tried: list[float] = []
    if lam == "auto":
        from ..predict import score_objects

        for candidate in hp.lam_grid:
            tried.append(float(candidate))
            trial = Edit(deltas=_kn_deltas(model, neurons, direction, float(candidate)), method="kn")
            with trial.applied(model):
                if score_objects(model, [(fact.prompt, new)])[0].correct:
                    return float(candidate), tried
        raise KNCalibrationError(f"no lam of {list(hp.lam_grid)} makes {fact.prompt!r} predict {new!r} "
                                 f"({len(neurons)} neurons); the edit is not applied")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool):
        raise ValueError(f"lam must be a number or 'auto', not {lam!r}")
    return float(lam), tried


def kn_subject(model, fact: Fact, new_object: str | None = None, *, locus: str = "subject",
               hparams: KNHyperParams | dict | None = None, preset: str | None = None,
               prepend_bos: bool | None = None, **overrides: Any) -> Edit:
    """:func:`kn` with the ``kn-subject`` ablation's settings (attribution at the request's locus token,
    after the nonlinearity, first object tokens, ``2 (E[o*] - E[o])``): the evaluation's ``kn-subject`` rows."""
    return kn(model, fact, new_object, locus=locus, hparams=hparams, preset=preset or "kn-subject",
              prepend_bos=prepend_bos, **overrides)
