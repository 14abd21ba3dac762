"""Evaluating edits from both request perspectives: probe families, bleed, intervals, the paper's tables.

The protocol (reference §7) separates three things, and every row and table names each:

* **request perspective** -- how the edit is posed: ``"entity"`` = the fact phrased
  subject-first, ``"relation"`` = phrased relation-first (:mod:`workbench.perspective`).
  Every method receives that request (a fact carrying no other prompt), FT and KN included.
* **key locus** -- where token-keyed methods (ROME, MEMIT, KN's attribution; FT with
  ``positions="locus"``) read their key: ``"subject"`` (last subject token), ``"relation"``
  (last relation token), ``"relation_before_subject"`` (last relation token before the
  subject). The paper's pairing, :data:`~workbench.perspective.DEFAULT_LOCUS`, is entity <->
  subject and relation <-> relation; ``loci=`` gives any other pairing (the full cube).
* **probe families** scored on the edited model, per fact:

  - ``entity`` / ``relation``: the entity-phrased and relation-phrased families (the paper's
    "Entity Knowledge" and "Relation Knowledge" columns). Each family's first prompt is its
    perspective's request, so *reliability* of the request's own family is the edit prompt
    itself and *generality* the family's other phrasings;
  - ``request`` / ``transfer``: the same numbers seen from the request: the request family's
    reliability and generality, and the other family's (*transfer*) reliability and generality;
  - ``bleed``: other subjects of the relation (``bleed_subjects`` of them, both request
    phrasings) that now predict o*. An edit keyed where every subject of the relation
    passes changes them all; high transfer with high bleed is not specific knowledge;
  - ``locality``: the fact's neighbourhood prompts keep their own answers.

Every metric comes in three variants (the suffix says which), as fractions per row and in
percent in the summaries:

* ``_acc``: teacher-forced accuracy, all tokens: the prompt followed by the object's tokens
  but the last; correct only if the argmax is the object's token at *every* object position;
* ``_tok``: teacher-forced per-token accuracy, the mean over the object's tokens (EasyEdit's
  definition);
* ``_score``: CounterFact's score, P(o*) > P(o) by mean token log-probability; for bleed
  P(o*) > P(that subject's own object); for locality P(answer) > P(o*) (a neighbour whose
  answer *is* o* has no such comparison and is left out of the score, not of the accuracy).

Per fact, generality, bleed and locality are means over that fact's prompts; a cell (method,
request, locus) reports the mean over facts with its number of edits ``n`` and a 95%
percentile-bootstrap interval over facts (:func:`bootstrap_ci`). An edit that fails (an
error, or a KN calibration that finds no λ) is recorded as failed: counted in the cell's
``failed`` column and left out of its means. The *unedited* rows score the unedited model on
each perspective's probes with the same targets (how often o* is already there).

One edit's work is the pure function :func:`evaluate_one` (model, fact, method, request,
locus, probes -> row dict); :func:`evaluate` is the loop around it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .facts import Fact, facts_hash
from .perspective import (DEFAULT_LOCUS, PERSPECTIVES, Phrasings, Probes, bleed_subjects, phrasings, probes,
                          relation_index, relation_templates, request_fact)
from .predict import object_token_ids
from .spans import tokenize

__all__ = ["BASELINE", "METHODS", "PAPER_ORDER", "METRICS", "VARIANTS", "evaluate", "evaluate_one",
           "score_probes", "score_objects", "summarize", "bootstrap_ci", "paper_table", "cube_table",
           "write_tables", "to_markdown", "register_method", "resolve_method", "select_facts", "probes",
           "relation_templates", "cells_for"]

VARIANTS = ("acc", "tok", "score")
"""Metric variants: all-tokens accuracy, per-token accuracy, CounterFact score."""

METRICS: tuple[tuple[str, str], ...] = (
    ("entity", "reliability"), ("entity", "generality"), ("relation", "reliability"), ("relation", "generality"),
    ("request", "reliability"), ("request", "generality"), ("transfer", "reliability"), ("transfer", "generality"),
    ("bleed", "bleed"), ("locality", "locality"),
)
"""(family, measure) pairs; a row's column is ``f"{family}_{measure}_{variant}"``."""

BASELINE = "unedited"
"""Method name of the baseline rows (the unedited model), whose locus is ``"-"``."""

METHODS: dict[str, str] = {
    "ft": "workbench.editing.ft:ft",
    "kn": "workbench.editing.kn:kn",
    "mend": "workbench.editing.mend:mend",
    "rome": "workbench.editing.rome:rome",
    "memit": "workbench.editing.memit:memit",
}
"""The method registry: name -> ``"module:function"`` (imported lazily); :func:`register_method` adds one."""

BATCH_METHODS: set[str] = {"memit"}
"""Registered methods that take a list of facts (they get a one-fact batch: one fact per edit)."""

PAPER_ORDER = ("ft", "kn", "mend", "rome", "memit")
"""The paper's row order; :func:`default_methods` is the registered ones in this order."""

METHOD_LABELS = {"ft": "FT", "kn": "KN", "rome": "ROME", "memit": "MEMIT", "mend": "MEND", BASELINE: "Unedited"}


