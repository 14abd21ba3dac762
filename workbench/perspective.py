"""Request perspectives and probe families of an edit (reference §7).

The paper's RQ2 edits a fact "from the entity's side" and "from the relation's side". The
workbench reads that as the *phrasing of the edit request*:

* **entity-based** request: the fact phrased subject-first (``"Mira Wilde was born in"``);
* **relation-based** request: the fact phrased relation-first (``"The birthplace of Mira Wilde is"``).

A prompt is *subject-first* when it begins with the subject, once CounterFact's prepended
noise sentence (``"An album was recorded ... never released. Danielle Darrieux spoke the
language"``) is stripped; every other prompt has relation words before the subject and is
*relation-first*. Every editing method receives the request as a :class:`~workbench.facts.Fact`
whose ``template`` is the request's phrasing and which carries no other prompt
(:func:`request_fact`): no method can see a probe.

Phrasings of a fact (:func:`phrasings`): the bundled world lists both kinds per fact
(``subject_first_prompts`` / ``relation_first_prompts``). CounterFact records have one rewrite
prompt and noisy paraphrases; they are classified, and the shipped bank
``workbench/data/relation_templates.json`` adds both kinds per relation id. Each family's first
prompt is the request of that perspective (the rewrite prompt when it has that kind, else the
first clean phrasing of the kind); the rest are its generality prompts.

Probe families (:func:`probes`): the entity-phrased and relation-phrased families, **bleed**
(other subjects of the same relation in both request phrasings, scored for o*), **controls**
(every prompt of both families with each bleed subject in the subject's place: the matched
controls of bleed-adjusted transfer), **other relations** (the subject's facts of other
relations, :func:`other_relations`, in both request phrasings: scored for o* and for their own
objects) and **locality** (the fact's neighbourhood prompts with their own answers).

Bleed looks along the relation (other subjects, same words) and the other-relation probes
along the subject (same subject, other relations): an edit is knowledge of *this* fact only
where both stay put.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from .facts import Fact

PERSPECTIVES = ("entity", "relation")
"""Request perspectives: subject-first (entity-based) and relation-first (relation-based) requests."""

DEFAULT_LOCUS = {"entity": "subject", "relation": "relation"}
"""The paper's pairing of request perspective and key locus (other pairings are ablations)."""

BANK_KEYS = {"entity": "subject_first", "relation": "relation_first"}
"""Keys of the template bank holding each perspective's phrasings."""

_TEMPLATE_BANK = Path(__file__).resolve().parent / "data" / "relation_templates.json"
_SENTENCE_END = re.compile(r"(?:[.!?][\"')\]]*\s+|\n+)")


# --------------------------------------------------------------------------- phrasing kinds

@lru_cache(maxsize=4)
def _load_bank(path: str) -> dict[str, dict[str, tuple[str, ...]]]:
    raw = json.loads(Path(path).read_text())
    return {rid: {kind: tuple(v.get(key, ())) for kind, key in BANK_KEYS.items()}
            for rid, v in raw.items() if not rid.startswith("_")}


def template_bank(relation_id: str | None = None, perspective: str | None = None,
                  path: str | os.PathLike | None = None):
    """The shipped bank: all of it (``{rid: {"entity": (...), "relation": (...)}}``), one relation's
    ``{"entity": ..., "relation": ...}``, or one relation's templates of one perspective
    (an unknown relation id gives empty tuples)."""
    bank = _load_bank(str(path or _TEMPLATE_BANK))
    if relation_id is None:
        return bank
    entry = bank.get(relation_id, {kind: () for kind in PERSPECTIVES})
    if perspective is None:
        return entry
    _check_perspective(perspective)
    return entry[perspective]


def relation_templates(relation_id: str | None = None, path: str | os.PathLike | None = None):
    """The bank's relation-first templates: all (``{rid: (...)}``) or one relation id's (``()`` if unknown)."""
    if relation_id is None:
        return {rid: v["relation"] for rid, v in template_bank(path=path).items()}
    return template_bank(relation_id, "relation", path)


def _check_perspective(perspective: str) -> str:
    if perspective not in PERSPECTIVES:
        raise ValueError(f"request perspective must be one of {PERSPECTIVES}, not {perspective!r}")
    return perspective


def strip_noise(prompt: str, subject: str) -> str:
    """``prompt`` without a prepended noise sentence: the text from the last sentence end before the subject.

    CounterFact's paraphrases start with a generated sentence (``"... never released. "``);
    only text before the subject's first occurrence is examined, so dots inside the subject
    (``"J. R. R. Tolkien"``) do not count.
    """
    at = prompt.find(subject)
    if at < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    ends = list(_SENTENCE_END.finditer(prompt, 0, at))
    return prompt[ends[-1].end():] if ends else prompt


