"""The run: one edit scored and reverted (:func:`evaluate_one`), and the loop over the protocol
cube (methods x request perspectives x key loci x facts) with its resumable store (:func:`evaluate`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from ..facts import Fact, check_unique_ids, facts_hash
from ..identity import model_identity
from ..perspective import (DEFAULT_LOCUS, PERSPECTIVES, Phrasings, Probes, bleed_subjects, other_relations,
                           phrasings, probes, relation_index, request_fact, subject_index)
from .methods import (BASELINE, METHODS, _takes, check_method_kwargs, default_methods, make_edit, preset_name,
                      resolve_method, resolved_hparams, stats_key, usable_methods, with_shared_stats)
from .scoring import score_probes
from .statistics import summarize

# --------------------------------------------------------------------------- one edit

def _scalars(info: dict) -> dict[str, Any]:
    """The edit's scalar diagnostics (numbers, short strings), prefixed ``info_``."""
    return {f"info_{k}": v for k, v in info.items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) < 80)}


def evaluate_one(model, fact: Fact, method: str | Callable | tuple[str, Callable] | None, request: str,
                 locus: str | None, probe_set: Probes, *, method_kwargs: dict | None = None,
                 ph: Phrasings | None = None, batch_size: int = 64, raise_errors: bool = False,
                 prepend_bos: bool | None = None, preset: str | None = None) -> dict[str, Any]:
    """Edit ``fact`` posed from ``request`` keyed at ``locus``, score ``probe_set``, revert: one row.

    ``method`` is a registered name, a callable, a ``(name, callable)`` pair, or ``None`` for
    the unedited model (method :data:`BASELINE`, locus ``"-"``). The method only ever sees
    :func:`~workbench.perspective.request_fact` (the request prompt, no probe). The model is
    left as it was (the edit is applied inside a ``with`` block). A failing method gives a row
    with ``failed=True`` and the ``error``, unless ``raise_errors``. ``prepend_bos``: one BOS
    convention for the edit and the scores (default: the model's editing convention,
    :func:`workbench.editing.hparams.editing_prepend_bos`), recorded in the row. ``preset``: the
    method's preset name when the caller resolved it already (:func:`evaluate` does, once per method).
    """
    from ..editing.hparams import editing_prepend_bos
    from ..spans import bos_convention

    bos = editing_prepend_bos(model, prepend_bos)
    with bos_convention(model, bos):
        row = _evaluate_one(model, fact, method, request, locus, probe_set, method_kwargs, ph, batch_size,
                            raise_errors, bos, preset)
    row["prepend_bos"] = bos
    return row


def _evaluate_one(model, fact: Fact, method, request: str, locus: str | None, probe_set: Probes,
                  method_kwargs: dict | None, ph: Phrasings | None, batch_size: int, raise_errors: bool,
                  bos: bool, preset: str | None = None) -> dict[str, Any]:
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
                           "preset": "-" if fn is None else (preset or preset_name(name, model, method_kwargs)),
                           "model_identity": model_identity(model).label,
                           "n_bleed": len(probe_set.bleed), "n_controls": len(probe_set.controls),
                           "n_other_relations": len(probe_set.relations), "failed": False, "error": None}
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
    from ..loading import model_fingerprint

    name, fn, request, locus, fact, ph, ps = item
    row = evaluate_one(model, fact, None if fn is None else (name, fn), request, locus, ps,
                       method_kwargs=settings["method_kwargs"].get(name), ph=ph, batch_size=settings["batch_size"],
                       raise_errors=settings["raise_errors"], prepend_bos=settings["prepend_bos"],
                       preset=settings.get("presets", {}).get(name))
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
    from ..editing.common import LOCI

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


PROBES_VERSION = 2
"""Version of the probe families and metrics a row holds (2: matched controls, bleed-adjusted and
other-relation metrics); part of the store key, so a folder of older rows is refused, not mixed."""


def probe_bank_version(bank: str | os.PathLike | None = None) -> str:
    """Content hash of the phrasing-template bank (probes and requests, and so rows, depend on it)."""
    from ..perspective import _TEMPLATE_BANK

    return hashlib.sha256(Path(bank or _TEMPLATE_BANK).read_bytes()).hexdigest()[:16]


