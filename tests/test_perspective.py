"""Request perspectives: phrasing classification, requests that carry no probe, probe families, bleed subjects."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.facts import Fact, load_facts
from workbench.perspective import (DEFAULT_LOCUS, bleed_subjects, other_relation_probes, other_relations, phrasing,
                                   phrasings, probes, relation_index, relation_templates, request_fact, strip_noise,
                                   subject_index, template_bank)

CF_IDS = ("P17 P19 P20 P27 P30 P36 P37 P39 P101 P103 P106 P108 P127 P131 P136 P138 P140 P159 P176 P178 P190 "
          "P264 P276 P407 P413 P449 P463 P495 P530 P740 P937 P1303 P1412").split()


def test_bank_has_both_phrasing_kinds_per_relation():
    bank = template_bank()
    assert set(CF_IDS) <= set(bank)
    for rid in CF_IDS:
        ent, rel = bank[rid]["entity"], bank[rid]["relation"]
        assert len(ent) >= 2 and len(rel) >= 2
        assert all(t.count("{}") == 1 and phrasing(t.format("Ann Kel"), "Ann Kel") == "entity" for t in ent)
        assert all(t.count("{}") == 1 and phrasing(t.format("Ann Kel"), "Ann Kel") == "relation" for t in rel)
    assert relation_templates("P103") == bank["P103"]["relation"]
    assert template_bank("P999", "entity") == () and relation_templates("P999") == ()


def test_noise_sentence_is_ignored_for_classification():
    s = "Danielle Darrieux"
    noisy = "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"
    assert strip_noise(noisy, s) == "Danielle Darrieux spoke the language" and phrasing(noisy, s) == "entity"
    assert phrasing("Shayna does this and Yossel goes still and dies. The mother tongue of Danielle Darrieux is",
                     s) == "relation"
    assert phrasing("Records show that the hometown of Danielle Darrieux is", s) == "relation"
    assert phrasing("J. R. R. Tolkien speaks", "J. R. R. Tolkien") == "entity"  # dots inside the subject
    with pytest.raises(ValueError):
        phrasing("Nobody speaks", s)


def test_counterfact_phrasings_and_requests():
    cf = load_facts(Path(__file__).parent / "fixtures" / "counterfact_small.json")[0]
    ph = phrasings(cf)
    assert ph.relation_template == cf.template  # the rewrite prompt is relation-first
    assert ph.relation[0] == cf.prompt
    # the entity request is the first *clean* subject-first phrasing: the bank's, not a noisy paraphrase
    assert ph.entity_template == template_bank(cf.relation_id, "entity")[0]
    assert all(p in ph.entity for p in cf.paraphrases)  # noisy paraphrases are kept for scoring
    req = request_fact(cf, "entity", ph)
    assert req.prompt == ph.entity[0] and req.paraphrases == () and req.neighborhood == ()
    assert req.target_new == cf.target_new and req.subject == cf.subject


def test_bundled_style_phrasings_put_each_request_first():
    f = Fact(subject="Ann Kel", template="The mother tongue of {} is", target_true="French", target_new="Greek",
             relation_id="P103", paraphrases=("Ann Kel speaks",),
             entity_prompts=("Ann Kel's mother tongue is", "Ann Kel speaks"),
             relation_prompts=("The native language of Ann Kel is", "The mother tongue of Ann Kel is"))
    ph = phrasings(f)
    assert ph.relation == ("The mother tongue of Ann Kel is", "The native language of Ann Kel is")
    assert ph.entity == ("Ann Kel's mother tongue is", "Ann Kel speaks")  # no bank prompts added
    assert request_fact(f, "entity", ph).template == "{}'s mother tongue is"
    assert DEFAULT_LOCUS == {"entity": "subject", "relation": "relation"}
    with pytest.raises(ValueError):
        request_fact(f, "object", ph)


def test_bleed_subjects_and_probes():
    facts = [Fact(subject=s, template="{} speaks", target_true=o, relation_id="P103", target_new="Greek", id=i)
             for i, (s, o) in enumerate([("Ann Kel", "French"), ("Bo Lin", "Greek"), ("Cy Dor", "German"),
                                         ("Di Mar", "French"), ("Ed Sul", "Dutch")])]
    facts.append(Fact(subject="Fay Ro", template="{} works for", target_true="BBC", relation_id="P108", id=9))
    index = relation_index(facts)
    others = bleed_subjects(facts[0], index, k=5)
    # not itself, not a subject whose object is already o* (Greek) or o (French), not another relation's
    assert sorted(others) == [("Cy Dor", "German"), ("Ed Sul", "Dutch")]
    assert bleed_subjects(facts[0], index, k=1) == bleed_subjects(facts[0], index, k=1)
    p = probes(facts[0], others)
    assert len(p.bleed) == 4 and {k for *_, k in p.bleed} == {"entity", "relation"}
    assert ("Cy Dor speaks", "German", "entity") in p.bleed


def test_matched_controls_put_each_bleed_subject_into_every_family_prompt():
    f = Fact(subject="Ann Kel", template="The mother tongue of {} is", target_true="French", target_new="Greek",
             relation_id="P103", entity_prompts=("Ann Kel's mother tongue is", "Ann Kel speaks"),
             relation_prompts=("The mother tongue of Ann Kel is", "The native language of Ann Kel is"))
    p = probes(f, [("Cy Dor", "German"), ("Ed Sul", "Dutch")])
    assert len(p.controls) == 2 * 4
    assert ("entity", 1, "Cy Dor speaks", "German") in p.controls
    assert ("relation", 1, "The native language of Ed Sul is", "Dutch") in p.controls
    # position 0 of each family is the request phrasing: the same prompts as bleed
    assert {(c[2], c[3], c[0]) for c in p.controls if c[1] == 0} == set(p.bleed)
    assert probes(f).controls == ()


def test_other_relations_of_the_subject():
    facts = load_facts("toy-facts")
    fact = facts[0]
    index = subject_index(facts)
    others = other_relations(fact, index)
    rels = {f.relation_id for f in others}
    # every other relation of the bundled world's subject, none of its own relation, all about this subject
    assert len(others) == 7 and fact.relation_id not in rels and {f.subject for f in others} == {fact.subject}
    assert all(f.target_true != fact.target_new for f in others)
    two = other_relations(fact, index, k=2, seed=3)
    assert len(two) == 2 and two == other_relations(fact, index, k=2, seed=3) and set(two) <= set(others)
    probes_ = other_relation_probes(others)
    assert len(probes_) == 14 and {k for *_, k in probes_} == {"entity", "relation"}
    for prompt, obj, rid, kind in probes_:
        other = next(f for f in others if f.relation_id == rid)
        assert obj == other.target_true and fact.subject in prompt and phrasing(prompt, fact.subject) == kind
    p = probes(fact, relations=others)
    assert p.relations == probes_ and p.bleed == ()
    # an other-relation fact whose true object is o* is no probe of a change
    same = Fact(subject=fact.subject, template="{} likes", target_true=fact.target_new, relation_id="PX", id=999)
    assert same not in other_relations(fact, subject_index([*facts, same]))
    # a CounterFact-style subject with one fact has no other relations
    assert other_relations(fact, subject_index([fact])) == []
