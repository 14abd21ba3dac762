"""The metrics of one fact: its probe families scored on the model as it is now.

Every metric comes in the three :data:`VARIANTS` (all-tokens accuracy, per-token accuracy,
CounterFact score) for each (family, measure) of :data:`METRICS`; see :mod:`workbench.evaluation`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..facts import Fact
from ..perspective import PERSPECTIVES, Probes, probes
from ..predict import score_objects

VARIANTS = ("acc", "tok", "score")
"""Metric variants: all-tokens accuracy, per-token accuracy, CounterFact score."""

METRICS: tuple[tuple[str, str], ...] = (
    ("entity", "reliability"), ("entity", "generality"), ("relation", "reliability"), ("relation", "generality"),
    ("request", "reliability"), ("request", "generality"), ("transfer", "reliability"), ("transfer", "generality"),
    ("bleed", "bleed"), ("locality", "locality"),
)
"""(family, measure) pairs; a row's column is ``f"{family}_{measure}_{variant}"``."""


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


def score_fact(model, fact: Fact, probe_set: Probes | None = None, request: str | None = None,
               batch_size: int = 64) -> dict[str, float]:
    """:func:`score_probes` with the fact's own probes (no bleed subjects unless ``probe_set`` has them)."""
    return score_probes(model, fact, probe_set or probes(fact), request, batch_size)
