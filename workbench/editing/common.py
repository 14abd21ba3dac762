"""Shared pieces of ROME and MEMIT: requests, fact-token positions, keys, target vectors.

Fact token (``locus``). Prompts are tokenized as the model sees them (BOS prepended
when the model's config says so, :func:`workbench.spans.tokenize`), and positions count
the BOS. ``locus="subject"`` reads the subject's last token (ROME's ``subject_last``).
``locus="relation"`` reads the *relation's* last token: the last token of the relation
template's own words, i.e. of ``request["prompt"]`` filled in, not counting the subject,
the context prefix or the target tokens appended after it. For the usual templates that
end in relation words (``"{} speaks"``, ``"The mother tongue of {} is"``) this is the
prompt's final token. In the KL "essence" prompt ``"{} is a"`` the relation words are
``" is a"``, so the relation locus reads its final token ``" a"``, whose next-token
distribution is exactly what the KL term is meant to preserve; the subject locus reads
the subject's last token there, as in the originals. ``locus="relation_before_subject"``
reads the last relation token *before* the subject (``" of"`` in ``"The mother tongue of {} is"``),
the paper's other possible reading of "relation token"; that token cannot see the subject,
so an edit keyed there changes the relation for every subject. A template that starts with
the subject has no such token (an :class:`EditError`); the essence prompt ``"{} is a"`` never
has one, so its KL row reads the relation's last token instead.

Rewriting prompts. The originals build ``context.format(prompt) + tok.decode(target_ids[:-1])``
and re-tokenize; here the prompt is tokenized and ``target_ids[:-1]`` are appended as ids,
which is the same sequence whenever re-tokenization does not merge across the boundary
(always for targets with a leading space) and avoids the corner cases where it would.

Batches are right-padded without an attention mask: with causal attention and absolute
positions, every position before a row's padding is computed exactly as unpadded.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float

from ..architecture import key_hook
from ..facts import Fact
from ..predict import object_token_ids
from ..spans import SpanError, subject_span, tokenize

LOCI = ("subject", "relation", "relation_before_subject")
"""Key loci: the token whose key an edit is computed at (reference §7)."""


class EditError(ValueError):
    """A request cannot be edited (bad template, missing target, non-finite optimisation)."""


# ----------------------------------------------------------------------------- requests
def normalize_request(fact: Fact | dict, new_object: str | None = None) -> dict:
    """A CounterFact ``requested_rewrite`` dict from a :class:`Fact` or such a dict, validated.

    ``target_new["str"]`` gets a leading space (as the originals do).
    """
    if isinstance(fact, Fact):
        request = fact.to_request()
        if fact.id not in (None, ""):
            request["case_id"] = fact.id
    elif isinstance(fact, dict):
        request = {k: (dict(v) if isinstance(v, dict) else v) for k, v in fact.items()}
    else:
        raise EditError(f"expected a Fact or a requested_rewrite dict, got {type(fact).__name__}")
    if new_object is not None:
        request["target_new"] = {"str": new_object}
    for key in ("prompt", "subject"):
        if not isinstance(request.get(key), str) or not request[key]:
            raise EditError(f"request needs a non-empty {key!r}: {request}")
    if request["prompt"].count("{}") != 1:
        raise EditError(f"request prompt must contain exactly one '{{}}' for the subject: {request['prompt']!r}")
    target = request.get("target_new")
    target = target.get("str") if isinstance(target, dict) else target
    if not isinstance(target, str) or not target.strip():
        raise EditError(f"request has no new object (target_new): {request}")
    request["target_new"] = {"str": target if target.startswith(" ") else " " + target}
    if isinstance(request.get("target_true"), str):
        request["target_true"] = {"str": request["target_true"]}
    return request


def check_locus(locus: str) -> str:
    if locus not in LOCI:
        raise EditError(f"locus must be one of {LOCI}, got {locus!r}")
    return locus


def follows_bos_convention(method: Callable) -> Callable:
    """Run an editing method under one BOS convention, passed on as ``prepend_bos=<bool>``.

    The choice is the method's ``prepend_bos`` argument, else ``hparams``' ``prepend_bos``
    (a dataclass or dict), else the model's preset's, else the model's default
    (:func:`workbench.editing.hparams.editing_prepend_bos`). Every prompt the method
    tokenizes inside follows it (:func:`workbench.spans.bos_convention`); the method records it.
    """
    from ..spans import bos_convention
    from .presets import editing_prepend_bos

    @functools.wraps(method)
    def run(model, *args: Any, prepend_bos: bool | None = None, hparams: Any = None, **kwargs: Any):
        given = hparams.get("prepend_bos") if isinstance(hparams, dict) else getattr(hparams, "prepend_bos", None)
        bos = editing_prepend_bos(model, prepend_bos, given)
        with bos_convention(model, bos):
            return method(model, *args, prepend_bos=bos, hparams=hparams, **kwargs)

    return run


# ----------------------------------------------------------------------------- positions
@dataclass(frozen=True)
class Row:
    """One input row: token ids and the fact-token position in them."""

    ids: tuple[int, ...]
    pos: int
    text: str


def fact_row(model, template: str, subject: str, locus: str, context: str = "{}",
             suffix_ids: Sequence[int] = ()) -> Row:
    """Tokens of ``context.format(template).format(subject)`` (+ ``suffix_ids``) and the fact token.

    The relation locus takes the last non-subject token inside the ``template`` part,
    never a context-prefix or suffix token.
    """
    if context.count("{}") != 1:
        raise EditError(f"context template must contain exactly one '{{}}': {context!r}")
    prefix, after = context.split("{}")
    full_template = prefix + template + after
    text = full_template.format(subject)
    tokens = tokenize(model, text)
    try:
        subj = subject_span(tokens, subject, full_template)
    except SpanError as err:
        raise EditError(str(err)) from err
    pos = key_position(tokens, subj, locus, (len(prefix), len(prefix) + len(template.format(subject))))
    if pos is None:
        where = "before the subject" if locus == "relation_before_subject" else "besides the subject"
        raise EditError(f"template {template!r} has no relation words {where} {subject!r}")
    return Row(ids=tuple(tokens.ids) + tuple(int(i) for i in suffix_ids), pos=pos, text=text)


def key_position(tokens, subj, locus: str, chars: tuple[int, int] | None = None) -> int | None:
    """Token index of the key ``locus`` in ``tokens`` (``None`` when the prompt has no such token).

    ``subj`` is the subject's span; ``chars`` the character range of the template's own text
    (relation tokens outside it, e.g. a context prefix, never count; default: the whole prompt).
    """
    check_locus(locus)
    if locus == "subject":
        return subj.last
    lo, hi = chars if chars is not None else (0, len(tokens.prompt))
    first = 1 if tokens.has_bos else 0
    cand = [i for i in range(first, len(tokens)) if i not in subj
            and tokens.offsets[i][0] < hi and tokens.offsets[i][1] > lo]
    if locus == "relation_before_subject":
        cand = [i for i in cand if i < subj.first]
    return cand[-1] if cand else None


def locus_position(model, prompt: str, subject: str, locus: str, template: str | None = None) -> int:
    """Token index of the key ``locus`` in ``prompt`` as the model tokenizes it (an :class:`EditError` if none)."""
    tokens = tokenize(model, prompt)
    try:
        subj = subject_span(tokens, subject, template)
    except SpanError as err:
        raise EditError(str(err)) from err
    pos = key_position(tokens, subj, locus)
    if pos is None:
        raise EditError(f"prompt {prompt!r} has no {locus.replace('_', ' ')} token (subject {subject!r})")
    return pos


def _pad_id(model) -> int:
    tok = model.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def pad_rows(model, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, T], fact positions [n] and lengths [n], on the model's device."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), _pad_id(model), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
    dev = model.cfg.device
    return (ids.to(dev), torch.tensor([r.pos for r in rows], device=dev),
            torch.tensor([len(r.ids) for r in rows], device=dev))


@torch.no_grad()
def activations_at(model, rows: Sequence[Row], hook_names: Sequence[str], batch_size: int = 64
                   ) -> dict[str, Float[torch.Tensor, "n d"]]:
    """Each hook's activation at each row's fact token (float32, detached)."""
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hook_names}
    last_layer = max(int(h.split(".")[1]) for h in hook_names)
    stop = last_layer + 1 if last_layer + 1 < model.cfg.n_layers else None
    for i in range(0, len(rows), batch_size):
        ids, pos, _ = pad_rows(model, rows[i : i + batch_size])
        arange = torch.arange(len(pos), device=pos.device)
        store: dict[str, torch.Tensor] = {}

        def make(name: str) -> Callable:
            def hook(x, hook):
                store[name] = x[arange, pos].detach().float()
                return x
            return hook

        model.run_with_hooks(ids, return_type=None, fwd_hooks=[(h, make(h)) for h in hook_names],
                             stop_at_layer=stop)
        for h in hook_names:
            out[h].append(store[h])
    return {h: torch.cat(v) for h, v in out.items()}


def context_rows(model, requests: Sequence[dict], templates: Sequence[str], locus: str) -> list[Row]:
    """Rows for every (request, context template), request-major."""
    return [fact_row(model, r["prompt"], r["subject"], locus, context=c) for r in requests for c in templates]


def compute_keys(model, layer: int, requests: Sequence[dict], groups: Sequence[Sequence[str]], locus: str,
                 average: str = "flat") -> Float[torch.Tensor, "n d_mlp"]:
    """Key at the fact token averaged over context templates, one row per request.

    ``average="flat"``: plain mean over all templates (ROME's ``compute_u``);
    ``"groups"``: mean within each template group, then over groups (MEMIT's ``compute_ks``).
    """
    flat = [t for g in groups for t in g]
    keys = activations_at(model, context_rows(model, requests, flat, locus), [key_hook(layer)])[key_hook(layer)]
    keys = keys.reshape(len(requests), len(flat), -1)
    if average == "flat":
        return keys.mean(1)
    if average != "groups":
        raise ValueError(f"average must be 'flat' or 'groups', got {average!r}")
    sizes = [len(g) for g in groups]
    return torch.stack([chunk.mean(1) for chunk in keys.split(sizes, dim=1)], dim=1).mean(1)


# ----------------------------------------------------------------------------- targets
@dataclass
class TargetResult:
    """The optimised output vector (v* for ROME, z for MEMIT) and its diagnostics."""

    target: Float[torch.Tensor, "d"]
    init: Float[torch.Tensor, "d"]
    delta: Float[torch.Tensor, "d"]
    losses: list[dict]
    steps: int

    def summary(self) -> dict[str, Any]:
        last = self.losses[-1] if self.losses else {}
        return {"steps": self.steps, "loss": last.get("loss"), "nll": last.get("nll"), "kl": last.get("kl"),
                "prob_new": last.get("prob"), "init_norm": float(self.init.norm()),
                "delta_norm": float(self.delta.norm()), "target_norm": float(self.target.norm())}


def compute_target(model, request: dict, hook_name: str, *, templates: Sequence[str], locus: str,
                   v_num_grad_steps: int, v_lr: float, v_weight_decay: float, clamp_norm_factor: float,
                   kl_factor: float, kl_prompts: Sequence[str] = ("{} is a",),
                   kl_direction: str = "original") -> TargetResult:
    """Optimise δ added to ``hook_name`` at the fact token (ROME ``compute_v`` / MEMIT ``compute_z``).

    Loss = mean over rewriting prompts of the mean NLL of the target tokens
    + kl_factor · ``F.kl_div(init_logprobs, cur_logprobs, log_target=True, reduction="batchmean")``
    (the originals' call, i.e. KL(P ‖ P₀) in torch's convention; ``kl_direction="reference"``
    swaps the arguments for KL(P₀ ‖ P) as methods.md §4 writes it) on the essence prompt
    + v_weight_decay · ‖δ‖ / ‖v₀‖². Adam; stop when loss < 0.05 or at the last step
    (before its backward); after each step δ is rescaled to norm ≤ clamp_norm_factor·‖v₀‖.
    v₀ is the unedited activation at the fact token of the first rewriting prompt.
    """
    if kl_direction not in ("original", "reference"):
        raise ValueError(f"kl_direction must be 'original' or 'reference', not {kl_direction!r}")
    target_ids = object_token_ids(model, request["target_new"]["str"])
    n_t = len(target_ids)
    rewrite = [fact_row(model, request["prompt"], request["subject"], locus, context=c, suffix_ids=target_ids[:-1])
               for c in templates]
    kl_locus = "relation" if locus == "relation_before_subject" else locus  # "{} is a" has no such token
    kl = [fact_row(model, p, request["subject"], kl_locus) for p in kl_prompts]
    rows = rewrite + kl
    ids, pos, lengths = pad_rows(model, rows)
    n_rw = len(rewrite)
    dev = ids.device
    # logits at position (len - n_t + j) predict target token j
    tgt_pos = torch.stack([lengths[:n_rw] - n_t + j for j in range(n_t)], dim=1)  # [n_rw, n_t]
    tgt_ids = torch.tensor(target_ids, device=dev).expand(n_rw, n_t)
    rw_arange = torch.arange(n_rw, device=dev)[:, None]
    all_rows = torch.arange(len(rows), device=dev)

    d = int(model.cfg.d_model)
    delta = torch.zeros(d, device=dev, dtype=torch.float32, requires_grad=True)
    init: dict[str, torch.Tensor] = {}

    def hook(x, hook):
        if "v0" not in init:
            init["v0"] = x[0, pos[0]].detach().float().clone()
        return x.index_put((all_rows, pos), delta.to(x.dtype).expand(len(rows), d), accumulate=True)

    opt = torch.optim.Adam([delta], lr=v_lr)
    kl_init = None
    losses: list[dict] = []
    steps = 0
    for it in range(v_num_grad_steps):
        opt.zero_grad()
        logits = model.run_with_hooks(ids, return_type="logits", fwd_hooks=[(hook_name, hook)])
        kl_logp = torch.log_softmax(logits[all_rows[n_rw:], pos[n_rw:]].float(), dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        logp = torch.log_softmax(logits[:n_rw].float(), dim=-1)
        tok_logp = logp[rw_arange, tgt_pos, tgt_ids]  # [n_rw, n_t]
        nll_each = -tok_logp.sum(1) / n_t
        nll = nll_each.mean()
        kl_args = (kl_init, kl_logp) if kl_direction == "original" else (kl_logp, kl_init)
        kl_loss = kl_factor * F.kl_div(*kl_args, log_target=True, reduction="batchmean")
        wd = v_weight_decay * (delta.norm() / init["v0"].norm() ** 2)
        loss = nll + kl_loss + wd
        losses.append({"loss": loss.item(), "nll": nll.item(), "kl": kl_loss.item(), "wd": wd.item(),
                       "prob": torch.exp(-nll_each.detach()).mean().item()})
        if not math.isfinite(losses[-1]["loss"]):
            raise EditError(f"non-finite loss at step {it} while optimising the target for {request['subject']!r}")
        if losses[-1]["loss"] < 5e-2:
            break
        if it == v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        steps += 1
        max_norm = clamp_norm_factor * init["v0"].norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    delta = delta.detach()
    if not torch.isfinite(delta).all():
        raise EditError(f"non-finite target delta for {request['subject']!r}")
    return TargetResult(target=init["v0"] + delta, init=init["v0"], delta=delta, losses=losses, steps=steps)


def request_summary(request: dict) -> str:
    return f"[{request['prompt'].format(request['subject'])}] -> [{request['target_new']['str']}]"