def evaluation_key(model, facts: Sequence[Fact], resolved: Sequence[tuple[str, Callable]],
                   method_kwargs: dict[str, dict], seed: int, fingerprint: str | None = None,
                   bleed_subjects_per_fact: int = 5, other_relations_per_fact: int | None = None) -> dict:
    """Everything an evaluation row depends on: the store key of ``evaluate(out=...)``.

    The facts hash covers every fact (all fields; bleed subjects come from the whole dataset),
    so a larger ``n`` reuses the rows of a smaller one; each method contributes its kwargs and
    resolved hyperparameters with the preset name (a custom callable is known by its name and
    kwargs only: change its name when its code changes); ROME's and MEMIT's covariance corpus
    enters by content (:func:`workbench.editing.corpus.corpus_id`), not by path.
    """
    from ..loading import model_fingerprint

    methods = {}
    for name, fn in resolved:
        kwargs = method_kwargs.get(name) or {}
        target = METHODS.get(name)
        hparams = resolved_hparams(name, model, kwargs) if target else None
        recorded = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in kwargs.items()}
        if "stats" in kwargs:  # the statistics' content, not a path or an object's repr
            recorded["stats"] = stats_key(kwargs["stats"], (hparams or {}).get("layers") or [])
        methods[name] = {"function": target if isinstance(target, str) else "custom callable",
                         "kwargs": recorded, "hparams": hparams}
        if (isinstance(hparams, dict) and "mom2_dataset" in hparams and hparams.get("mom2_adjustment", True)
                and "stats" not in kwargs):
            from ..editing.corpus import corpus_id

            # by content: a corpus file replaced in place must not reuse rows computed with the old text
            methods[name]["corpus"] = corpus_id(model, hparams["mom2_dataset"])
    return {"model_spec": getattr(model, "workbench_spec", None),
            "model_identity": model_identity(model).to_dict(),
            "model_fingerprint": fingerprint or model_fingerprint(model),
            "facts_hash": facts_hash(facts), "n_facts": len(facts), "seed": seed,
            "probe_bank": probe_bank_version(), "bleed_subjects_per_fact": bleed_subjects_per_fact,
            "other_relations_per_fact": "all" if other_relations_per_fact is None else other_relations_per_fact,
            "probes": PROBES_VERSION, "methods": methods}


def evaluate(model, facts: Sequence[Fact], methods: Sequence[str | Callable] | None = None,
             requests: Sequence[str] = PERSPECTIVES, loci: Sequence[str] | None = None, n: int | None = None,
             out: str | os.PathLike | None = None, *, seed: int = 0, method_kwargs: dict[str, dict] | None = None,
             baseline: bool = True, bleed_subjects_per_fact: int = 5, other_relations_per_fact: int | None = None,
             check_every: int = 50,
             raise_errors: bool = False, progress: bool = True, batch_size: int = 64,
             n_boot: int = 1000, prepend_bos: bool | None = None, workers: int | None = None,
             ray_address: str | None = None, strict_presets: bool | None = None) -> pd.DataFrame:
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
        bleed_subjects_per_fact: other subjects of the relation probed for bleed (x 2 phrasings) and
            used as the matched controls of bleed-adjusted transfer (x every phrasing).
        other_relations_per_fact: the subject's facts of other relations probed (x 2 phrasings),
            a seeded sample of that many; ``None``: all the dataset has.
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
        strict_presets: an unknown model (:mod:`workbench.identity`) is an error before any edit,
            instead of a warning and the methods' generic presets (default: the process-wide
            setting, :func:`workbench.editing.presets.strict_presets`).

    Returns:
        The summary (:func:`summarize`): rows (method, request, locus), columns (family,
        measure_variant) in percent; ``attrs["details"]`` the per-edit rows, ``attrs["long"]``
        every cell's mean, interval and ``n``.
    """
    from ..editing.presets import strict_presets as strict_context
    from ..editing.presets import strict_presets_on

    strict = strict_presets_on() if strict_presets is None else bool(strict_presets)
    with strict_context(strict):
        return _evaluate(model, facts, methods, requests, loci, n, out, seed, method_kwargs or {}, baseline,
                         bleed_subjects_per_fact, other_relations_per_fact, check_every, raise_errors, progress,
                         batch_size, n_boot, prepend_bos, workers, ray_address)


def _evaluate(model, facts, methods, requests, loci, n, out, seed, method_kwargs, baseline, bleed_subjects_per_fact,
              other_relations_per_fact, check_every, raise_errors, progress, batch_size, n_boot, prepend_bos,
              workers, ray_address) -> pd.DataFrame:
    from ..editing.hparams import editing_prepend_bos
    from ..loading import model_fingerprint
    from ..progress import progress_bar
    from ..scale import check_workers, map_facts

    check_workers(workers, ray_address)
    check_method_kwargs(method_kwargs)
    chosen = select_facts(facts, n, seed)
    check_unique_ids(chosen, "facts")  # rows (and the prompts each row is scored on) are looked up by fact id
    index, by_subject = relation_index(facts), subject_index(facts)
    asked = [resolve_method(m) for m in (methods if methods is not None else default_methods())]
    resolved = usable_methods(model, asked, method_kwargs, explicit=methods is not None)  # e.g. no MEND editor
    # one preset resolution per method, here: an unknown model warns (or, strict, fails) before any edit
    presets = {name: preset_name(name, model, method_kwargs.get(name)) for name, _ in resolved}
    bos = editing_prepend_bos(model, prepend_bos)
    cells = cells_for(requests, loci)
    fingerprint = model_fingerprint(model)
    store = None
    rows: list[dict] = []
    if out is not None:
        from ..store import ResultStore

        key = {**evaluation_key(model, facts, resolved, method_kwargs, seed, fingerprint, bleed_subjects_per_fact,
                                other_relations_per_fact),
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
            others = bleed_subjects(fact, index, bleed_subjects_per_fact, seed)
            relations = other_relations(fact, by_subject, other_relations_per_fact, seed)
            prepared[str(fact.id)] = (ph, probes(fact, others, ph=ph, relations=relations))
    items = [(k, (name, fn, request, locus, fact, *prepared[str(fact.id)]))
             for k, ((name, fn, request, locus), fact) in enumerate(todo)]
    settings = {"method_kwargs": method_kwargs, "presets": presets, "batch_size": batch_size, "raise_errors": raise_errors,
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
