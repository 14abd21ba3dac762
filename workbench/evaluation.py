"""Evaluating edits: probe families, reliability / generality / locality, and the paper's tables.

Probe families (reference §7; the paper leaves them implicit, this is the workbench's
operational reading). For an edit of fact (s, r, o -> o*):

* **entity probes** ask the fact in subject-first phrasings that talk about the entity
  (``"{}'s capital city is"``). Bundled world: ``Fact.entity_prompts``, with the edit
  prompt first when it is itself subject-first. CounterFact data (no ``entity_prompts``):
  the rewrite prompt and its paraphrases, so that entity reliability / generality are
  CounterFact's efficacy and paraphrase measures.
* **relation probes** ask it in relation-first phrasings (``"The capital of {} is"``).
  Bundled world: ``Fact.relation_prompts``, with the edit prompt first when it is itself
  relation-first. CounterFact data: the relation-first templates of the shipped bank
  ``workbench/data/relation_templates.json`` for the fact's ``relation_id``, filled with
  the subject, leaving out any that equals the rewrite prompt.
* **locality probes**: other subjects with the same relation (``Fact.neighborhood``, whose
  answers are ``Fact.neighborhood_targets``; for CounterFact those equal ``target_true``).

The first probe of the entity and relation families is the family's *reliability* prompt,
the others its *generality* prompts. Edits are always computed on ``fact.prompt`` (the
rewrite prompt); the locus only changes the token where the edit is keyed.

Every metric is reported two ways, and the name says which:

* ``*_acc`` -- **accuracy**: teacher-forced, the prompt followed by the object's tokens but
  the last is fed once, and the probe counts as correct only if the argmax at *every*
  object position is the object's token (all tokens of the object, not just the first).
* ``*_score`` -- **CounterFact score**: P(o*) > P(o), multi-token objects compared by mean
  token log-probability (CounterFact compares average NLL). For locality the comparison
  is P(neighbour's answer) > P(o*) (CounterFact's neighbourhood score); a neighbour whose
  answer *is* o* has no such comparison and is left out of the score (not of the accuracy).

Locality accuracy is "the neighbour prompt still predicts its dataset answer" (as in
CounterFact), so the unedited model's locality is its own accuracy on those prompts.
Per fact, generality and locality are the mean over that fact's prompts; summaries are
means over facts, in percent. The *unedited* row scores the unedited model on the same
probes with the same targets (o* for entity/relation), i.e. how often o* is already there.
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch

from .facts import Fact
from .predict import object_token_ids
from .spans import tokenize

FAMILIES = ("entity", "relation", "locality")
"""Probe families, in the order of the summary columns."""

METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("entity", "reliability_acc"), ("entity", "reliability_score"),
    ("entity", "generality_acc"), ("entity", "generality_score"),
    ("relation", "reliability_acc"), ("relation", "reliability_score"),
    ("relation", "generality_acc"), ("relation", "generality_score"),
    ("locality", "locality_acc"), ("locality", "locality_score"),
)
"""Summary columns (family, metric); ``_acc`` = teacher-forced accuracy, ``_score`` = P(new) > P(old)."""

BASELINE = "unedited"
"""Method name of the baseline row (the unedited model), whose locus is ``"-"``."""

METHODS: dict[str, str] = {
    "ft": "workbench.editing.ft:ft",
    "kn": "workbench.editing.kn:kn",
    "mend": "workbench.editing.mend:mend",
    "rome": "workbench.editing.rome:rome",
    "memit": "workbench.editing.memit:memit",
}
"""Method names accepted by :func:`evaluate` and where they live (imported lazily)."""

_TEMPLATE_BANK = Path(__file__).resolve().parent / "data" / "relation_templates.json"


# --------------------------------------------------------------------------- probes

@lru_cache(maxsize=4)
def _load_bank(path: str) -> dict[str, tuple[str, ...]]:
    raw = json.loads(Path(path).read_text())
    return {rid: tuple(v["templates"]) for rid, v in raw.items() if not rid.startswith("_")}


def relation_templates(relation_id: str | None = None, path: str | os.PathLike | None = None
                       ) -> dict[str, tuple[str, ...]] | tuple[str, ...]:
    """The relation-first template bank: all of it, or the templates of one relation id.

    The bank ships as ``workbench/data/relation_templates.json`` (CounterFact's relation ids,
    2-4 natural relation-first templates each); an unknown id gives ``()``.
    """
    bank = _load_bank(str(path or _TEMPLATE_BANK))
    return bank if relation_id is None else bank.get(relation_id, ())


@dataclass(frozen=True)
class Probes:
    """The probe prompts of one fact; ``entity[0]``/``relation[0]`` are the reliability prompts."""

    entity: tuple[str, ...]
    relation: tuple[str, ...]
    locality: tuple[str, ...]
    locality_targets: tuple[str, ...]

    def family(self, name: str) -> tuple[str, ...]:
        return getattr(self, name)


def _first(prompts: Sequence[str], edit_prompt: str) -> tuple[str, ...]:
    """``prompts`` with ``edit_prompt`` moved to the front when it is one of them."""
    prompts = list(dict.fromkeys(prompts))
    if edit_prompt in prompts:
        prompts.remove(edit_prompt)
        prompts.insert(0, edit_prompt)
    return tuple(prompts)


def probes(fact: Fact, bank: str | os.PathLike | None = None) -> Probes:
    """The entity, relation and locality probes of ``fact`` (see the module docstring)."""
    if fact.entity_prompts:
        entity = _first(fact.entity_prompts, fact.prompt)
    else:
        entity = tuple(dict.fromkeys((fact.prompt, *fact.paraphrases)))
    if fact.relation_prompts:
        relation = _first(fact.relation_prompts, fact.prompt)
    else:
        filled = (t.format(fact.subject) for t in relation_templates(fact.relation_id, bank))
        relation = tuple(p for p in dict.fromkeys(filled) if p != fact.prompt)
    targets = tuple(fact.neighborhood_targets) or (fact.target_true,) * len(fact.neighborhood)
    if len(targets) != len(fact.neighborhood):
        raise ValueError(f"fact {fact.id}: {len(fact.neighborhood)} neighbourhood prompts but "
                         f"{len(targets)} neighbourhood targets")
    return Probes(entity, relation, tuple(fact.neighborhood), targets)


# --------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class ObjectScore:
    """One (prompt, object) pair under teacher forcing."""

    mean_logprob: float
    correct: bool  # argmax is the object's token at every object position


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
    # per row: log-probs at every position from the prompt's last token on, computed lazily per batch
    logp_of: dict[int, torch.Tensor] = {}
    start_of = {}
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
        out.append(ObjectScore(float(token_lp.mean()), bool((lp.argmax(-1) == target).all())))
    return out


def _mean(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def score_fact(model, fact: Fact, probe_set: Probes | None = None, batch_size: int = 64) -> dict[str, float]:
    """All metrics of one fact on ``model`` as it is now (fractions in [0, 1]; NaN if no probe).

    Keys are ``"{family}_{metric}"`` for the entries of :data:`METRIC_COLUMNS`, e.g.
    ``entity_reliability_acc`` or ``locality_locality_score``. One batched forward pass.
    """
    if fact.target_new is None:
        raise ValueError(f"fact {fact.id} ({fact.prompt!r}) has no target_new to evaluate")
    ps = probe_set or probes(fact)
    new, old = fact.target_new, fact.target_true
    pairs: list[tuple[str, str]] = []
    for fam in ("entity", "relation"):
        for p in ps.family(fam):
            pairs += [(p, new), (p, old)]
    for p, t in zip(ps.locality, ps.locality_targets):
        pairs += [(p, t), (p, new)]
    scores = dict(zip(pairs, score_objects(model, pairs, batch_size))) if pairs else {}

    def acc(p: str, target: str) -> float:
        return float(scores[(p, target)].correct)

    def cf(p: str, target: str, other: str) -> float | None:
        if target == other:
            return None
        return float(scores[(p, target)].mean_logprob > scores[(p, other)].mean_logprob)

    result: dict[str, float] = {}
    for fam in ("entity", "relation"):
        prompts = ps.family(fam)
        rel, gen = prompts[:1], prompts[1:]
        result[f"{fam}_reliability_acc"] = _mean(acc(p, new) for p in rel)
        result[f"{fam}_reliability_score"] = _mean(cf(p, new, old) for p in rel)
        result[f"{fam}_generality_acc"] = _mean(acc(p, new) for p in gen)
        result[f"{fam}_generality_score"] = _mean(cf(p, new, old) for p in gen)
    loc = list(zip(ps.locality, ps.locality_targets))
    result["locality_locality_acc"] = _mean(acc(p, t) for p, t in loc)
    result["locality_locality_score"] = _mean(cf(p, t, new) for p, t in loc)
    return result


# --------------------------------------------------------------------------- methods

def resolve_method(method: str | Callable) -> tuple[str, Callable]:
    """``(name, function)`` of a method given by name (:data:`METHODS`) or as a callable."""
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; choose from {sorted(METHODS)} or pass a callable")
    module, name = METHODS[method].split(":")
    return method, getattr(importlib.import_module(module), name)


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def make_edit(name: str, fn: Callable, model, fact: Fact, locus: str, kwargs: dict | None = None):
    """Compute one edit of ``fact`` (MEMIT gets a one-fact batch: one fact per edit)."""
    kwargs = dict(kwargs or {})
    try:
        if "progress" in inspect.signature(fn).parameters:
            kwargs.setdefault("progress", False)  # one bar for the whole evaluation
    except (TypeError, ValueError):
        pass
    if name == "memit":
        return fn(model, [fact], locus=locus, **kwargs)
    return fn(model, fact, locus=locus, **kwargs)


# --------------------------------------------------------------------------- evaluate

def select_facts(facts: Sequence[Fact], n: int | None = None, seed: int = 0) -> list[Fact]:
    """The facts :func:`evaluate` uses: those with a ``target_new``; with ``n``, a seeded
    random sample of ``n`` of them (kept in dataset order), so subjects and relations mix."""
    usable = [f for f in facts if f.target_new is not None]
    if n is None or n >= len(usable):
        return usable
    keep = sorted(random.Random(seed).sample(range(len(usable)), n))
    return [usable[i] for i in keep]


STORE_KIND = "evaluation"
"""``kind`` of an evaluation folder's :class:`workbench.store.ResultStore`."""
ROWS_FILE = "details.jsonl"
"""Per-fact rows of an evaluation folder."""


