"""``trace_dataset``: average indirect effects over many facts, resumable on disk.

Buckets (reference §1, ROME's ``average_causal_effects`` notebook), for a corrupted span
with sorted positions P in a prompt of n tokens:

* first corrupted = P[0]; middle corrupted = each of P[1:-1] (one sample per token, so
  the bucket is a mean over tokens); last corrupted = P[-1] (a one-token span feeds both
  first and last);
* first after = P[-1] + 1; further = each of P[-1] + 2 .. n - 2; last token = n - 1 (when
  first after is the last token, both buckets get it; when the span ends at the last
  token, first after and further get nothing).

For a contiguous subject span this is exactly ROME's notebook. For a non-contiguous span
(the relation around the subject, ``"The capital of {} is"``) the tokens inside the span's
hull that are not corrupted (the subject) and the tokens before the span are in no
bucket; ``per_fact`` keeps every fact's full maps for other aggregations. The averaged
quantity is the indirect effect (score - p_corrupt of the fact), over facts whose clean
top-1 token is the first token of the expected object; the others are skipped, counted.

With ``out=DIR`` every finished fact is appended to ``DIR/facts.jsonl`` (one JSON object
per line, flushed; ``pandas.read_json(path, lines=True)`` reads it) beside
``DIR/config.json``; a rerun with the same settings skips finished facts and tolerates a
truncated last line, and a different configuration is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..facts import Fact, load_facts
from ..loading import model_fingerprint
from ..predict import object_token_ids
from .api import _trace_prepared, prepare
from .engine import KINDS
from .noise import NoiseSpec, noise_level, parse_noise
from .results import BUCKETS, DatasetTraceResult, TraceResult, span_to_list


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


def aggregate(records: Iterable[dict], kinds: Sequence[str], n_layers: int
              ) -> tuple[dict[str, pd.DataFrame], pd.Series]:
    """Mean IE per bucket and layer over kept records (dicts with scores, p_corrupt, span, n_tokens)."""
    sums = {k: np.zeros((len(BUCKETS), n_layers)) for k in kinds}
    counts = np.zeros(len(BUCKETS), dtype=np.int64)
    for rec in records:
        if not rec["kept"]:
            continue
        buckets = bucket_positions(rec["corrupted_span"], rec["n_tokens"])
        for b, name in enumerate(BUCKETS):
            counts[b] += len(buckets[name])
            for kind in kinds:
                ie = np.asarray(rec["scores"][kind], dtype=np.float64) - rec["p_corrupt"]
                for p in buckets[name]:
                    sums[kind][b] += ie[p]
    index = pd.Index(BUCKETS, name="bucket")
    columns = pd.Index(range(n_layers), name="layer")
    with np.errstate(invalid="ignore", divide="ignore"):
        aie = {k: pd.DataFrame(sums[k] / counts[:, None], index=index, columns=columns) for k in kinds}
    return aie, pd.Series(counts, index=index, name="count")


def _facts_hash(facts: Sequence[Fact]) -> str:
    digest = hashlib.sha256()
    for f in facts:
        digest.update(json.dumps([str(f.id), f.subject, f.template, f.target_true]).encode())
    return digest.hexdigest()[:16]


def _read_done(path: Path) -> list[dict]:
    """Finished records of ``facts.jsonl``; a truncated last line is dropped (and cut from the file)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good = [], 0
    for line in raw.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated line")
            records.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return records


