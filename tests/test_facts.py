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


# ------------------------------------------------------------------ validation at the border

def _cf(**changes):
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                               "target_new": {"str": "English"}, "target_true": {"str": "French"},
                                               "subject": "Danielle Darrieux"},
           "paraphrase_prompts": ["Danielle Darrieux speaks"], "neighborhood_prompts": ["Miles Davis speaks"]}
    rw = changes.pop("rw", {})
    rec["requested_rewrite"].update(rw)
    rec["requested_rewrite"] = {k: v for k, v in rec["requested_rewrite"].items() if v is not None}
    rec.update(changes)
    return rec


def _load(tmp_path, *records):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([_cf(), *records]))
    return load_facts(path)


@pytest.mark.parametrize("record, match", [
    (_cf(rw={"target_true": None}), r"record 1 \(id 7\).*no 'target_true'"),  # problem 7: loaded as ''
    (_cf(rw={"target_true": {"str": ""}}), "target_true must be a non-empty string"),
    (_cf(paraphrase_prompts="Danielle Darrieux speaks"), "paraphrase_prompts is a single string"),  # problem 7
    (_cf(neighborhood_targets=["A", "B"]), "1 neighborhood_prompts but 2 neighborhood_targets"),  # problem 7
    (_cf(rw={"prompt": "The {relation} of {} is"}), r"placeholder \{relation\}"),  # problem 14
    (_cf(rw={"prompt": "The mother tongue of is"}), "exactly one '{}'"),
    (_cf(rw={"subject": 12}), "subject must be a string"),
    (_cf(neighborhood_prompts=[1, 2]), "must hold strings only"),
    ("not a record", "expected an object"),
])
def test_bad_records_name_file_record_field_and_fix(tmp_path, record, match):
    with pytest.raises(FactFormatError, match=match) as err:
        _load(tmp_path, record)
    assert "facts.json" in str(err.value) and "record 1" in str(err.value)


def test_fact_constructor_validates_too():
    with pytest.raises(FactFormatError, match="single string"):
        Fact(subject="A", template="{} is", target_true="B", paraphrases="A is")
    with pytest.raises(FactFormatError, match=r"placeholder \{x\}"):
        Fact(subject="A", template="{} {x} is", target_true="B")
    with pytest.raises(FactFormatError, match="neighborhood_targets"):
        Fact(subject="A", template="{} is", target_true="B", neighborhood=("C is",), neighborhood_targets=("D", "E"))
    f = Fact(subject="A", template="{{literal}} {} is", target_true="B", paraphrases=["A is"])
    assert f.prompt == "{literal} A is" and f.paraphrases == ("A is",)


def test_prompts_longer_than_the_context(tiny_model, tmp_path, capsys):
    """Problem 12: a too-long prompt blocked a sweep with a bare tensor-size error; predict raised IndexError."""
    from workbench.cli import main
    from workbench.loading import save_hf
    from workbench.spans import PromptTooLongError
    from workbench.predict import top_tokens
    from workbench.tracing import trace_dataset

    long = Fact(subject="Varo Keltin", template="{} " + "and so on " * 40 + "is", target_true="x", id=42)
    ok = Fact(subject="Varo Keltin", template="{} was born in", target_true="x", id=1)
    with pytest.raises(FactFormatError, match=r"n_ctx = 64 tokens\): #1 \(id 42"):
        trace_dataset(tiny_model, [ok, long], kinds=("hidden",), samples=2, progress=False, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(PromptTooLongError, match="n_ctx"):
        top_tokens(tiny_model, long.prompt)
    folder = save_hf(tiny_model, tmp_path / "m")
    assert main(["predict", "--model", str(folder), "--device", "cpu", long.prompt]) == 1
    assert "context (n_ctx) is 64" in capsys.readouterr().err


def _rec(subject: str, **extra) -> dict:
    return {"requested_rewrite": {"prompt": "{} was born in", "subject": subject, "target_true": {"str": "Osla"},
                                  "target_new": {"str": "Paris"}, "relation_id": "P19"}, **extra}


def test_facts_need_unique_ids(tmp_path):
    """Issue 21: a CounterFact file without case_id gave every record id 0; evaluate() then scored every fact
    with the first record's prompts, and reproduce stopped with "already holds the row"."""
    from workbench.facts import FactIdWarning

    path = tmp_path / "cf.json"
    path.write_text(json.dumps([_rec("Varo Keltin", case_id=3), _rec("Mira Dos", case_id=3)]))
    with pytest.raises(FactFormatError, match=r"cf.json: 1 fact\(s\) share an id .*#0 and #1 \(id 3\)"):
        load_facts(path)
    path.write_text(json.dumps([_rec("Varo Keltin"), _rec("Mira Dos")]))
    with pytest.warns(FactIdWarning, match="2 of 2 record.s. have no 'case_id'"):
        facts = load_facts(path)
    assert len({f.id for f in facts}) == 2 and all(isinstance(f.id, str) and len(f.id) == 12 for f in facts)
    with pytest.warns(FactIdWarning):
        assert [f.id for f in load_facts(path)] == [f.id for f in facts]  # derived from content: stable
    path.write_text(json.dumps([_rec("Varo Keltin"), _rec("Varo Keltin")]))  # the same record twice
    with pytest.warns(FactIdWarning), pytest.raises(FactFormatError, match="share an id"):
        load_facts(path)


def test_evaluate_refuses_facts_sharing_an_id(tiny_model):
    """Issue 21: evaluate() without out= scored facts sharing an id with the first one's prompts."""
    from workbench.evaluation import evaluate

    facts = [Fact(subject=s, template="{} was born in", target_true="Osla", target_new="Paris") for s in
             ("Varo Keltin", "Mira Dos")]  # both with the default id 0
    with pytest.raises(FactFormatError, match="share an id"):
        evaluate(tiny_model, facts, methods=(), progress=False)


@pytest.mark.parametrize("subject", ["", "   ", "\t\n"])
def test_blank_subjects_are_refused(tmp_path, subject):
    """Issue 21: a whitespace-only subject loaded."""
    with pytest.raises(FactFormatError, match="not blank"):
        Fact(subject=subject, template="{} was born in", target_true="Osla")
    path = tmp_path / "known.json"
    path.write_text(json.dumps([{"known_id": 0, "subject": subject, "attribute": "Osla",
                                 "template": "{} was born in"}]))
    with pytest.raises(FactFormatError, match=r"record 0 .*not blank"):
        load_facts(path)