def probe_bank_version(bank: str | os.PathLike | None = None) -> str:
    """Content hash of the relation-template bank (probes, and so rows, depend on it)."""
    return hashlib.sha256(Path(bank or _TEMPLATE_BANK).read_bytes()).hexdigest()[:16]


def resolved_hparams(name: str, model, kwargs: dict | None = None) -> dict | None:
    """The hyperparameters a built-in method will use with ``kwargs`` on ``model`` (``None``:
    a custom callable, or kwargs the method will reject anyway, which its rows record as errors)."""
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
            return hp.to_dict()
        if name in ("ft", "kn"):
            from .editing.ft import FTHyperParams, default_layer
            from .editing.kn import KNHyperParams

            cls = FTHyperParams if name == "ft" else KNHyperParams
            given = kw.get("hparams")
            hp = given if isinstance(given, cls) else cls(**(given or {}))
            names = {f.name for f in fields(cls)}
            hp = replace(hp, **{k: v for k, v in kw.items() if k in names})
            if name == "ft" and hp.layer is None:
                hp = replace(hp, layer=default_layer(model))
            return hp.to_dict()
    except Exception:  # noqa: BLE001 - the method raises the same error per row, recorded there
        return None
    return None


def evaluation_key(model, facts: Sequence[Fact], resolved: Sequence[tuple[str, Callable]],
                   method_kwargs: dict[str, dict], seed: int, fingerprint: str | None = None) -> dict:
    """Everything an evaluation row depends on: the store key of ``evaluate(out=...)``.

    The facts hash covers every usable fact (all fields), so a larger ``n`` reuses the rows
    of a smaller one; each method contributes its kwargs and resolved hyperparameters (a
    custom callable is known by its name and kwargs only: change its name when its code changes).
    """
    from .loading import model_fingerprint
    from .store import content_hash

    methods = {}
    for name, fn in resolved:
        kwargs = method_kwargs.get(name) or {}
        methods[name] = {"function": METHODS.get(name, "custom callable"),
                         "kwargs": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in kwargs.items()},
                         "hparams": resolved_hparams(name, model, kwargs) if METHODS.get(name) else None}
    usable = [f for f in facts if f.target_new is not None]
    return {"model_spec": getattr(model, "workbench_spec", None),
            "model_fingerprint": fingerprint or model_fingerprint(model),
            "facts_hash": content_hash(f.to_dict() for f in usable), "n_facts": len(usable), "seed": seed,
            "probe_bank": probe_bank_version(), "methods": methods}