def phrasing(prompt: str, subject: str) -> str:
    """``"entity"`` if the (noise-stripped) prompt begins with the subject, else ``"relation"``."""
    return "entity" if strip_noise(prompt, subject).lstrip().startswith(subject) else "relation"


def _template(prompt: str, subject: str) -> str | None:
    """``prompt`` as a template (``{}`` for the subject), if the subject occurs exactly once."""
    if prompt.count(subject) != 1 or "{" in prompt or "}" in prompt:
        return None
    return prompt.replace(subject, "{}")


# --------------------------------------------------------------------------- phrasings and requests

@dataclass(frozen=True)
class Phrasings:
    """A fact's prompts by phrasing kind; ``entity[0]``/``relation[0]`` are the two perspectives' requests."""

    entity: tuple[str, ...]
    relation: tuple[str, ...]
    entity_template: str | None
    relation_template: str | None

    def family(self, perspective: str) -> tuple[str, ...]:
        return getattr(self, _check_perspective(perspective))

    def template(self, perspective: str) -> str | None:
        return getattr(self, f"{_check_perspective(perspective)}_template")


def phrasings(fact: Fact, bank: str | os.PathLike | None = None) -> Phrasings:
    """Both phrasing families of ``fact`` with each perspective's request first (module docstring)."""
    s = fact.subject
    if fact.entity_prompts or fact.relation_prompts:  # the source classified them (bundled world)
        given = {"entity": list(fact.entity_prompts), "relation": list(fact.relation_prompts)}
        for p in (fact.prompt, *fact.paraphrases):
            kind = phrasing(p, s)
            if p not in given[kind]:
                given[kind].append(p)
        banked = {kind: () for kind in PERSPECTIVES}
    else:  # CounterFact: classify the rewrite prompt and paraphrases; the bank adds both kinds
        given = {kind: [] for kind in PERSPECTIVES}
        for p in (fact.prompt, *fact.paraphrases):
            given[phrasing(p, s)].append(p)
        banked = template_bank(fact.relation_id, path=bank)
    families, templates = {}, {}
    for kind in PERSPECTIVES:
        prompts = list(dict.fromkeys([*given[kind], *(t.format(s) for t in banked[kind])]))
        if phrasing(fact.prompt, s) == kind:
            request = fact.template
        else:  # the first clean phrasing of this kind (a noise sentence is no request)
            request = next((t for t in (_template(p, s) for p in prompts if strip_noise(p, s) == p)
                            if t is not None), None)
        if request is not None:
            first = request.format(s)
            prompts = [first] + [p for p in prompts if p != first]
        families[kind], templates[kind] = tuple(prompts), request
    return Phrasings(families["entity"], families["relation"], templates["entity"], templates["relation"])


def request_fact(fact: Fact, perspective: str, ph: Phrasings | None = None) -> Fact:
    """The edit request of ``fact`` from ``perspective``: the fact phrased that way, with no other prompt.

    Paraphrases, neighbourhood and both phrasing lists are emptied, so a method (KN's
    attribution, FT's training) can only ever see the request prompt itself.
    """
    ph = ph or phrasings(fact)
    template = ph.template(perspective)
    if template is None:
        raise ValueError(f"fact {fact.id} ({fact.prompt!r}) has no {perspective}-based (" +
                         ("subject-first" if perspective == "entity" else "relation-first") +
                         f") phrasing; extend the template bank for relation {fact.relation_id!r}")
    return replace(fact, template=template, paraphrases=(), neighborhood=(), neighborhood_targets=(),
                   entity_prompts=(), relation_prompts=())


# --------------------------------------------------------------------------- probes

@dataclass(frozen=True)
class Probes:
    """The probe prompts of one fact (see the module docstring).

    ``entity``/``relation``: the two phrasing families (first = that perspective's request).
    ``bleed``: ``(prompt, that subject's true object, phrasing kind)`` of other subjects of the relation.
    ``locality``: neighbourhood prompts and their expected answers.
    ``controls``: ``(family, position, prompt, that subject's true object)``: the family's prompt
    at ``position`` with a bleed subject in the subject's place (every prompt x bleed subject).
    ``relations``: ``(prompt, its true object, relation id, phrasing kind)`` of the subject's
    other relations (:func:`other_relation_probes`).
    """

    entity: tuple[str, ...]
    relation: tuple[str, ...]
    bleed: tuple[tuple[str, str, str], ...]
    locality: tuple[str, ...]
    locality_targets: tuple[str, ...]
    controls: tuple[tuple[str, int, str, str], ...] = ()
    relations: tuple[tuple[str, str, str, str], ...] = ()

    def family(self, name: str) -> tuple[str, ...]:
        return getattr(self, name)


