"""``trace_dataset``: average indirect effects over many facts, resumable on disk.

Buckets (reference §1, ROME's ``average_causal_effects`` notebook), for a corrupted span
with sorted positions P in a prompt of n tokens:

* first corrupted = P[0]; middle corrupted = each of P[1:-1] (one sample per token, so
  the bucket is a mean over tokens); last corrupted = P[-1] (a one-token span feeds both
  first and last);
* first after = P[-1] + 1; further = each of P[-1] + 2 .. n - 2; last token = n - 1 (when
  first after is the last token, both buckets get it; when the span ends at the last
  token, first after and further get nothing).

For a contiguous subject span this is exactly ROME's notebook. Relation-corrupted sweeps use
:data:`~workbench.tracing.results.RELATION_BUCKETS` instead (:func:`relation_bucket_positions`),
since the relation is split around the subject (``"The capital of {} is"``): relation tokens
before the subject (all but the last of them; the last of them), the uncorrupted subject
tokens, relation tokens after the subject (but the last token), and the last token.
``per_fact`` keeps every fact's full maps for other aggregations. The averaged quantity is the
indirect effect (score - p_corrupt of the fact), over the facts the model knows; the others are
skipped, counted. ``known="first_token"`` (default) keeps a fact when the clean top-1 token is
the expected object's first token; ``known="strict"`` is ROME's filter: the greedy
continuation is the *whole* object (teacher-forced argmax at every object token).

With ``out=DIR`` the sweep is a :class:`workbench.store.ResultStore`: every finished fact is
appended to ``DIR/facts.jsonl`` (one JSON object per line, fsynced;
``pandas.read_json(path, lines=True)`` reads it) beside ``DIR/config.json``, which records
everything a record depends on (:func:`sweep_key`). A rerun with the same settings skips
finished facts, skips and reports damaged lines (keeping every intact record), and refuses
a folder made with other settings, a folder whose config is missing, and a folder another
run is writing to.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..facts import Fact, check_fit, facts_hash, load_facts
from ..loading import model_fingerprint
from ..predict import object_token_ids
from ..store import ResultStore
from .api import _trace_prepared, check_method, check_noise, check_samples, check_window, prepare
from .engine import KINDS
from .noise import NoiseSpec, noise_level
from .results import BUCKETS, RELATION_BUCKETS, DatasetTraceResult, TraceResult, span_to_list
from .window import resolve_window

STORE_KIND = "trace-sweep"
"""``kind`` of a sweep's :class:`workbench.store.ResultStore`."""
ROWS_FILE = "facts.jsonl"
"""Per-fact records of a sweep folder."""


def bucket_positions(span_positions: Sequence[int], n_tokens: int) -> dict[str, list[int]]:
    """Token positions feeding each bucket of :data:`BUCKETS` (see the module docstring)."""
    pos = sorted(int(p) for p in span_positions)
    first, last, end = pos[0], pos[-1], n_tokens - 1
    return {
        "first corrupted": [first],
        "middle corrupted": pos[1:-1],
        "last corrupted": [last],
        "first after": [last + 1] if last + 1 <= end else [],
        "further": list(range(last + 2, end)),
        "last token": [end],
    }


def relation_bucket_positions(relation_positions: Sequence[int], subject_positions: Sequence[int],
                              n_tokens: int) -> dict[str, list[int]]:
    """Token positions feeding each bucket of :data:`RELATION_BUCKETS` (see the module docstring)."""
    rel, subj = sorted(int(p) for p in relation_positions), sorted(int(p) for p in subject_positions)
    end = n_tokens - 1
    before = [p for p in rel if p < subj[0]]
    return {
        "relation before subject": before[:-1],
        "last relation before subject": before[-1:],
        "subject": subj,
        "relation after subject": [p for p in rel if p > subj[-1] and p != end],
        "last token": [end],
    }


def aggregate(records: Iterable[dict], kinds: Sequence[str], n_layers: int, buckets: str = "corrupted"
              ) -> tuple[dict[str, pd.DataFrame], pd.Series]:
    """Mean IE per bucket and layer over kept records (dicts with scores, p_corrupt, spans, n_tokens).

    ``buckets="corrupted"``: :data:`BUCKETS` around the corrupted span; ``"relation"``:
    :data:`RELATION_BUCKETS` (needs each record's ``relation_span`` and ``subject_span``).
    """
    if buckets not in ("corrupted", "relation"):
        raise ValueError(f"buckets must be 'corrupted' or 'relation', not {buckets!r}")
    names = BUCKETS if buckets == "corrupted" else RELATION_BUCKETS
    sums = {k: np.zeros((len(names), n_layers)) for k in kinds}
    counts = np.zeros(len(names), dtype=np.int64)
    for rec in records:
        if not rec["kept"]:
            continue
        if buckets == "corrupted":
            positions = bucket_positions(rec["corrupted_span"], rec["n_tokens"])
        else:
            positions = relation_bucket_positions(rec["relation_span"], rec["subject_span"], rec["n_tokens"])
        for b, name in enumerate(names):
            counts[b] += len(positions[name])
            for kind in kinds:
                ie = np.asarray(rec["scores"][kind], dtype=np.float64) - rec["p_corrupt"]
                for p in positions[name]:
                    sums[kind][b] += ie[p]
    index = pd.Index(names, name="bucket")
    columns = pd.Index(range(n_layers), name="layer")
    with np.errstate(invalid="ignore", divide="ignore"):
        aie = {k: pd.DataFrame(sums[k] / counts[:, None], index=index, columns=columns) for k in kinds}
    return aie, pd.Series(counts, index=index, name="count")