def register_method(name: str, target: str | Callable, *, batch: bool = False, label: str | None = None) -> None:
    """Add an editing method to the registry: ``target`` is ``"module:function"`` or the function.

    The function is called ``f(model, fact, locus=..., **kwargs) -> Edit`` (``locus`` only if it
    accepts one), or with ``[fact]`` when ``batch``.
    """
    METHODS[name] = target  # type: ignore[assignment]
    if batch:
        BATCH_METHODS.add(name)
    if label:
        METHOD_LABELS[name] = label


def default_methods() -> tuple[str, ...]:
    """The registered methods in the paper's order (FT, KN, MEND, ROME, MEMIT), then any others."""
    return tuple(m for m in PAPER_ORDER if m in METHODS) + tuple(m for m in METHODS if m not in PAPER_ORDER)


def resolve_method(method: str | Callable) -> tuple[str, Callable]:
    """``(name, function)`` of a registered method name or a callable."""
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; choose from {sorted(METHODS)} or pass a callable")
    target = METHODS[method]
    if callable(target):
        return method, target
    module, name = target.split(":")
    return method, getattr(importlib.import_module(module), name)


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name`` (a ``**kwargs`` catch-all does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def make_edit(name: str, fn: Callable, model, fact: Fact, locus: str, kwargs: dict | None = None):
    """Compute one edit of the request ``fact`` keyed at ``locus`` (batch methods get ``[fact]``)."""
    kwargs = dict(kwargs or {})
    if "progress" in _params(fn):
        kwargs.setdefault("progress", False)  # one bar for the whole evaluation
    if _accepts(fn, "locus"):
        kwargs["locus"] = locus
    from .editing.edit import EditNotReachedWarning

    with warnings.catch_warnings():  # recorded per row (info_reached, info_p_new), not one warning per edit
        warnings.simplefilter("ignore", EditNotReachedWarning)
        return fn(model, [fact] if name in BATCH_METHODS else fact, **kwargs)


def _params(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def preset_name(name: str, model, kwargs: dict | None) -> str:
    """The hyperparameter preset a method runs with: its preset name, or ``"custom"`` when
    ``kwargs`` override hyperparameters."""
    kwargs = kwargs or {}
    if "preset" in kwargs:
        return str(kwargs["preset"])
    tuning = {k for k in kwargs if k not in ("progress", "verbose", "stats", "prepend_bos")}
    if name in ("rome", "memit"):
        from .editing.hparams import _model_key

        base = f"{name}:{_model_key(model) or 'generic'}"
        return base if not tuning else f"{base}+custom"
    if name == "ft":
        from .editing.ft import ft_hparams_for

        base = ft_hparams_for(model).preset
        return base if not tuning else f"{base}+custom"
    if name == "kn":
        from .editing.kn import KNHyperParams

        base = KNHyperParams().preset
        return base if not tuning else f"{base}+custom"
    return "custom" if tuning else "default"


# --------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class ObjectScore:
    """One (prompt, object) pair under teacher forcing."""

    mean_logprob: float
    correct: bool  # argmax is the object's token at every object position
    token_acc: float = 0.0  # fraction of object positions whose argmax is the object's token


@torch.no_grad()
def score_objects(model, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[ObjectScore]:
    """Teacher-forced scores of ``(prompt, object)`` pairs, batched (right-padded).

    Each row is the prompt's tokens (BOS as the model prepends it) followed by the object's
    tokens but the last; pairs whose rows coincide (single-token objects of one prompt)
    share a row, so all probes of a fact usually take one forward pass.
    """
    prompt_ids = {p: list(tokenize(model, p).ids) for p, _ in pairs}
    obj_ids = {o: object_token_ids(model, o) for _, o in pairs}
    rows: dict[tuple[int, ...], int] = {}
    where = []
    for p, o in pairs:
        row = tuple(prompt_ids[p] + obj_ids[o][:-1])
        rows.setdefault(row, len(rows))
        where.append(rows[row])
    row_list = list(rows)
    logp_of: dict[int, torch.Tensor] = {}
    start_of: dict[int, int] = {}
    for (p, o), r in zip(pairs, where):
        start_of[r] = min(start_of.get(r, 10**9), len(prompt_ids[p]) - 1)
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else (model.tokenizer.eos_token_id or 0)
    device = model.cfg.device
    for b in range(0, len(row_list), batch_size):
        chunk = row_list[b : b + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
        logits = model(ids.to(device), return_type="logits")
        for i, r in enumerate(chunk):
            k = b + i
            logp_of[k] = torch.log_softmax(logits[i, start_of[k] : len(r)].float(), dim=-1).cpu()
    out = []
    for (p, o), r in zip(pairs, where):
        obj = obj_ids[o]
        first = len(prompt_ids[p]) - 1 - start_of[r]
        lp = logp_of[r][first : first + len(obj)]
        target = torch.tensor(obj)
        token_lp = lp[torch.arange(len(obj)), target]
        hits = lp.argmax(-1) == target
        out.append(ObjectScore(float(token_lp.mean()), bool(hits.all()), float(hits.float().mean())))
    return out


def _mean(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def score_probes(model, fact: Fact, probe_set: Probes, request: str | None = None,
                 batch_size: int = 64) -> dict[str, float]:
    """All metrics of one fact on ``model`` as it is now (fractions in [0, 1]; NaN where no probe).

    Keys ``f"{family}_{measure}_{variant}"`` for :data:`METRICS` x :data:`VARIANTS`; the
    ``request_*``/``transfer_*`` keys need the ``request`` perspective (NaN without it).
    One batched forward pass for single-token objects.
    """
    if fact.target_new is None:
        raise ValueError(f"fact {fact.id} ({fact.prompt!r}) has no target_new to evaluate")
    new, old = fact.target_new, fact.target_true
    pairs: list[tuple[str, str]] = []
    for fam in PERSPECTIVES:
        for p in probe_set.family(fam):
            pairs += [(p, new), (p, old)]
    for p, obj, _ in probe_set.bleed:
        pairs += [(p, new), (p, obj)]
    for p, t in zip(probe_set.locality, probe_set.locality_targets):
        pairs += [(p, t), (p, new)]
    scores = dict(zip(pairs, score_objects(model, pairs, batch_size))) if pairs else {}

    def variants(items: Sequence[tuple[str, str, str]]) -> dict[str, float]:
        """items: (prompt, target, rival); acc/tok on target, score = P(target) > P(rival)."""
        return {"acc": _mean(float(scores[(p, t)].correct) for p, t, _ in items),
                "tok": _mean(scores[(p, t)].token_acc for p, t, _ in items),
                "score": _mean(None if t == r else float(scores[(p, t)].mean_logprob > scores[(p, r)].mean_logprob)
                               for p, t, r in items)}

    groups: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for fam in PERSPECTIVES:
        prompts = probe_set.family(fam)
        groups[(fam, "reliability")] = [(p, new, old) for p in prompts[:1]]
        groups[(fam, "generality")] = [(p, new, old) for p in prompts[1:]]
    groups[("bleed", "bleed")] = [(p, new, obj) for p, obj, _ in probe_set.bleed]
    groups[("locality", "locality")] = [(p, t, new) for p, t in zip(probe_set.locality, probe_set.locality_targets)]
    result: dict[str, float] = {}
    for (fam, measure), items in groups.items():
        for variant, value in variants(items).items():
            result[f"{fam}_{measure}_{variant}"] = value
    other = {"entity": "relation", "relation": "entity"}.get(request or "")
    for measure in ("reliability", "generality"):
        for variant in VARIANTS:
            result[f"request_{measure}_{variant}"] = (result[f"{request}_{measure}_{variant}"] if other
                                                      else float("nan"))
            result[f"transfer_{measure}_{variant}"] = (result[f"{other}_{measure}_{variant}"] if other
                                                       else float("nan"))
    return result


# --------------------------------------------------------------------------- one edit

def _scalars(info: dict) -> dict[str, Any]:
    """The edit's scalar diagnostics (numbers, short strings), prefixed ``info_``."""
    return {f"info_{k}": v for k, v in info.items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) < 80)}


def evaluate_one(model, fact: Fact, method: str | Callable | tuple[str, Callable] | None, request: str,
                 locus: str | None, probe_set: Probes, *, method_kwargs: dict | None = None,
                 ph: Phrasings | None = None, batch_size: int = 64, raise_errors: bool = False,
                 prepend_bos: bool | None = None) -> dict[str, Any]:
    """Edit ``fact`` posed from ``request`` keyed at ``locus``, score ``probe_set``, revert: one row.

    ``method`` is a registered name, a callable, a ``(name, callable)`` pair, or ``None`` for
    the unedited model (method :data:`BASELINE`, locus ``"-"``). The method only ever sees
    :func:`~workbench.perspective.request_fact` (the request prompt, no probe). The model is
    left as it was (the edit is applied inside a ``with`` block). A failing method gives a row
    with ``failed=True`` and the ``error``, unless ``raise_errors``. ``prepend_bos``: one BOS
    convention for the edit and the scores (default: the model's editing convention,
    :func:`workbench.editing.hparams.editing_prepend_bos`), recorded in the row.
    """
    from .editing.hparams import editing_prepend_bos
    from .spans import bos_convention

    bos = editing_prepend_bos(model, prepend_bos)
    with bos_convention(model, bos):
        row = _evaluate_one(model, fact, method, request, locus, probe_set, method_kwargs, ph, batch_size,
                            raise_errors, bos)
    row["prepend_bos"] = bos
    return row


def _evaluate_one(model, fact: Fact, method, request: str, locus: str | None, probe_set: Probes,
                  method_kwargs: dict | None, ph: Phrasings | None, batch_size: int, raise_errors: bool,
                  bos: bool) -> dict[str, Any]:
    ph = ph or phrasings(fact)
    if method is None:
        name, fn = BASELINE, None
    elif isinstance(method, tuple):
        name, fn = method
    else:
        name, fn = resolve_method(method)
    req = request_fact(fact, request, ph)
    locus = "-" if fn is None else (locus or DEFAULT_LOCUS[request])
    row: dict[str, Any] = {"method": name, "request": request, "locus": locus, "fact_id": fact.id,
                           "subject": fact.subject, "relation_id": fact.relation_id, "request_prompt": req.prompt,
                           "target_true": fact.target_true, "target_new": fact.target_new,
                           "preset": "-" if fn is None else preset_name(name, model, method_kwargs),
                           "n_bleed": len(probe_set.bleed), "failed": False, "error": None}
    t0 = time.perf_counter()
    if fn is None:
        row.update(score_probes(model, fact, probe_set, request, batch_size))
    else:
        kwargs = {**(method_kwargs or {}), "prepend_bos": bos} if _takes(fn, "prepend_bos") else method_kwargs
        try:
            edit = make_edit(name, fn, model, req, locus, kwargs)
        except Exception as err:  # noqa: BLE001 - recorded per fact, the run goes on
            if raise_errors:
                raise
            row["failed"] = True
            row["error"] = f"{type(err).__name__}: {err}"
        else:
            row["edit_s"] = time.perf_counter() - t0
            with edit.applied(model):
                row.update(score_probes(model, fact, probe_set, request, batch_size))
            row["edit_norm"] = math.sqrt(sum(v ** 2 for v in edit.norms().values()))
            row["hparams"] = json.dumps(edit.hparams, default=str, sort_keys=True)
            row.update(_scalars(edit.info))
    row["seconds"] = time.perf_counter() - t0
    return row


def _evaluate_item(model, item: tuple, settings: dict) -> dict[str, Any]:
    """:func:`evaluate`'s per-edit work (here or on a worker): :func:`evaluate_one`, then every
    ``check_every`` edits on this model a check that its weights are the unedited ones."""
    from .loading import model_fingerprint

    name, fn, request, locus, fact, ph, ps = item
    row = evaluate_one(model, fact, None if fn is None else (name, fn), request, locus, ps,
                       method_kwargs=settings["method_kwargs"].get(name), ph=ph, batch_size=settings["batch_size"],
                       raise_errors=settings["raise_errors"], prepend_bos=settings["prepend_bos"])
    every = settings["check_every"]
    if fn is not None and not row["failed"] and every:
        n = model.__dict__["_workbench_edits"] = model.__dict__.get("_workbench_edits", 0) + 1
        reference = getattr(model, "workbench_fingerprint", None) or settings["fingerprint"]  # a worker's own
        if n % every == 0 and model_fingerprint(model) != reference:
            raise RuntimeError(f"weights differ from the unedited model after {n} edits (last: {name}/{request}/"
                               f"{locus} on fact {fact.id}); an edit was not reverted")
    return row


def _failed_row(index: int, item: tuple, error: str) -> dict[str, Any]:
    """The row of an edit whose worker kept dying (``workers=``): failed, with the error; not stored."""
    name, fn, request, locus, fact, _, _ = item
    return {"method": name, "request": request, "locus": "-" if fn is None else (locus or DEFAULT_LOCUS[request]),
            "fact_id": fact.id, "subject": fact.subject, "relation_id": fact.relation_id,
            "target_true": fact.target_true, "target_new": fact.target_new, "failed": True,
            "error": f"worker: {error}", "worker_failed": True}


def with_shared_stats(model, resolved: Sequence[tuple[str, Callable]], method_kwargs: dict[str, dict]
                      ) -> dict[str, dict]:
    """``method_kwargs`` plus ``stats={layer: LayerStats}`` for ROME and MEMIT (unless given):
    their covariance statistics, computed (or read from the cache) once, here, for the workers."""
    from .editing.stats import layer_stats

    out = {k: dict(v or {}) for k, v in method_kwargs.items()}
    for name, _ in resolved:
        kw = out.setdefault(name, {})
        hp = resolved_hparams(name, model, kw) if name in ("rome", "memit") and "stats" not in kw else None
        if hp is None or (name == "rome" and not hp["mom2_adjustment"]):
            continue
        kw["stats"] = {int(layer): layer_stats(model, int(layer), corpus=hp["mom2_dataset"],
                                               n_tokens=hp["mom2_n_tokens"]) for layer in hp["layers"]}
    return out


# --------------------------------------------------------------------------- evaluate

def select_facts(facts: Sequence[Fact], n: int | None = None, seed: int = 0) -> list[Fact]:
    """The facts :func:`evaluate` uses: those with a ``target_new``; with ``n``, a seeded
    random sample of ``n`` of them (kept in dataset order), so subjects and relations mix."""
    usable = [f for f in facts if f.target_new is not None]
    if n is None or n >= len(usable):
        return usable
    keep = sorted(random.Random(seed).sample(range(len(usable)), n))
    return [usable[i] for i in keep]


def cells_for(requests: Sequence[str] = PERSPECTIVES, loci: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(request, locus) cells: the paper's pairing (``loci=None``) or every request x locus."""
    from .editing.common import LOCI

    for r in requests:
        if r not in PERSPECTIVES:
            raise ValueError(f"request perspective must be one of {PERSPECTIVES}, not {r!r}")
    if loci is None:
        return [(r, DEFAULT_LOCUS[r]) for r in requests]
    for locus in loci:
        if locus not in LOCI:
            raise ValueError(f"locus must be one of {LOCI}, not {locus!r}")
    return [(r, locus) for r in requests for locus in loci]


STORE_KIND = "evaluation"
"""``kind`` of an evaluation folder's :class:`workbench.store.ResultStore`."""
ROWS_FILE = "details.jsonl"
"""Per-edit rows of an evaluation folder."""
ID_FIELDS = ("method", "request", "locus", "fact_id")
"""What identifies one row of an evaluation."""


def probe_bank_version(bank: str | os.PathLike | None = None) -> str:
    """Content hash of the phrasing-template bank (probes and requests, and so rows, depend on it)."""
    from .perspective import _TEMPLATE_BANK

    return hashlib.sha256(Path(bank or _TEMPLATE_BANK).read_bytes()).hexdigest()[:16]


def resolved_hparams(name: str, model, kwargs: dict | None = None) -> dict | None:
    """The hyperparameters (with the preset's name) a built-in method will use with ``kwargs`` on ``model``
    (``None``: a custom callable, or kwargs the method will reject anyway, which its rows record as failed)."""
    from dataclasses import fields, replace

    kw = dict(kwargs or {})
    try:
        if name in ("rome", "memit"):
            from .editing.hparams import MEMITHyperParams, ROMEHyperParams, memit_hparams_for, rome_hparams_for
            from .editing.rome import resolve_hparams

            if name == "rome":
                layers = [kw["layer"]] if kw.get("layer") is not None else None
                hp = resolve_hparams(model, kw.get("hparams"), ROMEHyperParams, rome_hparams_for, layers)
            else:
                layers = list(kw["layers"]) if kw.get("layers") else None
                hp = resolve_hparams(model, kw.get("hparams"), MEMITHyperParams, memit_hparams_for, layers)
            return {**hp.to_dict(), "preset": preset_name(name, model, kwargs)}
        if name in ("ft", "kn"):
            from .editing.ft import FT_PRESETS, FTHyperParams, default_layer, ft_hparams_for
            from .editing.kn import KN_PRESETS, KNHyperParams

            cls = FTHyperParams if name == "ft" else KNHyperParams
            presets = FT_PRESETS if name == "ft" else KN_PRESETS
            if kw.get("preset") is not None:
                base = presets[kw["preset"]]
            else:
                base = ft_hparams_for(model) if name == "ft" else KN_PRESETS["kn-original"]
            given = kw.get("hparams")
            hp = given if isinstance(given, cls) else replace(base, **(given or {}))
            names = {f.name for f in fields(cls)} - {"preset"}
            hp = replace(hp, **{k: v for k, v in kw.items() if k in names})
            if name == "ft" and hp.layer is None:
                hp = replace(hp, layer=default_layer(model))
            return {**hp.to_dict(), "preset": preset_name(name, model, kwargs)}
    except Exception:  # noqa: BLE001 - the method raises the same error per row, recorded there
        return None
    return None


def evaluation_key(model, facts: Sequence[Fact], resolved: Sequence[tuple[str, Callable]],
                   method_kwargs: dict[str, dict], seed: int, fingerprint: str | None = None,
                   bleed_subjects_per_fact: int = 5) -> dict:
    """Everything an evaluation row depends on: the store key of ``evaluate(out=...)``.

    The facts hash covers every fact (all fields; bleed subjects come from the whole dataset),
    so a larger ``n`` reuses the rows of a smaller one; each method contributes its kwargs and
    resolved hyperparameters with the preset name (a custom callable is known by its name and
    kwargs only: change its name when its code changes).
    """
    from .loading import model_fingerprint

    methods = {}
    for name, fn in resolved:
        kwargs = method_kwargs.get(name) or {}
        target = METHODS.get(name)
        methods[name] = {"function": target if isinstance(target, str) else "custom callable",
                         "kwargs": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in kwargs.items()},
                         "hparams": resolved_hparams(name, model, kwargs) if target else None}
    return {"model_spec": getattr(model, "workbench_spec", None),
            "model_fingerprint": fingerprint or model_fingerprint(model),
            "facts_hash": facts_hash(facts), "n_facts": len(facts), "seed": seed,
            "probe_bank": probe_bank_version(), "bleed_subjects_per_fact": bleed_subjects_per_fact,
            "methods": methods}


def evaluate(model, facts: Sequence[Fact], methods: Sequence[str | Callable] | None = None,
             requests: Sequence[str] = PERSPECTIVES, loci: Sequence[str] | None = None, n: int | None = None,
             out: str | os.PathLike | None = None, *, seed: int = 0, method_kwargs: dict[str, dict] | None = None,
             baseline: bool = True, bleed_subjects_per_fact: int = 5, check_every: int = 50,
             raise_errors: bool = False, progress: bool = True, batch_size: int = 64,
             n_boot: int = 1000, prepend_bos: bool | None = None, workers: int | None = None,
             ray_address: str | None = None) -> pd.DataFrame:
    """Edit each fact with each (method, request perspective, key locus), score, revert; summarize.

    Args:
        model: a bridge from :func:`workbench.load_model`.
        facts: the dataset (facts without ``target_new`` are not edited but still serve as
            bleed subjects); ``n`` picks a seeded sample of the editable ones (:func:`select_facts`).
        methods: registered names or callables ``f(model, fact, locus=...) -> Edit``; default
            :func:`default_methods` (the paper's order).
        requests: request perspectives, ``"entity"`` and/or ``"relation"``.
        loci: ``None`` pairs each request with its default locus (entity -> subject, relation ->
            relation); a list of loci evaluates every request x locus (the full cube).
        out: folder, a :class:`workbench.store.ResultStore` keyed by :func:`evaluation_key`;
            per-edit rows go to ``out/details.jsonl`` as they finish (fsynced), and a rerun with
            the same settings skips the (method, request, locus, fact id) already there, so a
            crashed run resumes. Other settings, a missing config or a concurrent run on the
            same folder are refused. ``summary.csv`` (every cell's mean, interval, n) at the end.
        method_kwargs: extra keyword arguments per method name, e.g. ``{"kn": {"lam": "auto"}}``.
        baseline: add the unedited model's rows (one per request perspective).
        bleed_subjects_per_fact: other subjects of the relation probed for bleed (x 2 phrasings).
        check_every: every that many edits, check that the weights are still the unedited ones.
        raise_errors: re-raise a method's error instead of recording the edit as failed.
        n_boot: bootstrap resamples of the 95% intervals.
        prepend_bos: BOS before every prompt, for the edits and the scores alike (default: the
            model's editing convention, :func:`workbench.editing.hparams.editing_prepend_bos`:
            none for GPT-2 XL and GPT-J, as the originals); recorded in the key, rows and
            ``df.attrs["prepend_bos"]``.
        workers: run the edits on that many Ray actors (``ray_address``: a running cluster;
            :mod:`workbench.scale`), each with its own model; ROME's and MEMIT's covariance
            statistics are computed here once and shared. Same store, same results. An edit
            whose worker kept dying gets a failed row with the ``error``, not stored (a rerun
            retries it).

    Returns:
        The summary (:func:`summarize`): rows (method, request, locus), columns (family,
        measure_variant) in percent; ``attrs["details"]`` the per-edit rows, ``attrs["long"]``
        every cell's mean, interval and ``n``.
    """
    from .progress import progress_bar

    from .editing.hparams import editing_prepend_bos
    from .loading import model_fingerprint
    from .scale import check_workers, map_facts

    check_workers(workers, ray_address)
    chosen = select_facts(facts, n, seed)
    index = relation_index(facts)
    resolved = [resolve_method(m) for m in (methods if methods is not None else default_methods())]
    method_kwargs = method_kwargs or {}
    bos = editing_prepend_bos(model, prepend_bos)
    cells = cells_for(requests, loci)
    fingerprint = model_fingerprint(model)
    store = None
    rows: list[dict] = []
    if out is not None:
        from .store import ResultStore

        key = {**evaluation_key(model, facts, resolved, method_kwargs, seed, fingerprint, bleed_subjects_per_fact),
               "prepend_bos": bos}
        store = ResultStore.open(out, kind=STORE_KIND, key=key, id_fields=ID_FIELDS, rows_name=ROWS_FILE)
        rows = store.rows()

    jobs: list[tuple[str, Callable | None, str, str]] = []
    if baseline:
        jobs += [(BASELINE, None, r, "-") for r in dict.fromkeys(r for r, _ in cells)]
    jobs += [(name, fn, r, locus) for name, fn in resolved for r, locus in cells]
    todo = [(j, f) for j in jobs for f in chosen if store is None or (j[0], j[2], j[3], f.id) not in store]
    prepared: dict[str, tuple[Phrasings, Probes]] = {}
    for _, fact in todo:
        if str(fact.id) not in prepared:
            ph = phrasings(fact)
            prepared[str(fact.id)] = (ph, probes(fact, bleed_subjects(fact, index, bleed_subjects_per_fact, seed), ph=ph))
    items = [(k, (name, fn, request, locus, fact, *prepared[str(fact.id)]))
             for k, ((name, fn, request, locus), fact) in enumerate(todo)]
    settings = {"method_kwargs": method_kwargs, "batch_size": batch_size, "raise_errors": raise_errors,
                "prepend_bos": bos, "check_every": check_every, "fingerprint": fingerprint}
    if workers is not None and todo:  # computed once here, shipped to every worker
        settings["method_kwargs"] = with_shared_stats(model, resolved, method_kwargs)
    n_edits = 0
    bar = progress_bar(total=len(todo), desc="evaluate", enabled=progress, dynamic_ncols=True)
    try:
        for _, row in map_facts(model, _evaluate_item, items, shared=settings, workers=workers,
                                ray_address=ray_address, on_failure=_failed_row, bar=bar):
            if workers is None:
                bar.set_postfix_str(f"{row['method']}/{row['request']}/{row['locus']}", refresh=False)
            n_edits += row["method"] != BASELINE and not row["failed"]
            rows.append(store.append(row) if store is not None and not row.get("worker_failed") else row)
    finally:
        bar.close()
        if store is not None:
            store.close()
    if workers is None and check_every and n_edits and model_fingerprint(model) != fingerprint:
        raise RuntimeError("weights differ from the unedited model after the evaluation; an edit was not reverted")
    order = {(j[0], j[2], j[3], str(f.id)): k for k, (j, f) in enumerate((j, f) for j in jobs for f in chosen)}
    ident = lambda r: (r["method"], r["request"], r["locus"], str(r["fact_id"]))  # noqa: E731
    # dataset order, whatever order the rows finished in (workers): means and bootstrap depend on it
    details = pd.DataFrame(sorted((r for r in rows if ident(r) in order), key=lambda r: order[ident(r)]))
    summary = summarize(details, order=[(j[0], j[2], j[3]) for j in jobs], n_boot=n_boot, seed=seed)
    if out is not None:
        summary.attrs["long"].to_csv(Path(out) / "summary.csv", index=False)
    summary.attrs["prepend_bos"] = bos
    return summary


def score_fact(model, fact: Fact, probe_set: Probes | None = None, request: str | None = None,
               batch_size: int = 64) -> dict[str, float]:
    """:func:`score_probes` with the fact's own probes (no bleed subjects unless ``probe_set`` has them)."""
    return score_probes(model, fact, probe_set or probes(fact), request, batch_size)


# --------------------------------------------------------------------------- summaries

def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its percentile-bootstrap ``level`` interval.

    NaNs are dropped; no values give NaNs; one value gives a zero-width interval.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


CELL = ["method", "request", "locus"]


def summarize(details: pd.DataFrame, order: Sequence[tuple[str, str, str]] | None = None, *, n_boot: int = 1000,
              seed: int = 0) -> pd.DataFrame:
    """Per-cell (method, request, locus) means over facts, in percent, with 95% bootstrap intervals.

    Returns the wide summary: columns (family, ``measure_variant``) of means, then
    ``("n", "edits")`` (edits scored) and ``("n", "failed")``. ``attrs["long"]`` has one row
    per cell x family x measure x variant: ``mean``, ``lo``, ``hi`` and ``n`` (facts with a value).
    """
    cols = [(fam, f"{measure}_{v}") for fam, measure in METRICS for v in VARIANTS]
    columns = pd.MultiIndex.from_tuples(cols + [("n", "edits"), ("n", "failed")], names=["family", "metric"])
    long_rows: list[dict] = []
    records = []
    if details is None or details.empty:
        summary = pd.DataFrame(columns=columns, index=pd.MultiIndex.from_tuples([], names=CELL))
        summary.attrs["long"] = pd.DataFrame(columns=CELL + ["family", "measure", "variant", "mean", "lo", "hi", "n"])
        return summary
    keys = list(order or dict.fromkeys(zip(details["method"], details["request"], details["locus"])))
    failed = details["failed"].fillna(False).astype(bool) if "failed" in details else pd.Series(False, details.index)
    for cell in keys:
        mask = (details["method"] == cell[0]) & (details["request"] == cell[1]) & (details["locus"] == cell[2])
        part, ok = details[mask], details[mask & ~failed]
        means = []
        for fam, measure in METRICS:
            for v in VARIANTS:
                col = f"{fam}_{measure}_{v}"
                vals = ok[col].astype(float).tolist() if col in ok else []
                mean, lo, hi = bootstrap_ci(vals, n_boot, seed)
                n_val = int(np.sum(~np.isnan(np.asarray(vals, dtype=float)))) if vals else 0
                long_rows.append(dict(zip(CELL, cell), family=fam, measure=measure, variant=v, mean=100 * mean,
                                      lo=100 * lo, hi=100 * hi, n=n_val))
                means.append(100 * mean)
        records.append(means + [len(ok), len(part) - len(ok)])
    summary = pd.DataFrame(records, index=pd.MultiIndex.from_tuples(keys, names=CELL), columns=columns)
    summary.attrs["long"] = pd.DataFrame(long_rows)
    summary.attrs["details"] = details
    return summary


# --------------------------------------------------------------------------- tables

PAPER_COLUMNS = (("entity", "reliability", "Entity Reliability"), ("entity", "generality", "Entity Generality"),
                 ("relation", "reliability", "Relation Reliability"),
                 ("relation", "generality", "Relation Generality"),
                 ("bleed", "bleed", "Bleed"), ("locality", "locality", "Locality"))
"""The paper's column order (Tables 1-2), then the workbench's bleed and locality columns."""

CUBE_COLUMNS = (("request", "reliability", "Request Reliability"), ("request", "generality", "Request Generality"),
                ("transfer", "reliability", "Transfer Reliability"),
                ("transfer", "generality", "Transfer Generality"),
                ("bleed", "bleed", "Bleed"), ("locality", "locality", "Locality"))
"""Columns of the full cube: the request family, the other (transfer) family, bleed, locality."""

VARIANT_TEXT = {
    "acc": "accuracy: o*'s tokens are all the teacher-forced argmax (%)",
    "tok": "per-token accuracy: mean over o*'s tokens of argmax = token (%)",
    "score": "CounterFact score: P(o*) > P(o) by mean token log-prob; bleed P(o*) > P(own object); "
             "locality P(answer) > P(o*) (%)",
}


def _method_rank(method: str) -> tuple[int, int]:
    if method == BASELINE:
        return (0, 0)
    return (1, PAPER_ORDER.index(method)) if method in PAPER_ORDER else (2, 0)


def _table(summary: pd.DataFrame, cells: list[tuple[str, str, str]], columns, variant: str,
           index_names: list[str], label_of: Callable[[tuple[str, str, str]], tuple]) -> pd.DataFrame:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    long = summary.attrs.get("long")
    if long is None:
        raise ValueError("the summary has no intervals (attrs['long']); make it with summarize() or evaluate()")
    stats = long[long["variant"] == variant].set_index(CELL + ["family", "measure"])
    rows, labels = [], []
    for cell in cells:
        rec: dict[str, Any] = {}
        for fam, measure, label in columns:
            s = stats.loc[(*cell, fam, measure)] if (*cell, fam, measure) in stats.index else None
            rec[label] = float("nan") if s is None else float(s["mean"])
            rec[f"{label} lo"] = float("nan") if s is None else float(s["lo"])
            rec[f"{label} hi"] = float("nan") if s is None else float(s["hi"])
        rec["n"] = int(summary.loc[cell, ("n", "edits")])
        rec["failed"] = int(summary.loc[cell, ("n", "failed")])
        rows.append(rec)
        labels.append(label_of(cell))
    index = (pd.MultiIndex.from_tuples(labels, names=index_names) if len(index_names) > 1
             else pd.Index([l[0] for l in labels], name=index_names[0]))
    return pd.DataFrame(rows, index=index)


def paper_table(summary: pd.DataFrame, request: str, locus: str | None = None, variant: str = "acc",
                baseline: bool = True) -> pd.DataFrame:
    """One of the paper's tables: edits requested from ``request`` keyed at ``locus``.

    ``request="relation"`` is Table 1 (relation-based edits), ``"entity"`` Table 2; ``locus``
    defaults to the paper's pairing. Columns in the paper's order (entity reliability and
    generality, relation reliability and generality), then bleed and locality, each with
    ``" lo"``/``" hi"`` interval columns, then ``n`` (edits scored) and ``failed``. Rows: the
    unedited model (when ``baseline``), then the methods in the paper's order.
    """
    if request not in PERSPECTIVES:
        raise ValueError(f"request must be one of {PERSPECTIVES}, not {request!r}")
    locus = locus or DEFAULT_LOCUS[request]
    cells = [c for c in summary.index if c[1] == request and (c[2] == locus or (baseline and c[0] == BASELINE))]
    cells.sort(key=lambda c: _method_rank(c[0]))
    return _table(summary, cells, PAPER_COLUMNS, variant, ["Method"], lambda c: (METHOD_LABELS.get(c[0], c[0]),))


def cube_table(summary: pd.DataFrame, variant: str = "acc") -> pd.DataFrame:
    """Every cell (method x request x locus) as a row: request-family, transfer, bleed and locality columns."""
    cells = sorted(summary.index, key=lambda c: (_method_rank(c[0]), PERSPECTIVES.index(c[1]), c[2]))
    return _table(summary, cells, CUBE_COLUMNS, variant, ["Method", "Request", "Locus"],
                  lambda c: (METHOD_LABELS.get(c[0], c[0]), c[1], c[2]))


full_table = cube_table


def to_markdown(table: pd.DataFrame, caption: str | None = None, decimals: int = 1) -> str:
    """A GitHub Markdown table; a column ``X`` with ``X lo``/``X hi`` twins is written ``mean [lo, hi]``."""
    names = list(table.index.names) if isinstance(table.index, pd.MultiIndex) else [table.index.name or ""]
    cols = [c for c in table.columns if not (str(c).endswith(" lo") or str(c).endswith(" hi"))]
    header = [str(n or "") for n in names] + [str(c) for c in cols]

    def num(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{decimals}f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, rec in table.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        cells = []
        for c in cols:
            v = rec[c]
            if f"{c} lo" in table.columns:
                lo, hi = rec[f"{c} lo"], rec[f"{c} hi"]
                cells.append(num(v) if num(v) == "-" else f"{num(v)} [{num(lo)}, {num(hi)}]")
            elif isinstance(v, (float, np.floating)) and float(v).is_integer() and c in ("n", "failed"):
                cells.append(str(int(v)))
            else:
                cells.append(num(v) if isinstance(v, (float, np.floating)) else str(v))
        lines.append("| " + " | ".join([str(k) for k in key] + cells) + " |")
    text = "\n".join(lines) + "\n"
    return f"{caption}\n\n{text}" if caption else text


def write_tables(summary: pd.DataFrame, out: str | os.PathLike, model_name: str = "") -> list[Path]:
    """Write Table 1, Table 2 and the full cube as CSV and Markdown, for every metric variant.

    Files: ``table1_relation_requests``, ``table2_entity_requests``, ``cube`` for accuracy,
    with ``_tok`` / ``_score`` twins for per-token accuracy and CounterFact score; each
    ``.csv`` (mean, ``lo``, ``hi`` columns) and ``.md`` (``mean [lo, hi]``), plus
    ``summary_long.csv`` (every cell, family, measure and variant).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    requests = {c[1] for c in summary.index}
    for variant in VARIANTS:
        suffix = "" if variant == "acc" else f"_{variant}"
        tables: dict[str, tuple[pd.DataFrame, str]] = {}
        if "relation" in requests:
            tables[f"table1_relation_requests{suffix}"] = (
                paper_table(summary, "relation", variant=variant),
                f"Table 1: relation-based requests (relation-first prompt, key at the relation's last token)"
                f"{model_name}, {VARIANT_TEXT[variant]}, mean [95% bootstrap interval]")
        if "entity" in requests:
            tables[f"table2_entity_requests{suffix}"] = (
                paper_table(summary, "entity", variant=variant),
                f"Table 2: entity-based requests (subject-first prompt, key at the subject's last token)"
                f"{model_name}, {VARIANT_TEXT[variant]}, mean [95% bootstrap interval]")
        tables[f"cube{suffix}"] = (cube_table(summary, variant),
                                   f"Every method x request perspective x key locus{model_name}, "
                                   f"{VARIANT_TEXT[variant]}, mean [95% bootstrap interval]")
        for stem, (table, caption) in tables.items():
            csv = out / f"{stem}.csv"
            table.round(2).to_csv(csv)
            md = out / f"{stem}.md"
            md.write_text(to_markdown(table, caption))
            written += [csv, md]
    long_csv = out / "summary_long.csv"
    summary.attrs["long"].round(3).to_csv(long_csv, index=False)
    written.append(long_csv)
    return written
