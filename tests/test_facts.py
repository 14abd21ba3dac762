"""Fact dataclass and dataset loaders (CounterFact, known_1000, bundled world)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.facts import Fact, FactFormatError, fact_from_request, load_facts

FIXTURES = Path(__file__).parent / "fixtures"


def test_counterfact_loader():
    facts = load_facts(FIXTURES / "counterfact_small.json")
    assert len(facts) == 2
    f = facts[0]
    assert f.subject == "Danielle Darrieux" and f.template == "The mother tongue of {} is"
    assert f.prompt == "The mother tongue of Danielle Darrieux is"
    assert (f.target_true, f.target_new, f.relation_id, f.id) == ("French", "English", "P103", 0)
    assert len(f.paraphrases) == 2 and len(f.neighborhood) == 2
    assert f.neighborhood_targets == ("French", "French")  # CounterFact neighbours share the true object
    assert facts[1].subject == "Musée d'Orsay"


def test_known_loader():
    facts = load_facts(FIXTURES / "known_small.json")
    assert [f.subject for f in facts] == ["Vinson Massif", "Beats Music"]
    assert facts[1].prompt == "Beats Music is owned by" and facts[1].target_true == "Apple"
    assert facts[0].target_new is None


def test_bad_file_names_file_and_record():
    with pytest.raises(FactFormatError) as err:
        load_facts(FIXTURES / "counterfact_bad.json")
    msg = str(err.value)
    assert "counterfact_bad.json" in msg and "record 1" in msg and "subject" in msg


def test_unknown_format_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(FactFormatError, match="record 0"):
        load_facts(path)
    path.write_text("{not json")
    with pytest.raises(FactFormatError, match="not valid JSON"):
        load_facts(path)
    with pytest.raises(FactFormatError, match="no such facts file"):
        load_facts(tmp_path / "missing.json")


def test_fact_validation_and_request_round_trip():
    with pytest.raises(ValueError):
        Fact(subject="A", template="no slot", target_true="x")
    f = Fact(subject="Danielle Darrieux", template="The mother tongue of {} is", target_true="French",
             target_new="English", relation_id="P103")
    assert fact_from_request(f.to_request()) == f
    assert f.with_new("German").target_new == "German"


def test_bundled_world_loads():
    from workbench.loading import assets_dir

    if not (assets_dir() / "toy-facts" / "counterfact.json").exists():
        pytest.fail("bundled world missing: run `workbench train-toy --out assets/toy-facts`")
    facts = load_facts("toy-facts")
    assert len(facts) >= 500
    assert all(f.target_new and f.target_new != f.target_true for f in facts)
    assert all(f.paraphrases and f.neighborhood for f in facts)
    known = load_facts("toy-facts", split="known")
    assert len(known) >= 500