def sweep_key(model, facts: Sequence[Fact], *, corrupt: str, kinds: Sequence[str], samples: int, noise: NoiseSpec,
              nu: float, window: int, seed: int, prepend_bos: bool | None, precision: str,
              replace: bool) -> dict:
    """Everything that determines a sweep's per-fact record: the store key of ``trace_dataset(out=...)``."""
    return {
        "model_spec": getattr(model, "workbench_spec", None), "model_fingerprint": model_fingerprint(model),
        "facts_hash": facts_hash(facts), "n_facts": len(facts), "corrupt": corrupt, "kinds": list(kinds),
        "samples": samples, "noise": noise if isinstance(noise, str) else float(noise), "noise_level": nu,
        "window": window, "seed": seed, "prepend_bos": prepend_bos, "precision": precision, "replace": replace,
    }


def _record(index: int, fact: Fact, result: TraceResult | None, prep, kept: bool, p_clean: float,
            answer_id: int, answer: str, expected_id: int) -> dict:
    rec = {
        "index": index, "id": fact.id if isinstance(fact.id, (int, str)) else str(fact.id),
        "prompt": fact.prompt, "subject": fact.subject, "target": fact.target_true, "kept": kept,
        "answer_id": answer_id, "answer": answer, "expected_id": expected_id, "p_clean": p_clean,
        "n_tokens": len(prep.tokens), "corrupted_span": span_to_list(prep.corrupted_span),
        "subject_span": span_to_list(prep.subject_span), "relation_span": span_to_list(prep.relation_span),
        "p_corrupt": None, "scores": None,
    }
    if result is not None:
        rec["p_corrupt"] = result.p_corrupt
        rec["scores"] = {k: v.tolist() for k, v in result.scores.items()}
    return rec


def trace_dataset(model, facts: Sequence[Fact] | str, *, corrupt: str = "subject", kinds: Sequence[str] = KINDS,
                  out: str | os.PathLike | None = None, samples: int = 10, noise: NoiseSpec = "s3",
                  window: int | None = None, seed: int = 1, prepend_bos: bool | None = None, precision: str = "exact",
                  replace: bool = False, engine: str = "auto", max_batch: int | None = None,
                  known: str = "first_token", progress: bool = True, workers: int | None = None,
                  ray_address: str | None = None, method: str = "exact") -> DatasetTraceResult:
    """Trace every fact (``corrupt`` = ``"subject"`` or ``"relation"``) and average IE per bucket.

    ``facts``: :class:`Fact` objects or a source for :func:`workbench.load_facts`. The
    noise rule ``"s<x>"`` is evaluated once over all the facts' subjects. Facts whose
    clean top-1 is not the expected object's first token are skipped and counted. ``out``
    makes the sweep resumable (module docstring). ``known``: ``"first_token"`` or ROME's
    ``"strict"`` known-fact filter (module docstring). ``workers=N`` traces on N Ray actors
    (``ray_address``: a running cluster; :mod:`workbench.scale`): same store, same results;
    a fact whose worker kept dying gets a record with an ``error`` that is not stored, so a
    rerun retries it. Other arguments as in :func:`trace` (``method="attribution"``: first-order
    estimates, recorded in the result and the folder's key); every fact is traced with the
    same dataset-level nu, recorded in the result.
    """
    from ..progress import progress_bar

    from ..scale import check_workers, map_facts

    check_workers(workers, ray_address)

    if isinstance(facts, (str, os.PathLike)):
        facts = load_facts(facts)
    facts = list(facts)
    kinds = tuple(kinds)
    window = resolve_window(model, window)
    if corrupt not in ("subject", "relation"):
        raise ValueError(f"trace_dataset corrupts 'subject' or 'relation', not {corrupt!r}")
    if known not in ("first_token", "strict"):
        raise ValueError(f"known must be 'first_token' or 'strict', not {known!r}")
    check_samples(samples)
    check_window(window, int(model.cfg.n_layers))
    engine = check_method(method, engine)
    kind, value = check_noise(noise)
    check_fit(model, facts, prepend_bos)
    nu = noise_level(model, [f.subject for f in facts], noise) if kind == "std" else value
    rule = f"{noise} over {len(facts)} subjects" if kind == "std" else ("given" if kind == "level" else str(noise))
    noise_arg = f"u{nu!r}" if kind == "uniform" else nu
    L = model.cfg.n_layers
    store = None
    if out is not None:
        key = sweep_key(model, facts, corrupt=corrupt, kinds=kinds, samples=samples, noise=noise, nu=nu,
                        window=window, seed=seed, prepend_bos=prepend_bos, precision=precision, replace=replace)
        if known != "first_token":  # folders of first-token sweeps stay resumable
            key["known"] = known
        if method != "exact":  # and so do folders of exact sweeps
            key["method"] = method
        store = ResultStore.open(out, kind=STORE_KIND, key=key, id_fields=("index",), rows_name=ROWS_FILE)
    records: dict[int, dict] = {}
    try:
        if store is not None:
            records = {i: store.get(i) for i in range(len(facts)) if i in store}
        settings = dict(corrupt=corrupt, kinds=kinds, samples=samples, noise=noise_arg, window=window, seed=seed,
                        prepend_bos=prepend_bos, precision=precision, replace=replace, engine=engine,
                        max_batch=max_batch, known=known)
        todo = [(i, (i, fact)) for i, fact in enumerate(facts) if i not in records]
        bar = progress_bar(total=len(facts), initial=len(records), enabled=progress, desc=f"tracing ({corrupt})",
                           unit="fact")
        for i, rec in map_facts(model, _trace_item, todo, shared=settings, workers=workers, ray_address=ray_address,
                                on_failure=_failed_record, bar=bar):
            rec["noise_level"] = nu
            records[i] = store.append(rec) if store is not None and not rec.get("error") else rec
        bar.close()
    finally:
        if store is not None:
            store.close()
    records = [records[i] for i in range(len(facts))]
    result = _summarize(records, kinds, L, corrupt, nu)
    result.noise_rule, result.method = rule, method
    return result


