"""Facts (subject, relation, object) and the dataset formats they come in.

A :class:`Fact` carries CounterFact-like fields. :func:`load_facts` reads the bundled
world (``"toy-facts"``), a CounterFact JSON file, or a ROME ``known_1000`` JSON file
(reference §8).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .loading import BUNDLED, bundled_path


class FactFormatError(ValueError):
    """A facts file could not be read; the message names the file and the first bad record."""


@dataclass(frozen=True)
class Fact:
    """One fact and, optionally, a requested rewrite of it.

    ``template`` holds ``{}`` where the subject goes and ends where the answer begins;
    ``prompt`` is the filled template. ``paraphrases`` are other prompts of the same
    fact, ``neighborhood`` prompts of other subjects with the same relation (whose
    expected answers are ``neighborhood_targets``; for CounterFact these equal
    ``target_true``). ``entity_prompts``/``relation_prompts`` are the fact asked in
    subject-first and relation-first phrasings, when the source provides them.
    """

    subject: str
    template: str
    target_true: str
    relation_id: str = ""
    target_new: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    neighborhood_targets: tuple[str, ...] = ()
    entity_prompts: tuple[str, ...] = ()
    relation_prompts: tuple[str, ...] = ()
    id: str | int = 0

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise ValueError(f"Fact template must contain exactly one '{{}}': {self.template!r}")
        if not self.subject:
            raise ValueError("Fact subject is empty")

    @property
    def prompt(self) -> str:
        """The template with the subject filled in."""
        return self.template.format(self.subject)

    def with_new(self, target_new: str) -> "Fact":
        """A copy whose requested new object is ``target_new``."""
        return replace(self, target_new=target_new)

    def to_request(self) -> dict:
        """The fact as a CounterFact ``requested_rewrite`` dict."""
        request = {"prompt": self.template, "subject": self.subject, "target_true": {"str": self.target_true},
                   "relation_id": self.relation_id}
        if self.target_new is not None:
            request["target_new"] = {"str": self.target_new}
        return request

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prompt"] = self.prompt
        return out


def fact_from_request(request: dict, **extra: Any) -> Fact:
    """Build a :class:`Fact` from a CounterFact ``requested_rewrite`` dict."""
    def text(value: Any) -> str | None:
        if value is None:
            return None
        return value["str"] if isinstance(value, dict) else str(value)

    return Fact(
        subject=request["subject"],
        template=request["prompt"],
        target_true=text(request.get("target_true")) or "",
        target_new=text(request.get("target_new")),
        relation_id=str(request.get("relation_id", "")),
        **extra,
    )


def _counterfact_record(rec: dict) -> Fact:
    rw = rec["requested_rewrite"]
    neighborhood = tuple(rec.get("neighborhood_prompts", ()))
    targets = rec.get("neighborhood_targets")
    if targets is None:  # CounterFact: neighbours share the true object
        targets = [fact_from_request(rw).target_true] * len(neighborhood)
    return fact_from_request(
        rw,
        paraphrases=tuple(rec.get("paraphrase_prompts", ())),
        neighborhood=neighborhood,
        neighborhood_targets=tuple(targets),
        entity_prompts=tuple(rec.get("subject_first_prompts", ())),
        relation_prompts=tuple(rec.get("relation_first_prompts", ())),
        id=rec.get("case_id", 0),
    )


def _known_record(rec: dict) -> Fact:
    subject = rec["subject"]
    template = rec.get("template")
    if template is None:
        prompt = rec["prompt"]
        if prompt.count(subject) != 1:
            raise ValueError(f"subject {subject!r} must occur once in prompt {prompt!r}")
        template = prompt.replace(subject, "{}")
    return Fact(
        subject=subject,
        template=template,
        target_true=rec["attribute"],
        relation_id=str(rec.get("relation_id", "")),
        id=rec.get("known_id", 0),
    )


def parse_records(records: Sequence[dict], source: str = "<records>") -> list[Fact]:
    """Parse CounterFact or known_1000 records (detected per file from the first record)."""
    if not isinstance(records, list) or not records:
        raise FactFormatError(f"{source}: expected a non-empty JSON list of records")
    first = records[0]
    if isinstance(first, dict) and "requested_rewrite" in first:
        parse, kind = _counterfact_record, "CounterFact"
    elif isinstance(first, dict) and "attribute" in first and "subject" in first:
        parse, kind = _known_record, "known_1000"
    else:
        raise FactFormatError(
            f"{source}: record 0 is neither CounterFact (needs 'requested_rewrite') nor "
            f"known_1000 (needs 'subject', 'attribute', 'template'/'prompt'): {str(first)[:200]}"
        )
    facts = []
    for i, rec in enumerate(records):
        try:
            facts.append(parse(rec))
        except (KeyError, TypeError, ValueError) as err:
            raise FactFormatError(
                f"{source}: record {i} is not valid {kind} ({type(err).__name__}: {err}): {str(rec)[:200]}"
            ) from err
    return facts


def load_facts(source: str | os.PathLike | Iterable[dict] = BUNDLED, *, split: str = "counterfact") -> list[Fact]:
    """Load facts from ``"toy-facts"``, a CounterFact/known_1000 JSON file, or records.

    For the bundled world, ``split`` picks ``"counterfact"`` (with rewrite targets,
    paraphrases and neighbourhoods) or ``"known"`` (known_1000 format).
    """
    if not isinstance(source, (str, os.PathLike)):
        return parse_records(list(source))
    if str(source) == BUNDLED:
        name = {"counterfact": "counterfact.json", "known": "known_1000.json"}[split]
        path = bundled_path() / name
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise FactFormatError(f"{path}: no such facts file")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FactFormatError(f"{path}: not valid JSON ({err})") from err
    return parse_records(records, str(path))
