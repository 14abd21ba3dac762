"""Per-cell statistics of evaluation rows: means over facts with percentile-bootstrap intervals."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .scoring import METRICS, VARIANTS

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