def _scalars(info: dict) -> dict[str, Any]:
    """The edit's scalar diagnostics (numbers, short strings), prefixed ``info_``."""
    return {f"info_{k}": v for k, v in info.items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) < 80)}


def evaluate(model, facts: Sequence[Fact], methods: Sequence[str | Callable] = ("ft", "kn", "rome", "memit"),
             loci: Sequence[str] = ("subject", "relation"), n: int | None = None,
             out: str | os.PathLike | None = None, *, seed: int = 0,
             method_kwargs: dict[str, dict] | None = None, baseline: bool = True, check_every: int = 50,
             raise_errors: bool = False, progress: bool = True, batch_size: int = 64,
             prepend_bos: bool | None = None) -> pd.DataFrame:
    """Edit each fact with each (method, locus), score the probe families, revert; summarize.

    Args:
        model: a bridge from :func:`workbench.load_model`.
        facts: facts with ``target_new`` (others are skipped); ``n`` picks a seeded sample
            (:func:`select_facts`).
        methods: names from :data:`METHODS` or callables ``f(model, fact, locus=...) -> Edit``.
        loci: ``"subject"`` and/or ``"relation"``: the token where each edit is keyed.
        out: folder, a :class:`workbench.store.ResultStore` keyed by :func:`evaluation_key`;
            per-fact rows go to ``out/details.jsonl`` as they finish (fsynced), and a rerun with
            the same settings skips the (method, locus, fact id) already there, so a crashed
            run resumes. Other settings, a missing config or a concurrent run on the same
            folder are refused. ``summary.csv`` is written at the end.
        method_kwargs: extra keyword arguments per method name, e.g. ``{"ft": {"steps": 10}}``.
        baseline: add the unedited model's row (method :data:`BASELINE`, locus ``"-"``).
        check_every: every that many edits, check that the weights' fingerprint is still the
            unedited one (``0`` = never); a mismatch raises.
        raise_errors: re-raise a method's error instead of recording it in the row's ``error``.
        prepend_bos: BOS before every prompt, for the edits and the scores alike (default: the
            model's editing convention, :func:`workbench.editing.hparams.editing_prepend_bos`:
            none for GPT-2 XL and GPT-J, as the originals); recorded in the key, rows and
            ``df.attrs["prepend_bos"]``.

    Returns:
        The summary (:func:`summarize`): rows (method, locus), columns (family, metric) in
        percent; ``df.attrs["details"]`` holds the per-fact rows (fractions).
    """
    from tqdm.auto import tqdm

    from .loading import model_fingerprint

    from .editing.hparams import editing_prepend_bos
    from .spans import bos_convention

    chosen = select_facts(facts, n, seed)
    resolved = [resolve_method(m) for m in methods]
    bos = editing_prepend_bos(model, prepend_bos)
    # one convention for every edit and score: methods that take prepend_bos get it explicitly,
    # the others tokenize under bos_convention below
    method_kwargs = {name: ({**((method_kwargs or {}).get(name) or {}), "prepend_bos": bos}
                            if _takes(fn, "prepend_bos") else (method_kwargs or {}).get(name))
                     for name, fn in resolved}
    fingerprint = model_fingerprint(model)
    store = None
    rows: list[dict] = []
    if out is not None:
        from .store import ResultStore

        key = {**evaluation_key(model, facts, resolved, method_kwargs, seed, fingerprint), "prepend_bos": bos}
        store = ResultStore.open(out, kind=STORE_KIND, key=key, id_fields=("method", "locus", "fact_id"),
                                 rows_name=ROWS_FILE)
        rows = store.rows()

    cells: list[tuple[str, Callable | None, str]] = [(BASELINE, None, "-")] if baseline else []
    cells += [(name, fn, locus) for name, fn in resolved for locus in loci]
    todo = [(c, f) for c in cells for f in chosen if store is None or (c[0], c[2], f.id) not in store]
    n_edits = 0
    bar = tqdm(todo, desc="evaluate", disable=not progress, dynamic_ncols=True)
    convention = bos_convention(model, bos)
    convention.__enter__()
    try:
        for (name, fn, locus), fact in bar:
            bar.set_postfix_str(f"{name}/{locus}", refresh=False)
            row: dict[str, Any] = {"method": name, "locus": locus, "fact_id": fact.id, "subject": fact.subject,
                                   "relation_id": fact.relation_id, "prompt": fact.prompt,
                                   "target_true": fact.target_true, "target_new": fact.target_new, "error": None,
                                   "prepend_bos": bos}
            ps = probes(fact)
            t0 = time.perf_counter()
            if fn is None:
                row.update(score_fact(model, fact, ps, batch_size))
            else:
                try:
                    edit = make_edit(name, fn, model, fact, locus, method_kwargs.get(name))
                except Exception as err:  # noqa: BLE001 - recorded per fact, the run goes on
                    if raise_errors:
                        raise
                    row["error"] = f"{type(err).__name__}: {err}"
                else:
                    row["edit_s"] = time.perf_counter() - t0
                    with edit.applied(model):
                        row.update(score_fact(model, fact, ps, batch_size))
                    row["edit_norm"] = math.sqrt(sum(v ** 2 for v in edit.norms().values()))
                    row.update(_scalars(edit.info))
                    n_edits += 1
                    if check_every and n_edits % check_every == 0 and model_fingerprint(model) != fingerprint:
                        raise RuntimeError(f"weights differ from the unedited model after {n_edits} edits "
                                           f"(last: {name}/{locus} on fact {fact.id}); an edit was not reverted")
            row["seconds"] = time.perf_counter() - t0
            rows.append(store.append(row) if store is not None else row)
    finally:
        convention.__exit__(None, None, None)
        bar.close()
        if store is not None:
            store.close()
    if check_every and n_edits and model_fingerprint(model) != fingerprint:
        raise RuntimeError("weights differ from the unedited model after the evaluation; an edit was not reverted")
    wanted = {(c[0], c[2]) for c in cells}
    ids = {str(f.id) for f in chosen}
    details = pd.DataFrame([r for r in rows if (r["method"], r["locus"]) in wanted and str(r["fact_id"]) in ids])
    summary = summarize(details, order=[(c[0], c[2]) for c in cells])
    if out is not None:
        flat = summary.copy()
        flat.columns = [f"{a}_{b}" for a, b in flat.columns]
        flat.to_csv(Path(out) / "summary.csv")
    summary.attrs["details"] = details
    summary.attrs["prepend_bos"] = bos
    return summary


