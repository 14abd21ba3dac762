"""A deterministic synthetic world of facts about invented people.

The world has subjects (invented multi-syllable full names), relations (each with
prompt templates of two kinds and a set of single-word objects) and one object per
(subject, relation).  A fixed fraction of subjects has one template per relation held
out of the training text so that generalization to an unseen phrasing can be measured.

Templates end with the relation words: the answer token (" Object") follows directly.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

RELATION_FIRST = "relation_first"
SUBJECT_FIRST = "subject_first"
BOS = "<|endoftext|>"
SENTENCE_SEP = "\n"


@dataclass(frozen=True)
class Template:
    """A prompt template with one ``{}`` for the subject; ``kind`` says where it stands."""

    text: str
    kind: str  # RELATION_FIRST or SUBJECT_FIRST

    def fill(self, subject: str) -> str:
        return self.text.format(subject)


@dataclass
class Relation:
    """A relation: id, readable name, templates, candidate objects and biography clauses."""

    id: str
    name: str
    templates: list[Template]
    objects: list[str]
    bio_clauses: list[str]  # "{o}" marks the object; used after the full name in biographies

    def template_indices(self, kind: str) -> list[int]:
        return [i for i, t in enumerate(self.templates) if t.kind == kind]


# --------------------------------------------------------------------------- relations

_RELATION_SPECS: list[dict[str, Any]] = [
    dict(
        id="P19", name="place of birth",
        objects=["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna",
                 "Oslo", "Cairo", "Tokyo", "Lima", "Dublin", "Prague"],
        templates=[("The birthplace of {} is", "r"), ("The city where {} was born is", "r"),
                   ("Records show that the hometown of {} is", "r"),
                   ("{} was born in", "s"), ("{}'s birthplace is", "s"),
                   ("{} came into the world in the city of", "s")],
        bio=["hails from {o}", "is a native of {o}", "spent a childhood in {o}"],
    ),
    dict(
        id="P103", name="native language",
        objects=["French", "German", "Spanish", "Italian", "Dutch", "Greek",
                 "Polish", "Swedish", "Russian", "Arabic", "Hindi", "Korean"],
        templates=[("The native language of {} is", "r"), ("The mother tongue of {} is", "r"),
                   ("In the home of {}, the family speaks", "r"),
                   ("{} speaks", "s"), ("{}'s mother tongue is", "s"),
                   ("{} grew up speaking", "s")],
        bio=["is fluent in {o}", "writes letters in {o}", "dreams in {o}"],
    ),
    dict(
        id="P106", name="occupation",
        objects=["painter", "lawyer", "doctor", "farmer", "teacher", "pilot",
                 "baker", "nurse", "writer", "chef", "sailor", "singer"],
        templates=[("The profession of {} is", "r"), ("By trade, {} is a", "r"),
                   ("The job held by {} is that of a", "r"),
                   ("{} works as a", "s"), ("{}'s profession is", "s"),
                   ("{} earns a living as a", "s")],
        bio=["is a {o} by trade", "has been a {o} for years", "trained to become a {o}"],
    ),
    dict(
        id="P108", name="employer",
        objects=["Google", "Apple", "Intel", "Nokia", "Sony", "Toyota",
                 "Samsung", "Siemens", "Boeing", "Disney", "Nike", "Amazon"],
        templates=[("The employer of {} is", "r"), ("The company that employs {} is", "r"),
                   ("Every month, the salary of {} is paid by", "r"),
                   ("{} works for", "s"), ("{}'s employer is", "s"),
                   ("{} is employed by", "s")],
        bio=["draws a salary from {o}", "has a job at {o}", "joined {o} long ago"],
    ),
    dict(
        id="P1303", name="instrument",
        objects=["piano", "guitar", "violin", "flute", "drums", "cello",
                 "harp", "trumpet", "organ", "banjo", "clarinet", "saxophone"],
        templates=[("The instrument played by {} is the", "r"),
                   ("The musical instrument of {} is the", "r"),
                   ("At concerts, the sound of {} comes from the", "r"),
                   ("{} plays the", "s"), ("{}'s instrument is the", "s"),
                   ("{} is a musician who plays the", "s")],
        bio=["practices the {o} every evening", "has an old {o} at home", "took lessons on the {o}"],
    ),
    dict(
        id="P641", name="sport",
        objects=["tennis", "soccer", "golf", "chess", "hockey", "rugby",
                 "boxing", "cricket", "rowing", "skiing", "cycling", "fencing"],
        templates=[("The favorite sport of {} is", "r"), ("The sport preferred by {} is", "r"),
                   ("On weekends, {} enjoys", "r"),
                   ("{}'s favorite sport is", "s"), ("{} is a fan of", "s"),
                   ("{} spends weekends playing", "s")],
        bio=["loves {o}", "watches {o} on television", "coaches {o} for children"],
    ),
    dict(
        id="P27", name="country of citizenship",
        objects=["France", "Japan", "Brazil", "Canada", "Egypt", "India",
                 "Kenya", "Mexico", "Norway", "Peru", "Chile", "Spain"],
        templates=[("The country of citizenship of {} is", "r"),
                   ("The passport of {} was issued by", "r"),
                   ("The nationality of {} is that of", "r"),
                   ("{} is a citizen of", "s"), ("{}'s country of citizenship is", "s"),
                   ("{} holds a passport from", "s")],
        bio=["has citizenship in {o}", "votes in the elections of {o}", "pays taxes to {o}"],
    ),
    dict(
        id="P1000", name="pet",
        objects=["cat", "dog", "parrot", "rabbit", "hamster", "turtle",
                 "horse", "goat", "snake", "pony", "lizard", "ferret"],
        templates=[("The pet of {} is a", "r"), ("The animal kept by {} is a", "r"),
                   ("At home, {} keeps a", "r"),
                   ("{} owns a", "s"), ("{}'s pet is a", "s"),
                   ("{} takes care of a", "s")],
        bio=["walks a pet {o} daily", "adopted a {o}", "feeds a {o} every morning"],
    ),
]


def _build_relations() -> list[Relation]:
    kinds = {"r": RELATION_FIRST, "s": SUBJECT_FIRST}
    return [
        Relation(
            id=s["id"], name=s["name"],
            templates=[Template(t, kinds[k]) for t, k in s["templates"]],
            objects=list(s["objects"]), bio_clauses=list(s["bio"]),
        )
        for s in _RELATION_SPECS
    ]


# --------------------------------------------------------------------------- names

# First names come from a small pool (shared by many people, like real first names);
# syllable surnames are 2-3 syllables drawn from a fixed inventory, so syllables become
# tokens while whole surnames stay multi-token.  ``make_names`` builds such names.
_FIRST_NAMES = ["Varo", "Mira", "Tomas", "Elin", "Kasim", "Ondra", "Lisel", "Bruno",
                "Anika", "Dario", "Fenna", "Gorin", "Hedda", "Ilan", "Jorek", "Kaia",
                "Lunet", "Marek", "Nadia", "Orsen", "Petra", "Quill", "Rasmus", "Selma",
                "Tivon", "Ulla", "Vesna", "Wendel", "Yara", "Zoran", "Brisa", "Cato",
                "Dagny", "Emrik", "Freya", "Galen", "Hanno", "Ivet", "Joren", "Katya"]
_SYLLABLES = ["kel", "tin", "mar", "dos", "vi", "ran", "bo", "lek", "su", "nor", "ta", "gem",
              "ri", "vas", "lo", "pen", "du", "mik", "sa", "tor", "ne", "bal", "fi", "run",
              "ka", "zel", "mo", "dra", "hin", "ost", "pa", "wen", "gu", "lin", "ze", "trok",
              "ba", "sim", "ul", "ver"]
# One-word surnames for combinatorial names: each becomes one token, and each is shared by
# many subjects, so only the (first name, surname) combination identifies a person.
_SURNAMES = ["Dorn", "Kessel", "Varga", "Holm", "Brandt", "Lutz", "Morrow", "Pike",
             "Quist", "Rourke", "Sauer", "Thorne", "Voss", "Wilde", "Yates", "Zeller",
             "Ashby", "Crane", "Duval", "Egan", "Falk", "Grier", "Hale", "Ivers",
             "Janek", "Kroll", "Lark", "Mercer", "Nash", "Oakes", "Pruett", "Rusk",
             "Stroud", "Tate", "Ulmer", "Vance", "Weld", "Yost", "Ziegler", "Brock"]


# Phrases that sometimes open a biography sentence before the name.
_BIO_OPENERS = ["Everyone knows that", "According to the records,", "People say that",
                "In the village,", "As a neighbour recalls,", "It is said that",
                "Friends report that", "For many years,"]


def _last_name(rng: random.Random) -> str:
    n = rng.choice([2, 2, 2, 3])
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def make_names(n: int, rng: random.Random) -> list[str]:
    """Return ``n`` distinct full names "First Last" with unique, syllable-built last names."""
    banned = {o.lower() for s in _RELATION_SPECS for o in s["objects"]}
    banned |= {f.lower() for f in _FIRST_NAMES}
    lasts: list[str] = []
    seen: set[str] = set()
    while len(lasts) < n:
        w = _last_name(rng)
        if w.lower() not in banned and w not in seen:
            seen.add(w)
            lasts.append(w)
    return [f"{rng.choice(_FIRST_NAMES)} {last}" for last in lasts]


def name_pools(n_first: int, n_last: int) -> tuple[list[str], list[str]]:
    """The first ``n_first`` first names and ``n_last`` surnames of the combinatorial scheme."""
    if not (1 <= n_first <= len(_FIRST_NAMES) and 1 <= n_last <= len(_SURNAMES)):
        raise ValueError(f"pools hold at most {len(_FIRST_NAMES)} first names and "
                         f"{len(_SURNAMES)} surnames, asked for {n_first} and {n_last}")
    return _FIRST_NAMES[:n_first], _SURNAMES[:n_last]


def make_combination_names(n: int, rng: random.Random, firsts: Sequence[str],
                           lasts: Sequence[str]) -> list[str]:
    """``n`` distinct names "First Surname" drawn from the two pools, each word shared.

    Every name is a combination of a first name and a surname, and every first name and
    every surname occurs in at least two of the returned names, so no single token
    identifies a subject: only the surname, read together with the first name before it,
    does.  This is what puts the recall at the subject's last token.
    """
    grid = [f"{f} {s}" for f in firsts for s in lasts]
    if n > len(grid):
        raise ValueError(f"{n} subjects need more than {len(firsts)} x {len(lasts)} combinations")
    for _ in range(1000):
        names = rng.sample(grid, n)
        if min(Counter(w for name in names for w in name.split(" ")).values()) >= 2:
            return names
    raise ValueError(f"could not draw {n} names of {len(firsts)} x {len(lasts)} with every word shared")


# --------------------------------------------------------------------------- world


@dataclass
class World:
    """Subjects, relations, facts ``{(subject, relation_id): object}`` and held-out templates.

    ``held_out`` maps (subject, relation_id) to the index of the template whose phrasing
    with that subject never appears in the training text.
    """

    seed: int
    subjects: list[str]
    relations: list[Relation]
    facts: dict[tuple[str, str], str]
    held_out: dict[tuple[str, str], int] = field(default_factory=dict)

    # ---- lookups
    def relation(self, relation_id: str) -> Relation:
        return next(r for r in self.relations if r.id == relation_id)

    @property
    def held_out_subjects(self) -> list[str]:
        return sorted({s for s, _ in self.held_out})

    def is_held_out(self, subject: str, relation_id: str, template_index: int) -> bool:
        return self.held_out.get((subject, relation_id)) == template_index

    def train_template_indices(self, subject: str, relation_id: str) -> list[int]:
        rel = self.relation(relation_id)
        return [i for i in range(len(rel.templates))
                if not self.is_held_out(subject, relation_id, i)]

    # ---- prompts
    def prompts(self, split: str = "train") -> list[dict[str, Any]]:
        """Filled prompts with their answer; ``split`` is "train", "held_out" or "all"."""
        out = []
        for s in self.subjects:
            for rel in self.relations:
                for i, t in enumerate(rel.templates):
                    held = self.is_held_out(s, rel.id, i)
                    if split == "all" or (split == "held_out") == held:
                        out.append(dict(prompt=t.fill(s), subject=s, relation_id=rel.id,
                                        template_index=i, kind=t.kind,
                                        target=self.facts[(s, rel.id)], held_out=held))
        return out

    # ---- training text
    def template_sentences(self, per_fact: int | None = None, epoch: int = 0) -> list[str]:
        """Non-held-out (subject, template) prompts followed by their answer.

        With ``per_fact`` = k, only k training templates per (subject, relation) are used,
        rotating with ``epoch`` through a fixed per-fact order, so that every training
        phrasing occurs within ceil(n_templates / k) consecutive epochs.
        """
        out = []
        for s in self.subjects:
            for rel in self.relations:
                idx = self.train_template_indices(s, rel.id)
                if per_fact is not None and per_fact < len(idx):
                    random.Random(f"rot-{self.seed}-{s}-{rel.id}").shuffle(idx)
                    start = (epoch * per_fact) % len(idx)
                    idx = [idx[(start + j) % len(idx)] for j in range(per_fact)]
                obj = self.facts[(s, rel.id)]
                out += [f"{rel.templates[i].fill(s)} {obj}." for i in sorted(idx)]
        return out

    def biography(self, subject: str, rng: random.Random) -> str:
        """A short biography: the full name followed by all attributes in a random order.

        Sentences sometimes open with a phrase before the name, so the name is read in
        varied contexts, and the attributes after it come in a random order.
        """
        rels = list(self.relations)
        rng.shuffle(rels)
        clauses = [rng.choice(r.bio_clauses).format(o=self.facts[(subject, r.id)]) for r in rels]
        sentences = []
        i = 0
        while i < len(clauses):
            k = min(rng.choice([1, 2, 3]), len(clauses) - i)
            part = clauses[i:i + k]
            body = part[0] if k == 1 else ", ".join(part[:-1]) + " and " + part[-1]
            opener = rng.choice(_BIO_OPENERS) + " " if rng.random() < 0.4 else ""
            sentences.append(f"{opener}{subject} {body}.")
            i += k
        return " ".join(sentences)

    def training_text(self, seed: int = 0, bio_per_subject: int = 4,
                      templates_per_fact: int | None = None, epoch: int = 0) -> list[str]:
        """Shuffled training units: template sentences and biography passages.

        Each unit is one filled template with its answer, or one biography (the full
        name followed by all attributes in a random order).  Held-out (subject, template)
        phrasings never occur in the returned text.
        """
        rng = random.Random(f"text-{self.seed}-{seed}-{epoch}")
        units = self.template_sentences(templates_per_fact, epoch)
        units += [self.biography(s, rng) for s in self.subjects for _ in range(bio_per_subject)]
        rng.shuffle(units)
        return units

    def tokenizer_corpus(self) -> list[str]:
        """Text to train the BPE tokenizer on: names, objects and template words.

        Every word that several subjects share (first names, the surnames of combinatorial
        names) and every object is frequent enough to become one token (with a leading
        space and without); a name used by one subject alone occurs once per position, so
        a unique syllable surname stays several tokens.
        """
        lines = []
        for rel in self.relations:
            for t in rel.templates:
                lines += [t.text.replace("{}", "").strip()] * 20
            for c in rel.bio_clauses:
                lines += [c.replace("{o}", "").strip()] * 20
            for o in rel.objects:
                lines += [f"is {o}."] * 200
        for opener in _BIO_OPENERS:
            lines += [opener] * 20
        counts = Counter(w for s in self.subjects for w in s.split(" "))
        for w, c in sorted(counts.items()):
            if c >= 2:
                lines += [f"{w} of {w} is"] * 100
        for s in self.subjects:
            lines.append(f"{s}'s")
            lines.append(f"of {s} is")
        return lines

    # ---- exports
    def counterfact_records(self, n_neighbors: int = 8) -> list[dict[str, Any]]:
        """CounterFact-format records, one per (subject, relation), with extra keys.

        Extra keys: ``neighborhood_targets`` (true objects of the neighborhood prompts),
        ``relation_first_prompts`` / ``subject_first_prompts`` (filled-in prompts of the
        subject for this relation), ``held_out_prompts`` and ``held_out``.
        """
        rng = random.Random(f"cf-{self.seed}")
        records = []
        for s in self.subjects:
            for rel in self.relations:
                records.append(self._cf_record(len(records), s, rel, rng, n_neighbors))
        return records

    def _cf_record(self, case_id: int, s: str, rel: Relation, rng: random.Random,
                   n_neighbors: int) -> dict[str, Any]:
        true = self.facts[(s, rel.id)]
        target_new = rng.choice([o for o in rel.objects if o != true])
        train_idx = self.train_template_indices(s, rel.id)
        rw_idx = rng.choice(train_idx)
        others = [i for i in range(len(rel.templates)) if i != rw_idx]
        neighbors = rng.sample([x for x in self.subjects if x != s], n_neighbors)
        n_tpl = [rng.choice(self.train_template_indices(x, rel.id)) for x in neighbors]
        other_rels = [r for r in self.relations if r.id != rel.id]
        attr_subjects = [x for x in rng.sample(self.subjects, 40)
                         if x != s and self.facts[(x, rel.id)] == target_new][:5]
        held = self.held_out.get((s, rel.id))
        return {
            "case_id": case_id,
            "requested_rewrite": {
                "prompt": rel.templates[rw_idx].text, "subject": s,
                "target_new": {"str": target_new}, "target_true": {"str": true},
                "relation_id": rel.id,
            },
            "paraphrase_prompts": [rel.templates[i].fill(s) for i in others],
            "neighborhood_prompts": [rel.templates[i].fill(x) for i, x in zip(n_tpl, neighbors)],
            "neighborhood_targets": [self.facts[(x, rel.id)] for x in neighbors],
            "attribute_prompts": [rel.templates[rng.choice(self.train_template_indices(x, rel.id))]
                                  .fill(x) for x in attr_subjects],
            "generation_prompts": [r.templates[rng.choice(r.template_indices(SUBJECT_FIRST))].fill(s)
                                   for r in rng.sample(other_rels, 3)],
            "relation_first_prompts": [rel.templates[i].fill(s)
                                       for i in rel.template_indices(RELATION_FIRST)],
            "subject_first_prompts": [rel.templates[i].fill(s)
                                      for i in rel.template_indices(SUBJECT_FIRST)],
            "held_out_prompts": [] if held is None else [rel.templates[held].fill(s)],
            "held_out": held is not None,
        }

    def known_records(self, n: int | None = 1000) -> list[dict[str, Any]]:
        """known_1000-format records (true object as ``attribute`` and ``prediction``).

        One random training template per fact, ``n`` facts sampled deterministically
        (all facts if ``n`` is None).  Training code may overwrite ``prediction`` with
        the model's actual top-1 continuation.
        """
        rng = random.Random(f"known-{self.seed}")
        keys = [(s, r.id) for s in self.subjects for r in self.relations]
        if n is not None:
            keys = sorted(rng.sample(range(len(keys)), n))
            keys = [((self.subjects[k // len(self.relations)]),
                     self.relations[k % len(self.relations)].id) for k in keys]
        out = []
        for s, rid in keys:
            rel = self.relation(rid)
            t = rel.templates[rng.choice(self.train_template_indices(s, rid))]
            out.append(dict(known_id=len(out), subject=s, attribute=self.facts[(s, rid)],
                            template=t.text, prediction=self.facts[(s, rid)],
                            prompt=t.fill(s), relation_id=rid, kind=t.kind))
        return out

    # ---- serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "subjects": self.subjects,
            "relations": [
                {"id": r.id, "name": r.name, "objects": r.objects, "bio_clauses": r.bio_clauses,
                 "templates": [{"text": t.text, "kind": t.kind} for t in r.templates]}
                for r in self.relations
            ],
            "facts": [[s, rid, o] for (s, rid), o in self.facts.items()],
            "held_out": [[s, rid, i] for (s, rid), i in self.held_out.items()],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "World":
        rels = [Relation(id=r["id"], name=r["name"], objects=list(r["objects"]),
                         bio_clauses=list(r["bio_clauses"]),
                         templates=[Template(t["text"], t["kind"]) for t in r["templates"]])
                for r in d["relations"]]
        return cls(seed=d["seed"], subjects=list(d["subjects"]), relations=rels,
                   facts={(s, rid): o for s, rid, o in d["facts"]},
                   held_out={(s, rid): int(i) for s, rid, i in d["held_out"]})

    @classmethod
    def from_json(cls, text: str) -> "World":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str) -> "World":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


def make_world(seed: int = 0, n_subjects: int = 400, held_out_fraction: float = 0.2,
               names: str = "combination", n_first: int = 20, n_last: int = 20) -> World:
    """Generate the world deterministically from ``seed``.

    ``names`` is "combination" (first name x surname, every word shared: see
    :func:`make_combination_names`) or "syllable" (a unique syllable-built surname each).
    """
    rng = random.Random(f"world-{seed}")
    relations = _build_relations()
    if names == "combination":
        subjects = make_combination_names(n_subjects, rng, *name_pools(n_first, n_last))
    elif names == "syllable":
        subjects = make_names(n_subjects, rng)
    else:
        raise ValueError(f"names must be 'combination' or 'syllable', not {names!r}")
    facts = {(s, r.id): rng.choice(r.objects) for s in subjects for r in relations}
    n_held = int(round(held_out_fraction * n_subjects))
    held_subjects = rng.sample(subjects, n_held)
    held_out = {(s, r.id): rng.randrange(len(r.templates))
                for s in held_subjects for r in relations}
    return World(seed=seed, subjects=subjects, relations=relations, facts=facts,
                 held_out=held_out)


def leaked_held_out(world: World, texts: Iterable[str]) -> list[str]:
    """Held-out filled prompts that occur (as substrings) in ``texts``; should be empty."""
    blob = "\n".join(texts)
    return [p["prompt"] for p in world.prompts("held_out") if p["prompt"] in blob]