def _open_out(out: str | os.PathLike, config: dict) -> tuple[Path, dict[int, dict]]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(
                f"{folder} holds a sweep with other settings (differs in: {', '.join(diff)}); "
                "pick another --out directory (or delete this one) to start a new sweep"
            )
    else:
        cfg_path.write_text(json.dumps(config, indent=2))
    done = {int(r["index"]): r for r in _read_done(folder / "facts.jsonl")}
    return folder / "facts.jsonl", done


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
                  window: int = 10, seed: int = 1, prepend_bos: bool | None = None, precision: str = "exact",
                  replace: bool = False, engine: str = "auto", max_batch: int | None = None,
                  progress: bool = True) -> DatasetTraceResult:
    """Trace every fact (``corrupt`` = ``"subject"`` or ``"relation"``) and average IE per bucket.

    ``facts``: :class:`Fact` objects or a source for :func:`workbench.load_facts`. The
    noise rule ``"s<x>"`` is evaluated once over all the facts' subjects. Facts whose
    clean top-1 is not the expected object's first token are skipped and counted. ``out``
    makes the sweep resumable (module docstring). Other arguments as in :func:`trace`.
    """
    from tqdm.auto import tqdm

    if isinstance(facts, (str, os.PathLike)):
        facts = load_facts(facts)
    facts = list(facts)
    kinds = tuple(kinds)
    if corrupt not in ("subject", "relation"):
        raise ValueError(f"trace_dataset corrupts 'subject' or 'relation', not {corrupt!r}")
    kind, value = parse_noise(noise)
    nu = noise_level(model, [f.subject for f in facts], noise) if kind == "std" else value
    noise_arg = f"u{nu!r}" if kind == "uniform" else nu
    L = model.cfg.n_layers
    path, done = None, {}
    if out is not None:
        config = {
            "model_spec": getattr(model, "workbench_spec", None), "model_fingerprint": model_fingerprint(model),
            "facts_hash": _facts_hash(facts), "n_facts": len(facts), "corrupt": corrupt, "kinds": list(kinds),
            "samples": samples, "noise": noise if isinstance(noise, str) else float(noise), "noise_level": nu,
            "window": window, "seed": seed, "prepend_bos": prepend_bos, "precision": precision, "replace": replace,
        }
        path, done = _open_out(out, config)
    records: list[dict] = []
    fh = open(path, "a") if path is not None else None
    try:
        bar = tqdm(total=len(facts), initial=sum(1 for i in done if i < len(facts)), disable=not progress,
                   desc=f"tracing ({corrupt})", unit="fact")
        for i, fact in enumerate(facts):
            if i in done:
                records.append(done[i])
                continue
            rec = _trace_fact(model, i, fact, corrupt, kinds, samples, noise_arg, window, seed, prepend_bos,
                              precision, replace, engine, max_batch)
            records.append(rec)
            if fh is not None:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
            bar.update(1)
        bar.close()
    finally:
        if fh is not None:
            fh.close()
    return _summarize(records, kinds, L, corrupt, nu)


def _trace_fact(model, index: int, fact: Fact, corrupt: str, kinds: tuple, samples: int, noise, window: int,
                seed: int, prepend_bos, precision: str, replace: bool, engine: str, max_batch) -> dict:
    prep = prepare(model, fact.prompt, subject=fact.subject, corrupt=corrupt, template=fact.template,
                   samples=samples, noise=noise, seed=seed, replace=replace, prepend_bos=prepend_bos,
                   precision=precision, engine=engine, max_batch=max_batch)
    expected = object_token_ids(model, fact.target_true)[0]
    top = int(prep.engine.clean_probs.argmax())
    p_clean = float(prep.engine.clean_probs[top])
    answer = model.tokenizer.decode([top])
    if top != expected:
        return _record(index, fact, None, prep, False, p_clean, top, answer, expected)
    result = _trace_prepared(model, prep, fact.prompt, corrupt, kinds, window, top, seed)
    return _record(index, fact, result, prep, True, p_clean, top, answer, expected)


def _summarize(records: list[dict], kinds: tuple, n_layers: int, corrupt: str, nu: float) -> DatasetTraceResult:
    aie, counts = aggregate(records, kinds, n_layers)
    rows = []
    for rec in records:
        row = {k: rec[k] for k in ("index", "id", "prompt", "subject", "target", "kept", "answer", "p_clean",
                                   "p_corrupt", "n_tokens")}
        for k in ("corrupted_span", "subject_span", "relation_span"):
            row[k] = tuple(rec[k]) if rec[k] is not None else None
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
