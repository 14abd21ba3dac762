"""The paper's tables (Table 1: relation-based requests, Table 2: entity-based), the full cube,
and their Markdown and CSV files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..perspective import DEFAULT_LOCUS, PERSPECTIVES
from .methods import BASELINE, METHOD_LABELS, PAPER_ORDER
from .scoring import VARIANTS
from .statistics import CELL

SPECIFICITY_COLUMNS = (("bleed", "bleed", "Bleed"), ("other_relations", "bleed", "Other-relation Bleed"),
                       ("locality", "locality", "Locality"), ("other_relations", "locality", "Other-relation Locality"))
"""Along the relation (other subjects: bleed), along the subject (its other relations), the neighbourhood."""

PAPER_COLUMNS = (("entity", "reliability", "Entity Reliability"), ("entity", "generality", "Entity Generality"),
                 ("relation", "reliability", "Relation Reliability"),
                 ("relation", "generality", "Relation Generality"), *SPECIFICITY_COLUMNS)
"""The paper's column order (Tables 1-2), then the workbench's bleed and locality columns; :func:`paper_table`
puts the transfer family's bleed-adjusted columns (:data:`ADJUSTED_COLUMNS`) before bleed."""

ADJUSTED_COLUMNS = {
    "entity": (("entity_adj", "reliability", "Entity Reliability, bleed-adj."),
               ("entity_adj", "generality", "Entity Generality, bleed-adj.")),
    "relation": (("relation_adj", "reliability", "Relation Reliability, bleed-adj."),
                 ("relation_adj", "generality", "Relation Generality, bleed-adj.")),
}
"""Each phrasing family's bleed-adjusted columns (transfer minus the matched controls' rate of o*)."""

CUBE_COLUMNS = (("request", "reliability", "Request Reliability"), ("request", "generality", "Request Generality"),
                ("transfer", "reliability", "Transfer Reliability"),
                ("transfer", "generality", "Transfer Generality"),
                ("transfer_adj", "reliability", "Transfer Reliability, bleed-adj."),
                ("transfer_adj", "generality", "Transfer Generality, bleed-adj."), *SPECIFICITY_COLUMNS)
"""Columns of the full cube: the request family, the other (transfer) family raw and bleed-adjusted, bleed
and the subject's other relations, locality."""

VARIANT_TEXT = {
    "acc": "accuracy: o*'s tokens are all the teacher-forced argmax (%; bleed-adj.: minus the same on the "
           "matched controls)",
    "tok": "per-token accuracy: mean over o*'s tokens of argmax = token (%; bleed-adj.: minus the same on the "
           "matched controls)",
    "score": "CounterFact score: P(o*) > P(o) by mean token log-prob; bleed P(o*) > P(own object); "
             "locality P(answer) > P(o*) (%; bleed-adj.: minus the controls' P(o*) > P(own object))",
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
                baseline: bool = True, adjusted: bool = True) -> pd.DataFrame:
    """One of the paper's tables: edits requested from ``request`` keyed at ``locus``.

    ``request="relation"`` is Table 1 (relation-based edits), ``"entity"`` Table 2; ``locus``
    defaults to the paper's pairing. Columns in the paper's order (entity reliability and
    generality, relation reliability and generality), then (when ``adjusted``) the other family's
    (the transfer's) bleed-adjusted reliability and generality, then bleed, other-relation bleed,
    locality and other-relation locality, each with ``" lo"``/``" hi"`` interval columns, then
    ``n`` (edits scored) and ``failed``. Rows: the unedited model (when ``baseline``), then the
    methods in the paper's order.
    """
    if request not in PERSPECTIVES:
        raise ValueError(f"request must be one of {PERSPECTIVES}, not {request!r}")
    locus = locus or DEFAULT_LOCUS[request]
    cells = [c for c in summary.index if c[1] == request and (c[2] == locus or (baseline and c[0] == BASELINE))]
    cells.sort(key=lambda c: _method_rank(c[0]))
    other = "entity" if request == "relation" else "relation"
    columns = PAPER_COLUMNS[:4] + (ADJUSTED_COLUMNS[other] if adjusted else ()) + PAPER_COLUMNS[4:]
    return _table(summary, cells, columns, variant, ["Method"], lambda c: (METHOD_LABELS.get(c[0], c[0]),))


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