def summarize(details: pd.DataFrame, order: Sequence[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Per-(method, locus) means of per-fact rows, in percent, plus edit and error counts.

    Columns: :data:`METRIC_COLUMNS` as a (family, metric) MultiIndex, then ``("n", "edits")``
    (facts scored) and ``("n", "errors")`` (facts whose edit failed).
    """
    cols = pd.MultiIndex.from_tuples(list(METRIC_COLUMNS) + [("n", "edits"), ("n", "errors")],
                                     names=["family", "metric"])
    if details is None or details.empty:
        return pd.DataFrame(columns=cols, index=pd.MultiIndex.from_tuples([], names=["method", "locus"]))
    keys = order or list(dict.fromkeys(zip(details["method"], details["locus"])))
    records = []
    for method, locus in keys:
        part = details[(details["method"] == method) & (details["locus"] == locus)]
        ok = part[part["error"].isna()] if "error" in part else part
        vals = []
        for fam, met in METRIC_COLUMNS:
            col = f"{fam}_{met}"
            vals.append(100.0 * ok[col].astype(float).mean() if col in ok and len(ok) else float("nan"))
        records.append(vals + [len(ok), len(part) - len(ok)])
    index = pd.MultiIndex.from_tuples(list(keys), names=["method", "locus"])
    return pd.DataFrame(records, index=index, columns=cols)


# --------------------------------------------------------------------------- tables

PAPER_COLUMNS = (("entity", "reliability", "Entity Reliability"), ("entity", "generality", "Entity Generality"),
                 ("relation", "reliability", "Relation Reliability"),
                 ("relation", "generality", "Relation Generality"), ("locality", "locality", "Locality"))
"""The paper's column order (Tables 1-2), with the workbench's locality column added."""

METHOD_LABELS = {"ft": "FT", "kn": "KN", "rome": "ROME", "memit": "MEMIT", "mend": "MEND", BASELINE: "Unedited"}


def paper_table(summary: pd.DataFrame, locus: str, metric: str = "acc", baseline: bool = True) -> pd.DataFrame:
    """One of the paper's tables: the edits keyed at ``locus``, in the paper's column order.

    ``locus="relation"`` is Table 1 (relation-based edits), ``"subject"`` Table 2 (entity-based
    edits). ``metric`` is ``"acc"`` (the paper's editing accuracy) or ``"score"``. Values in
    percent; the unedited model comes first when ``baseline``; an ``n`` column counts edits.
    """
    if metric not in ("acc", "score"):
        raise ValueError(f"metric must be 'acc' or 'score', not {metric!r}")
    rows, labels = [], []
    for (method, loc), values in summary.iterrows():
        if (method == BASELINE and baseline) or loc == locus:
            labels.append(METHOD_LABELS.get(method, method))
            rows.append([values[(fam, f"{met}_{metric}")] for fam, met, _ in PAPER_COLUMNS]
                        + [int(values[("n", "edits")])])
    table = pd.DataFrame(rows, index=pd.Index(labels, name="Method"),
                         columns=[label for *_, label in PAPER_COLUMNS] + ["n"])
    return table


def full_table(summary: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """The 2x2 generalization (method x edit locus rows; entity/relation family columns, + locality)."""
    rows, index = [], []
    for (method, loc), values in summary.iterrows():
        index.append((METHOD_LABELS.get(method, method), {"subject": "entity", "relation": "relation"}.get(loc, loc)))
        rows.append([values[(fam, f"{met}_{metric}")] for fam, met, _ in PAPER_COLUMNS]
                    + [int(values[("n", "edits")])])
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["Method", "Edit locus"]),
                        columns=[label for *_, label in PAPER_COLUMNS] + ["n"])


def to_markdown(table: pd.DataFrame, caption: str | None = None, decimals: int = 2) -> str:
    """A GitHub Markdown table (numbers with ``decimals`` places), optionally under a caption."""
    names = list(table.index.names) if isinstance(table.index, pd.MultiIndex) else [table.index.name or ""]
    header = [str(n or "") for n in names] + [str(c) for c in table.columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{decimals}f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.itertuples(index=True, name=None):  # keeps each column's type (n stays an int)
        key = row[0] if isinstance(row[0], tuple) else (row[0],)
        lines.append("| " + " | ".join([str(k) for k in key] + [cell(v) for v in row[1:]]) + " |")
    text = "\n".join(lines) + "\n"
    return f"{caption}\n\n{text}" if caption else text


def write_tables(summary: pd.DataFrame, out: str | os.PathLike, model_name: str = "") -> list[Path]:
    """Write Table 1 (relation edits), Table 2 (entity edits) and the full 2x2 table as CSV and Markdown.

    Files: ``table1_relation_edits``, ``table2_entity_edits``, ``table_2x2`` (accuracy, the
    paper's metric) and the same names with ``_score`` (CounterFact score), ``.csv`` and ``.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    what = {"acc": "accuracy: o*'s tokens are the teacher-forced argmax, all of them (%)",
            "score": "CounterFact score: P(o*) > P(o) by mean token log-prob; locality P(answer) > P(o*) (%)"}
    for metric in ("acc", "score"):
        suffix = "" if metric == "acc" else "_score"
        tables = {
            f"table1_relation_edits{suffix}": (paper_table(summary, "relation", metric),
                                               f"Table 1: relation-based edits{model_name}, {what[metric]}"),
            f"table2_entity_edits{suffix}": (paper_table(summary, "subject", metric),
                                             f"Table 2: entity-based edits{model_name}, {what[metric]}"),
            f"table_2x2{suffix}": (full_table(summary, metric),
                                   f"Edit locus x probe family{model_name}, {what[metric]}"),
        }
        for stem, (table, caption) in tables.items():
            csv = out / f"{stem}.csv"
            table.round(2).to_csv(csv)
            md = out / f"{stem}.md"
            md.write_text(to_markdown(table, caption))
            written += [csv, md]
    return written