def relation_index(facts: Iterable[Fact]) -> dict[str, list[tuple[str, str]]]:
    """``{relation_id: [(subject, true object), ...]}`` over a dataset (each subject once per relation)."""
    index: dict[str, dict[str, str]] = {}
    for f in facts:
        index.setdefault(f.relation_id, {}).setdefault(f.subject, f.target_true)
    return {rid: list(v.items()) for rid, v in index.items()}


def bleed_subjects(fact: Fact, index: dict[str, list[tuple[str, str]]], k: int = 5, seed: int = 0
                   ) -> list[tuple[str, str]]:
    """Up to ``k`` other subjects of ``fact``'s relation whose true object is neither o nor o*, seeded per fact."""
    pool = [(s, o) for s, o in index.get(fact.relation_id, ())
            if s != fact.subject and o.strip() not in (fact.target_true.strip(), (fact.target_new or "").strip())
            and fact.subject not in s and s not in fact.subject]
    rng = random.Random(f"{seed}:{fact.id}:{fact.subject}")
    return rng.sample(pool, min(k, len(pool)))


def subject_index(facts: Iterable[Fact]) -> dict[str, list[Fact]]:
    """``{subject: [its facts, one per relation id (the first listed)]}`` over a dataset."""
    index: dict[str, dict[str, Fact]] = {}
    for f in facts:
        index.setdefault(f.subject, {}).setdefault(f.relation_id, f)
    return {s: list(v.values()) for s, v in index.items()}


def other_relations(fact: Fact, index: dict[str, list[Fact]], k: int | None = None, seed: int = 0) -> list[Fact]:
    """The subject's facts of *other* relations (``index`` from :func:`subject_index`) whose true
    object is not o* (a probe already answering o* shows nothing); up to ``k``, seeded per fact
    (``None``: all, in dataset order). A CounterFact subject usually has none."""
    new = (fact.target_new or "").strip()
    pool = [f for f in index.get(fact.subject, ()) if f.relation_id != fact.relation_id
            and f.target_true.strip() != new]
    if k is None or k >= len(pool):
        return pool
    rng = random.Random(f"{seed}:{fact.id}:{fact.subject}:relations")
    keep = sorted(rng.sample(range(len(pool)), k))
    return [pool[i] for i in keep]


def other_relation_probes(others: Sequence[Fact], bank: str | os.PathLike | None = None
                          ) -> tuple[tuple[str, str, str, str], ...]:
    """``(prompt, its true object, relation id, phrasing kind)`` for each fact of ``others`` in both
    request phrasings (each perspective's request of that fact, :func:`phrasings`; a kind the fact
    lacks is skipped)."""
    out = []
    for f in others:
        ph = phrasings(f, bank)
        for kind in PERSPECTIVES:
            template = ph.template(kind)
            if template is not None:
                out.append((template.format(f.subject), f.target_true, f.relation_id, kind))
    return tuple(out)


def probes(fact: Fact, others: Sequence[tuple[str, str]] = (), bank: str | os.PathLike | None = None,
           ph: Phrasings | None = None, relations: Sequence[Fact] = ()) -> Probes:
    """The probe families of ``fact``; ``others`` = ``(subject, true object)`` pairs for bleed and
    the matched controls; ``relations`` = the subject's facts of other relations (:func:`other_relations`)."""
    ph = ph or phrasings(fact, bank)
    bleed = []
    for subject, obj in others:
        for kind in PERSPECTIVES:
            template = ph.template(kind)
            if template is not None:
                bleed.append((template.format(subject), obj, kind))
    controls = []
    for kind in PERSPECTIVES:
        for pos, prompt in enumerate(ph.family(kind)):
            template = _template(prompt, fact.subject)
            if template is None:
                continue
            controls += [(kind, pos, template.format(subject), obj) for subject, obj in others]
    targets = tuple(fact.neighborhood_targets) or (fact.target_true,) * len(fact.neighborhood)
    if len(targets) != len(fact.neighborhood):
        raise ValueError(f"fact {fact.id}: {len(fact.neighborhood)} neighbourhood prompts but "
                         f"{len(targets)} neighbourhood targets")
    return Probes(ph.entity, ph.relation, tuple(bleed), tuple(fact.neighborhood), targets, tuple(controls),
                  other_relation_probes(relations, bank))