def _knows_whole_object(model, fact: Fact) -> bool:
    """ROME's strict filter: the greedy continuation of the prompt is the whole expected object."""
    from ..predict import score_objects

    return score_objects(model, [(fact.prompt, fact.target_true)])[0].correct


def _trace_item(model, item: tuple[int, Fact], settings: dict) -> dict:
    """One fact's record: the per-fact work of :func:`trace_dataset` (run here or on a worker)."""
    index, fact = item
    return _trace_fact(model, index, fact, **settings)


def _failed_record(index: int, item: tuple[int, Fact], error: str) -> dict:
    """The record of a fact whose worker kept dying: not kept, with the error (not stored)."""
    _, fact = item
    rec = dict.fromkeys(("answer_id", "answer", "expected_id", "p_clean", "n_tokens", "corrupted_span",
                         "subject_span", "relation_span", "p_corrupt", "scores"))
    rec.update(index=index, id=fact.id if isinstance(fact.id, (int, str)) else str(fact.id), prompt=fact.prompt,
               subject=fact.subject, target=fact.target_true, kept=False, error=error)
    return rec


def _trace_fact(model, index: int, fact: Fact, corrupt: str, kinds: tuple, samples: int, noise, window: int,
                seed: int, prepend_bos, precision: str, replace: bool, engine: str, max_batch,
                known: str = "first_token") -> dict:
    prep = prepare(model, fact.prompt, subject=fact.subject, corrupt=corrupt, template=fact.template,
                   samples=samples, noise=noise, seed=seed, replace=replace, prepend_bos=prepend_bos,
                   precision=precision, engine=engine, max_batch=max_batch)
    expected = object_token_ids(model, fact.target_true)[0]
    top = int(prep.engine.clean_probs.argmax())
    p_clean = float(prep.engine.clean_probs[top])
    answer = model.tokenizer.decode([top])
    if top != expected or (known == "strict" and not _knows_whole_object(model, fact)):
        return _record(index, fact, None, prep, False, p_clean, top, answer, expected)
    result = _trace_prepared(model, prep, fact.prompt, corrupt, kinds, window, top, seed)
    return _record(index, fact, result, prep, True, p_clean, top, answer, expected)


def _summarize(records: list[dict], kinds: tuple, n_layers: int, corrupt: str, nu: float) -> DatasetTraceResult:
    aie, counts = aggregate(records, kinds, n_layers, "relation" if corrupt == "relation" else "corrupted")
    rows = []
    for rec in records:
        row = {k: rec[k] for k in ("index", "id", "prompt", "subject", "target", "kept", "answer", "p_clean",
                                   "p_corrupt", "n_tokens")}
        for k in ("corrupted_span", "subject_span", "relation_span"):
            row[k] = tuple(rec[k]) if rec[k] is not None else None
        if "error" in rec:  # its worker kept dying (workers=N); not stored, a rerun retries it
            row["error"] = rec["error"]
        for kind in kinds:
            row[f"scores_{kind}"] = (np.asarray(rec["scores"][kind], dtype=np.float32)
                                     if rec["scores"] is not None else None)
        rows.append(row)
    per_fact = pd.DataFrame(rows)
    kept = [r for r in records if r["kept"]]
    mean = lambda key: float(np.mean([r[key] for r in kept])) if kept else float("nan")  # noqa: E731
    return DatasetTraceResult(aie=aie, counts=counts, n_facts=len(records), n_skipped=len(records) - len(kept),
                              p_clean=mean("p_clean"), p_corrupt=mean("p_corrupt"), corrupt=corrupt, kinds=kinds,
                              noise_level=nu, per_fact=per_fact)
