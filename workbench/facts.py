"""Facts (subject, relation, object) and the dataset formats they come in.

A :class:`Fact` carries CounterFact-like fields. :func:`load_facts` reads the bundled
world (``"toy-facts"``), a CounterFact JSON file, or a ROME ``known_1000`` JSON file
(reference §8).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .loading import BUNDLED, bundled_path, is_bundled_name


class FactFormatError(ValueError):
    """A fact or a facts file is malformed; the message names the file, the record, the field and the fix."""


class FactIdWarning(UserWarning):
    """Records without an id were given one derived from their content."""


_SEQUENCE_FIELDS = ("paraphrases", "neighborhood", "neighborhood_targets", "entity_prompts", "relation_prompts")


def check_template(template: str, field: str = "template") -> str:
    """A template with exactly one ``{}`` (the subject) and no other placeholder; returns it.

    Literal braces are written ``{{`` / ``}}`` as in :meth:`str.format`.
    """
    if not isinstance(template, str):
        raise FactFormatError(f"{field} must be a string, not {type(template).__name__}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise FactFormatError(f"{field} {template!r} is not a valid template ({err}); write literal braces as "
                              f"'{{{{' and '}}}}'") from None
    extra = [f for f in fields if f != ""]
    if extra:
        raise FactFormatError(f"{field} {template!r} has the placeholder {{{extra[0]}}}; only one '{{}}' (where the "
                              f"subject goes) is allowed, write literal braces as '{{{{' and '}}}}'")
    if len(fields) != 1:
        raise FactFormatError(f"{field} {template!r} must contain exactly one '{{}}' for the subject "
                              f"(it has {len(fields)})")
    return template


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise FactFormatError(f"{name} is a single string ({value[:60]!r}); it must be a list of strings")
    try:
        items = tuple(value)
    except TypeError:
        raise FactFormatError(f"{name} must be a list of strings, not {type(value).__name__}") from None
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise FactFormatError(f"{name} must hold strings only; it holds {bad[0]!r}")
    return items


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
        check_template(self.template)
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise FactFormatError(f"subject must be a non-empty string (not blank), not {self.subject!r}")
        if not isinstance(self.target_true, str):
            raise FactFormatError(f"target_true must be a string, not {type(self.target_true).__name__}")
        if self.target_new is not None and (not isinstance(self.target_new, str) or not self.target_new.strip()):
            raise FactFormatError(f"target_new must be a non-empty string or None, not {self.target_new!r}")
        for name in _SEQUENCE_FIELDS:
            object.__setattr__(self, name, _strings(name, getattr(self, name)))
        if self.neighborhood_targets and len(self.neighborhood_targets) != len(self.neighborhood):
            raise FactFormatError(f"{len(self.neighborhood)} neighborhood prompts but {len(self.neighborhood_targets)} "
                                  f"neighborhood_targets; give one target per prompt (or none: then every "
                                  f"neighbour expects target_true)")

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
    def text(name: str, required: bool) -> str | None:
        value = request.get(name)
        if value is None:
            if required:
                raise FactFormatError(f"requested_rewrite has no {name!r} (expected {{\"str\": \"...\"}})")
            return None
        value = value.get("str") if isinstance(value, dict) else value
        if not isinstance(value, str) or not value.strip():
            raise FactFormatError(f"requested_rewrite.{name} must be a non-empty string or {{\"str\": ...}}, "
                                  f"not {request.get(name)!r}")
        return value

    for name in ("prompt", "subject"):
        if not isinstance(request.get(name), str):
            raise FactFormatError(f"requested_rewrite.{name} must be a string, not {request.get(name)!r}")
    return Fact(
        subject=request["subject"],
        template=check_template(request["prompt"], "requested_rewrite.prompt"),
        target_true=text("target_true", True),
        target_new=text("target_new", False),
        relation_id=str(request.get("relation_id", "")),
        **extra,
    )


def _counterfact_record(rec: dict) -> Fact:
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise FactFormatError(f"requested_rewrite must be an object, not {rw!r}")
    neighborhood = _strings("neighborhood_prompts", rec.get("neighborhood_prompts", ()))
    targets = rec.get("neighborhood_targets")
    if targets is None:  # CounterFact: neighbours share the true object
        targets = [fact_from_request(rw).target_true] * len(neighborhood)
    targets = _strings("neighborhood_targets", targets)
    if len(targets) != len(neighborhood):
        raise FactFormatError(f"{len(neighborhood)} neighborhood_prompts but {len(targets)} neighborhood_targets; "
                              f"give one target per prompt, or leave neighborhood_targets out (then each "
                              f"neighbour expects target_true)")
    return fact_from_request(
        rw,
        paraphrases=_strings("paraphrase_prompts", rec.get("paraphrase_prompts", ())),
        neighborhood=neighborhood,
        neighborhood_targets=targets,
        entity_prompts=_strings("subject_first_prompts", rec.get("subject_first_prompts", ())),
        relation_prompts=_strings("relation_first_prompts", rec.get("relation_first_prompts", ())),
        id=rec["case_id"],
    )


def _known_record(rec: dict) -> Fact:
    subject = rec["subject"]
    if not isinstance(subject, str) or not subject.strip():
        raise FactFormatError(f"subject must be a non-empty string (not blank), not {subject!r}")
    attribute = rec["attribute"]
    if not isinstance(attribute, str) or not attribute.strip():
        raise FactFormatError(f"attribute (the expected object) must be a non-empty string, not {attribute!r}")
    template = rec.get("template")
    if template is None:
        prompt = rec["prompt"]
        if not isinstance(prompt, str) or prompt.count(subject) != 1:
            raise FactFormatError(f"subject {subject!r} must occur once in prompt {prompt!r}")
        template = prompt.replace(subject, "{}")
    return Fact(
        subject=subject,
        template=template,
        target_true=rec["attribute"],
        relation_id=str(rec.get("relation_id", "")),
        id=rec["known_id"],
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
    id_field = "case_id" if kind == "CounterFact" else "known_id"
    facts = []
    assigned = []
    for i, rec in enumerate(records):
        try:
            if not isinstance(rec, dict):
                raise FactFormatError(f"expected an object, got {type(rec).__name__}")
            if rec.get(id_field) is None:
                rec = {**rec, id_field: content_id(rec)}
                assigned.append(i)
            elif not isinstance(rec[id_field], (str, int)) or isinstance(rec[id_field], bool):
                raise FactFormatError(f"{id_field} must be an integer or a string, not {rec[id_field]!r}")
            facts.append(parse(rec))
        except (KeyError, TypeError, ValueError) as err:
            ident = rec.get("case_id", rec.get("known_id")) if isinstance(rec, dict) else None
            where = f"record {i}" + (f" (id {ident})" if ident is not None else "")
            what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise FactFormatError(
                f"{source}: {where} is not valid {kind}: {what}. Fix that record (or remove it) and load again. "
                f"Record: {str(rec)[:200]}"
            ) from None
    if assigned:
        warnings.warn(f"{source}: {len(assigned)} of {len(records)} record(s) have no {id_field!r}; each was given "
                      f"an id derived from its content (the first 12 hex digits of its SHA-256). Add {id_field!r} "
                      f"to the records to choose the ids", FactIdWarning, stacklevel=3)
    check_unique_ids(facts, source)
    return facts


def content_id(record: dict) -> str:
    """An id derived from a record's content: the first 12 hex digits of the SHA-256 of its canonical JSON."""
    from .integrity import canonical_json

    return hashlib.sha256(canonical_json(record)).hexdigest()[:12]


