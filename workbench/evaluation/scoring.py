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
    ("entity_adj", "reliability"), ("entity_adj", "generality"), ("relation_adj", "reliability"),
    ("relation_adj", "generality"), ("request_adj", "reliability"), ("request_adj", "generality"),
    ("transfer_adj", "reliability"), ("transfer_adj", "generality"),
    ("bleed", "bleed"), ("other_relations", "bleed"), ("locality", "locality"), ("other_relations", "locality"),
)
"""(family, measure) pairs; a row's column is ``f"{family}_{measure}_{variant}"``. ``*_adj`` families are
bleed-adjusted (in [-1, 1]; :mod:`workbench.evaluation`), every other metric is a rate in [0, 1]."""

ADJUSTED = {"entity": "entity_adj", "relation": "relation_adj", "request": "request_adj", "transfer": "transfer_adj"}
"""Each phrasing family's bleed-adjusted twin."""


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
    for _, _, p, obj in probe_set.controls:
        pairs += [(p, new), (p, obj)]
    for p, obj, _, _ in probe_set.relations:
        pairs += [(p, new), (p, obj)]
    pairs = list(dict.fromkeys(pairs))
    scores = dict(zip(pairs, score_objects(model, pairs, batch_size))) if pairs else {}

    def one(variant: str, p: str, t: str, r: str) -> float | None:
        """One probe: ``t`` is the argmax at every token (acc), per token (tok), or P(t) > P(r) (score)."""
        if variant == "acc":
            return float(scores[(p, t)].correct)
        if variant == "tok":
            return scores[(p, t)].token_acc
        return None if t == r else float(scores[(p, t)].mean_logprob > scores[(p, r)].mean_logprob)

    def variants(items: Sequence[tuple[str, str, str]]) -> dict[str, float]:
        """items: (prompt, target, rival); acc/tok on target, score = P(target) > P(rival)."""
        return {v: _mean(one(v, p, t, r) for p, t, r in items) for v in VARIANTS}

    controls: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for fam, pos, p, obj in probe_set.controls:
        controls.setdefault((fam, pos), []).append((p, obj))

    def adjusted(fam: str, positions: range, variant: str) -> float:
        """Mean over the family's prompts at ``positions`` of (prompt gives o*) - (mean over its controls)."""
        diffs = []
        for pos in positions:
            own = one(variant, probe_set.family(fam)[pos], new, old)
            ctrl = [one(variant, p, new, obj) for p, obj in controls.get((fam, pos), ())]
            ctrl = [c for c in ctrl if c is not None]
            diffs.append(None if own is None or not ctrl else own - sum(ctrl) / len(ctrl))
        return _mean(diffs)

    groups: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for fam in PERSPECTIVES:
        prompts = probe_set.family(fam)
        groups[(fam, "reliability")] = [(p, new, old) for p in prompts[:1]]
        groups[(fam, "generality")] = [(p, new, old) for p in prompts[1:]]
    groups[("bleed", "bleed")] = [(p, new, obj) for p, obj, _ in probe_set.bleed]
    groups[("locality", "locality")] = [(p, t, new) for p, t in zip(probe_set.locality, probe_set.locality_targets)]
    groups[("other_relations", "bleed")] = [(p, new, obj) for p, obj, _, _ in probe_set.relations]
    groups[("other_relations", "locality")] = [(p, obj, new) for p, obj, _, _ in probe_set.relations]
    result: dict[str, float] = {}
    for (fam, measure), items in groups.items():
        for variant, value in variants(items).items():
            result[f"{fam}_{measure}_{variant}"] = value
    for fam in PERSPECTIVES:
        size = len(probe_set.family(fam))
        for variant in VARIANTS:
            result[f"{ADJUSTED[fam]}_reliability_{variant}"] = adjusted(fam, range(min(1, size)), variant)
            result[f"{ADJUSTED[fam]}_generality_{variant}"] = adjusted(fam, range(1, size), variant)
    other = {"entity": "relation", "relation": "entity"}.get(request or "")
    for view, source in (("request", request), ("transfer", other)):
        for fam in (view, ADJUSTED[view]):
            src = source if fam == view else ADJUSTED.get(source or "")
            for measure in ("reliability", "generality"):
                for variant in VARIANTS:
                    result[f"{fam}_{measure}_{variant}"] = (result[f"{src}_{measure}_{variant}"] if other
                                                            else float("nan"))
    return result


def score_fact(model, fact: Fact, probe_set: Probes | None = None, request: str | None = None,
               batch_size: int = 64) -> dict[str, float]:
    """:func:`score_probes` with the fact's own probes (no bleed subjects unless ``probe_set`` has them)."""
    return score_probes(model, fact, probe_set or probes(fact), request, batch_size)