def check_unique_ids(facts: Sequence[Fact], source: str = "facts") -> None:
    """Refuse facts that share an id (results are stored and looked up by fact id), naming them."""
    first: dict[str, int] = {}
    clashes = []
    for i, fact in enumerate(facts):
        key = str(fact.id)
        if key in first:
            clashes.append(f"#{first[key]} and #{i} (id {fact.id!r})")
        else:
            first[key] = i
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise FactFormatError(f"{source}: {len(clashes)} fact(s) share an id with an earlier one: {shown}; every "
                              f"fact needs its own id (results are stored by fact id): give each record a unique "
                              f"id, or leave the ids out to have them derived from each record's content")


def check_fit(model, facts: Sequence[Fact], prepend_bos: bool | None = None, source: str = "facts") -> None:
    """Refuse facts whose prompt is longer than the model's context, naming each (index, id, length, limit)."""
    from .spans import PromptTooLongError, tokenize

    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is None:
        return
    too_long = []
    for i, fact in enumerate(facts):
        try:
            tokenize(model, fact.prompt, prepend_bos)
        except PromptTooLongError:
            too_long.append(f"#{i} (id {fact.id}, {fact.prompt[:40]!r}...)")
    if too_long:
        shown = ", ".join(too_long[:5]) + (f" and {len(too_long) - 5} more" if len(too_long) > 5 else "")
        raise FactFormatError(f"{source}: {len(too_long)} fact(s) have prompts longer than the model's context "
                              f"(n_ctx = {n_ctx} tokens): {shown}; remove them or shorten their templates")


def facts_hash(facts: Iterable[Fact]) -> str:
    """Content hash of facts, every field and their order: what a resumable run's rows depend on."""
    from .store import content_hash

    return content_hash(f.to_dict() for f in facts)


def load_facts(source: str | os.PathLike | Iterable[dict] = BUNDLED, *, split: str = "counterfact") -> list[Fact]:
    """Load facts from ``"toy-facts"``, a CounterFact/known_1000 JSON file, or records.

    For the bundled world, ``split`` picks ``"counterfact"`` (with rewrite targets,
    paraphrases and neighbourhoods) or ``"known"`` (known_1000 format).
    """
    if not isinstance(source, (str, os.PathLike)):
        return parse_records(list(source))
    if is_bundled_name(source):
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
